"""GPU tests of the latent encoders: CPU == GPU fp32, fp16 torso error, packing on GPU.

Marked `gpu` (deselected by default). On the GPU machine, with or without pytest:
    PYTHONPATH=. python tests/test_latents_gpu.py
    PYTHONPATH=. python -m pytest -m gpu tests/test_latents_gpu.py
Needs torch with CUDA, numpy and safetensors only; the released architectures with seeded
random weights, so no checkpoint is needed.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from slatflow.errors import failures
from slatflow.latents import (
    LatentJob,
    encode_slat_latents,
    encode_ss_latents,
    exact_fp32,
    place_encoder,
    voxel_occupancy,
)
from slatflow.models import load_encoder

try:
    import pytest

    pytestmark = pytest.mark.gpu
except ImportError:  # the GPU machine may lack pytest: __main__ below runs the tests
    pytest = None

sys.path.insert(0, str(Path(__file__).parent))  # for latents_fixtures when run as a script
from latents_fixtures import random_patchtokens, surface_voxels, voxel_centres  # noqa: E402

logger = logging.getLogger(__name__)

# The bound between CPU and GPU float32 latents.
CPU_GPU_FP32_ATOL = 1e-4
# fp16 torso against fp32, relative to the latents' largest magnitude: TRELLIS's own numerics
# differ from fp32 by this order (fp16 has an 11-bit significand, ~5e-4 per rounding).
FP16_MAX_REL = 2e-2


def write_feature_files(folder: Path, sizes: list[int]) -> list[LatentJob]:
    jobs = []
    for i, n in enumerate(sizes):
        sha = f"{i:064x}"
        np.savez_compressed(folder / f"{sha}.npz", indices=surface_voxels(n, seed=i), patchtokens=random_patchtokens(n, 1024, seed=i))
        jobs.append(LatentJob(sha, folder / f"{sha}.npz", folder / "out" / f"{sha}.npz"))
    return jobs


def read_feats(job: LatentJob, folder: str) -> np.ndarray:
    with np.load(job.output.parent.parent / folder / job.output.name) as data:
        return data["feats"]


def relocated(jobs: list[LatentJob], folder: str) -> list[LatentJob]:
    return [LatentJob(j.sha256, j.source, j.output.parent.parent / folder / j.output.name) for j in jobs]


def test_slat_cpu_equals_gpu_fp32_and_fp16_error():
    encoder = load_encoder("random", "slat")
    with tempfile.TemporaryDirectory() as tmp:
        jobs = write_feature_files(Path(tmp), [5000, 1200, 20000])
        assert failures(encode_slat_latents(relocated(jobs, "cpu"), encoder, device="cpu")) == {}
        assert failures(encode_slat_latents(relocated(jobs, "fp32"), encoder, device="cuda", precision="fp32")) == {}
        assert failures(encode_slat_latents(relocated(jobs, "fp32_alone"), encoder, device="cuda", precision="fp32", max_voxels_per_batch=1)) == {}
        assert failures(encode_slat_latents(relocated(jobs, "auto"), encoder, device="cuda")) == {}  # fp16 torso, packed
        for job in jobs:
            cpu, gpu = read_feats(job, "cpu"), read_feats(job, "fp32")
            fp32_diff = np.abs(cpu - gpu).max()
            packing_diff = np.abs(gpu - read_feats(job, "fp32_alone")).max()
            fp16_rel = np.abs(read_feats(job, "auto") - cpu).max() / np.abs(cpu).max()
            logger.warning("slat %d voxels: |cpu - gpu fp32| max %.2e, packing %.2e, fp16 max rel %.2e", len(cpu), fp32_diff, packing_diff, fp16_rel)
            assert fp32_diff <= CPU_GPU_FP32_ATOL
            assert packing_diff <= 1e-5
            assert fp16_rel <= FP16_MAX_REL


def test_ss_cpu_equals_gpu_fp32_and_fp16_error():
    encoder = load_encoder("random", "ss")
    device = torch.device("cuda")
    grids = torch.from_numpy(np.stack([voxel_occupancy(surface_voxels(n, seed=n)) for n in (5000, 20000, 32768)]))
    with torch.inference_mode():
        cpu = encoder.model(grids)  # (3, 8, 16, 16, 16)
    for precision, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        model = place_encoder(encoder, device, dtype)
        with torch.inference_mode(), exact_fp32(device, dtype):
            gpu = model(grids.to(device)).cpu()
        diff = (gpu - cpu).abs().max().item()
        rel = diff / cpu.abs().max().item()
        logger.warning("ss %s: |cpu - gpu| max %.2e (rel %.2e)", precision, diff, rel)
        if precision == "fp32":
            assert diff <= CPU_GPU_FP32_ATOL
        else:
            assert rel <= FP16_MAX_REL


def test_ss_stage_on_gpu_batches_assets():
    """The stage on GPU (several assets per forward, default fp16) equals one-by-one runs."""
    try:
        import plyfile  # noqa: F401 - the voxel PLY reader needs it
    except ImportError:
        logger.warning("plyfile missing: skipping the PLY-reading SS stage test")
        return
    from slatflow.io import write_points_ply

    encoder = load_encoder("random", "ss")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        jobs = []
        for i, n in enumerate((3000, 9000, 15000)):
            write_points_ply(folder / f"{i}.ply", voxel_centres(surface_voxels(n, seed=i)))
            jobs.append(LatentJob(str(i), folder / f"{i}.ply", folder / "batched" / f"{i}.npz"))
        assert failures(encode_ss_latents(jobs, encoder, device="cuda", batch_size=3)) == {}
        alone = [LatentJob(j.sha256, j.source, folder / "alone" / j.output.name) for j in jobs]
        assert failures(encode_ss_latents(alone, encoder, device="cuda", batch_size=1)) == {}
        for a, b in zip(jobs, alone):
            with np.load(a.output) as x, np.load(b.output) as y:
                assert np.abs(x["mean"] - y["mean"]).max() <= 1e-2 * np.abs(y["mean"]).max()


def test_cublaslt_gelu_epilogue_is_the_tanh_gelu_of_trellis_mlps():
    """The SLat blocks' fused fc1 + GELU must compute nn.GELU(approximate="tanh"), not erf."""
    import torch.nn.functional as F

    gen = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(4096, 768, device="cuda", generator=gen) * 2
    w = torch.randn(3072, 768, device="cuda", generator=gen) / 768**0.5
    b = torch.randn(3072, device="cuda", generator=gen)
    for dtype, atol in ((torch.float32, 1e-4), (torch.float16, 1e-2)):
        fused = torch._addmm_activation(b.to(dtype), h.to(dtype), w.to(dtype).t(), use_gelu=True).float()
        linear = F.linear(h.to(dtype), w.to(dtype), b.to(dtype)).float()
        tanh, erf = F.gelu(linear, approximate="tanh"), F.gelu(linear)
        assert (fused - tanh).abs().max().item() <= atol, dtype
    assert (tanh - erf).abs().max().item() > 1e-4  # the check can tell the two apart


def test_window_ordered_fp16_blocks_equal_the_bucketed_blocks():
    """The packed path (residual stream in window order, varlen attention on views, GELU
    epilogue) computes what the per-bucket SDPA path computes, up to fp16 rounding."""
    from slatflow.models import slat_encoder

    encoder = load_encoder("random", "slat")
    model = place_encoder(encoder, torch.device("cuda"), torch.float16)
    sizes = (5000, 20000, 32768)
    coords = torch.from_numpy(np.concatenate([np.concatenate([np.full((n, 1), b), surface_voxels(n, seed=n)], 1)
                                              for b, n in enumerate(sizes)]).astype(np.int64)).cuda()
    feats = torch.from_numpy(np.concatenate([random_patchtokens(n, 1024, seed=n) for n in sizes])).cuda().float()
    available = slat_encoder.packed_attention_available
    with torch.inference_mode():
        packed = model(feats, coords)
        slat_encoder.packed_attention_available = lambda *a: False  # no pytest fixtures: runs as a script too
        try:
            bucketed = model(feats, coords)
        finally:
            slat_encoder.packed_attention_available = available
    rel = ((packed - bucketed).abs().max() / bucketed.abs().max()).item()
    logger.warning("slat fp16 packed vs bucketed: rel %.2e", rel)
    assert rel <= 5e-3


def test_half_features_meet_a_half_input_layer_within_its_rounding():
    """float16 features (the files' dtype) under the fp16 torso go through the input layer as
    half with float32 accumulation; float32 features through TRELLIS's float32 layer."""
    encoder = load_encoder("random", "slat")
    model = place_encoder(encoder, torch.device("cuda"), torch.float16)
    n = 20000
    coords = torch.from_numpy(np.concatenate([np.zeros((n, 1)), surface_voxels(n, seed=3)], 1).astype(np.int64)).cuda()
    half = torch.from_numpy(random_patchtokens(n, 1024, seed=3)).cuda()
    with torch.inference_mode():
        layer = model.input_layer
        direct = layer(half.float())
        rel = ((model._input(half) - direct).norm() / direct.norm()).item()
        latent_rel = ((model(half, coords) - model(half.float(), coords)).abs().max() / model(half.float(), coords).abs().max()).item()
    logger.warning("slat half input layer: rel %.2e, latent rel %.2e", rel, latent_rel)
    assert rel <= 1e-3 and latent_rel <= 5e-3
    assert model._half_input_weight.dtype == torch.float16  # the half path ran, not the float32 one


def test_slat_nan_features_fail_alone_when_checked_on_the_gpu():
    encoder = load_encoder("random", "slat")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        jobs = write_feature_files(folder, [3000, 4000, 5000])
        with np.load(jobs[1].source) as data:
            tokens, indices = data["patchtokens"].copy(), data["indices"]
        tokens[10, 5] = np.nan
        np.savez_compressed(jobs[1].source, indices=indices, patchtokens=tokens)
        failed = failures(encode_slat_latents(jobs, encoder, device="cuda"))
        assert set(failed) == {jobs[1].sha256} and "NaN or inf" in failed[jobs[1].sha256].reason
        assert jobs[0].output.exists() and jobs[2].output.exists() and not jobs[1].output.exists()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_grad_enabled(False)
    assert torch.cuda.is_available(), "these tests need a CUDA device"
    failed = 0
    for name, test in sorted(globals().items()):
        if name.startswith("test_") and callable(test):
            try:
                test()
                print(f"PASSED {name}")
            except Exception as exc:  # noqa: BLE001 - report every test, then fail
                failed += 1
                print(f"FAILED {name}: {type(exc).__name__}: {exc}")
    sys.exit(1 if failed else 0)
