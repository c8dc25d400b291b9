"""Tests of the features stage: TRELLIS equivalence, weight loading, bad input, visibility."""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from features_fixtures import (
    TINY_ARCH,
    random_official_state_dict,
    reference_model,
    sphere_mesh,
    sphere_voxels,
    trellis_project_cv,
    trellis_reference_features,
    view_cameras,
    write_synthetic_asset,
)
from PIL import Image

from slatflow import cameras
from slatflow.dinov2 import (
    ARCHITECTURES,
    FusedDinov2,
    LoadedDinov2,
    convert_official_state_dict,
    hf_config,
    load_dinov2,
    prenorm_patch_tokens,
)
from slatflow.errors import AssetError, ConfigError
from slatflow.features import (
    FeatureExtractor,
    FeatureJob,
    FeatureSettings,
    ViewFrame,
    decode_view,
    lanczos_resize_rgba,
    project_to_grid,
    projection_matrices,
    rasterize_depth,
    read_view_frames,
    visibility_weights,
)
from slatflow.logs import RANDOM_WEIGHTS_BANNER

SHA_A = "a" * 64
SHA_B = "b" * 64
MAX_ABS_DIFF = 1e-4  # the bound for the optimized pipeline vs the fp32 TRELLIS recipe


@pytest.fixture(scope="module")
def official_tiny(tmp_path_factory) -> tuple[dict, Path]:
    """Random official-layout weights of the tiny architecture, and the .pth holding them."""
    state = random_official_state_dict(TINY_ARCH, seed=1)
    path = tmp_path_factory.mktemp("weights") / "dinov2_tiny_reg4_pretrain.pth"
    torch.save(state, path)
    return state, path


@pytest.fixture(scope="module")
def tiny_loaded(official_tiny) -> LoadedDinov2:
    return load_dinov2(TINY_ARCH, str(official_tiny[1]), model_name="tiny")


def tiny_extractor(loaded: LoadedDinov2, **overrides) -> FeatureExtractor:
    """An extractor of the tiny model (the settings' model only names outputs and the patch size)."""
    settings = dict(model="dinov2_vits14_reg", weights="unused", batch_size=4, device="cpu", decode_workers=2)
    settings.update(overrides)
    return FeatureExtractor(FeatureSettings(**settings), loaded)


def run_with_deadline(extractor: FeatureExtractor, jobs: list[FeatureJob], seconds: float = 120):
    """Run the jobs in a thread; fail (rather than hang the suite) if they do not finish."""
    result = {}
    thread = threading.Thread(target=lambda: result.update(out=extractor.run(jobs, keep_features=True)))
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"feature extraction did not finish within {seconds} s"
    return result["out"]


# ----------------------------------------------------------------------------------------------
# Camera projection
# ----------------------------------------------------------------------------------------------


def test_projection_matches_cameras_module_and_trellis_chain():
    rng = np.random.default_rng(0)
    points = rng.uniform(-0.5, 0.5, (500, 3)).astype(np.float32)
    c2ws = view_cameras(SHA_A, 7)
    fovs = np.radians(rng.uniform(30, 60, 7))
    views = [ViewFrame(Path("x.png"), c2w, float(fov)) for c2w, fov in zip(c2ws, fovs)]
    grid, depth = project_to_grid(torch.from_numpy(points), torch.from_numpy(projection_matrices(views)).float())
    for v, (c2w, fov) in enumerate(zip(c2ws, fovs)):
        uv, z = cameras.project_points(points, c2w, fov)
        np.testing.assert_allclose(grid[v].numpy(), uv * 2 - 1, atol=2e-6)
        np.testing.assert_allclose(depth[v].numpy(), z, rtol=1e-6)
    # TRELLIS's float32 chain (inverse, then intrinsics) lands on the same uv
    extrinsics = torch.stack([torch.inverse(torch.tensor(_cv(c))) for c in c2ws]).float()
    focal = 0.5 / np.tan(fovs / 2)
    intrinsics = torch.tensor([[[f, 0, 0.5], [0, f, 0.5], [0, 0, 1]] for f in focal]).float()
    uv = trellis_project_cv(torch.from_numpy(points), extrinsics, intrinsics)
    np.testing.assert_allclose(grid.numpy(), uv.numpy() * 2 - 1, atol=2e-6)


def _cv(c2w: np.ndarray) -> np.ndarray:
    c2w = np.array(c2w, dtype=np.float32)
    c2w[:3, 1:3] *= -1
    return c2w


# ----------------------------------------------------------------------------------------------
# Equivalence with TRELLIS's recipe (fp32, CPU)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("image_size, resize", [(518, "pil"), (224, "pil"), (518, "device")])
def test_features_equal_trellis_recipe(tmp_path, official_tiny, tiny_loaded, image_size, resize):
    """The optimized pipeline (threads, batches of 4, chunked sampling, HF model converted from
    the official .pth) against the plain recipe (official-layout model, batch 16, stacked
    samples, numpy mean): <= 1e-4 max abs on float32 means, equal indices, and the float16
    file within 1e-4 plus its own rounding.
    224 exercises the position-embedding interpolation (bicubic, antialiased); `device` the
    torch re-implementation of PIL's resize that the GPU path uses."""
    render_dir, voxels = write_synthetic_asset(tmp_path, SHA_A, num_views=6, resolution=96, radius=0.4)
    ref_indices, ref_mean = trellis_reference_features(
        reference_model(TINY_ARCH, official_tiny[0]), render_dir, voxels, image_size=image_size)
    out_path = tmp_path / "features" / f"{SHA_A}.npz"
    extractor = tiny_extractor(tiny_loaded, image_size=image_size, resize=resize, sample_memory_mb=1)
    assert extractor.resize_on_device == (resize == "device")
    [outcome] = run_with_deadline(extractor, [FeatureJob(SHA_A, render_dir, voxels, out_path)])
    assert outcome.error is None
    ours = outcome.features
    assert ours.mean.shape == ref_mean.shape == (len(sphere_voxels(0.4)), TINY_ARCH.embed_dim)
    assert np.abs(ref_mean).mean() > 0.1  # features carry signal, so the bound means something
    assert np.abs(ours.mean - ref_mean).max() <= MAX_ABS_DIFF
    np.testing.assert_array_equal(ours.indices, ref_indices)
    with np.load(out_path) as npz:
        assert npz["indices"].dtype == np.uint8 and npz["patchtokens"].dtype == np.float16
        np.testing.assert_array_equal(npz["indices"], ref_indices)
        np.testing.assert_array_equal(npz["patchtokens"], ours.mean.astype(np.float16))
        ulp = np.spacing(np.abs(ref_mean).astype(np.float16)).astype(np.float32)  # fp16 rounding
        assert (np.abs(npz["patchtokens"].astype(np.float32) - ref_mean) <= MAX_ABS_DIFF + ulp).all()
        assert not npz["random_weights"] and not npz["visibility"]


def test_equivalence_bound_detects_a_wrong_conversion(tmp_path, official_tiny):
    """Negative control: swapping q and k in the checkpoint moves the features far past the bound."""
    state = dict(official_tiny[0])
    d = TINY_ARCH.embed_dim
    for key in [k for k in state if k.endswith("attn.qkv.weight") or k.endswith("attn.qkv.bias")]:
        q, k, v = state[key].split(d)
        state[key] = torch.cat([k, q, v])
    swapped = tmp_path / "swapped.pth"
    torch.save(state, swapped)
    render_dir, voxels = write_synthetic_asset(tmp_path, SHA_A, num_views=4, resolution=64)
    _, ref_mean = trellis_reference_features(reference_model(TINY_ARCH, official_tiny[0]), render_dir, voxels)
    extractor = tiny_extractor(load_dinov2(TINY_ARCH, str(swapped)))
    [outcome] = run_with_deadline(extractor, [FeatureJob(SHA_A, render_dir, voxels)])
    assert np.abs(outcome.features.mean - ref_mean).max() > 100 * MAX_ABS_DIFF


def test_prenorm_tokens_are_hidden_states_before_layernorm(tiny_loaded):
    """What the contract verified against the official model: hidden_states[-1][:, 5:]."""
    model = tiny_loaded.model
    pixels = torch.randn(2, 3, 518, 518)
    with torch.no_grad():
        maps = prenorm_patch_tokens(model, pixels)  # (2, D, 37, 37)
        hidden = model(pixels, output_hidden_states=True).hidden_states[-1][:, 5:]  # (2, 1369, D)
    assert maps.shape == (2, TINY_ARCH.embed_dim, 37, 37)
    torch.testing.assert_close(maps.flatten(2).transpose(1, 2), hidden, rtol=0, atol=0)


@pytest.mark.parametrize("attention", ["auto", "math"])
def test_fused_forward_computes_transformers_prenorm_tokens(tiny_loaded, attention):
    """Fused qkv and folded layer scales change only rounding: float32 equals transformers'
    forward, bf16 stays close; a fused block with a swapped weight would not."""
    model = tiny_loaded.model
    pixels = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        reference = prenorm_patch_tokens(model, pixels)  # (3, D, 16, 16)
        fused = FusedDinov2(model, torch.float32, attention)(pixels)
        half = FusedDinov2(model, torch.bfloat16, attention)(pixels)
        broken = FusedDinov2(model, torch.float32, attention)
        block = list(broken.blocks[0])
        block[2] = block[2].roll(TINY_ARCH.embed_dim, dims=0)  # q and k rows swapped with v's
        broken.blocks[0] = tuple(block)
        wrong = broken(pixels)
    assert fused.shape == reference.shape == (3, TINY_ARCH.embed_dim, 16, 16) and fused.dtype == torch.float32
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-4)
    cosine = torch.nn.functional.cosine_similarity(half.float(), reference, dim=1)  # per patch
    assert cosine.min() > 0.999
    assert (wrong - reference).abs().max() > 0.1


@pytest.mark.parametrize("epilogues", [True, False])
def test_a_failing_torch_compile_falls_back_to_the_eager_block(tiny_loaded, caplog, epilogues):
    from slatflow.dinov2 import _shifted_norm

    fused = FusedDinov2(tiny_loaded.model, torch.float32, epilogues=epilogues)
    eager = fused._block_eager

    def broken(*args):
        raise RuntimeError("Failed to find C compiler")

    fused._block = fused._norm = broken  # what a compiled block or norm raises at its first call
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        out = fused(pixels)
    assert fused._block == eager and fused._norm == _shifted_norm
    assert "torch.compile failed (RuntimeError: Failed to find C compiler)" in caplog.text
    torch.testing.assert_close(out, prenorm_patch_tokens(tiny_loaded.model, pixels), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", [(224, 224), (224, 196), (230, 237)])
def test_patch_matmul_embeddings_equal_transformers(tiny_loaded, size):
    """The unfolded-patch matmul, cached position embeddings (interpolated for other grids)
    and token order are transformers' embeddings, also where the image is not square or not
    a multiple of the patch (the conv drops the remainder)."""
    pixels = torch.randn(2, 3, *size)
    with torch.no_grad():
        ours = FusedDinov2(tiny_loaded.model, torch.float32)._embed(pixels)
        theirs = tiny_loaded.model.embeddings(pixels)
    assert ours.shape == theirs.shape and ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_epilogue_blocks_compute_the_eager_blocks(tiny_loaded):
    """The residual stream without the output biases, carried by running sums into the norms,
    is the eager blocks' result; with non-zero biases and layer scales (a random init has
    zero biases), and a wrong running sum would show."""
    model = copy.deepcopy(tiny_loaded.model)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "lambda1" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        eager = FusedDinov2(model, torch.float32, epilogues=False)(pixels)
        fused = FusedDinov2(model, torch.float32, epilogues=True)
        epilogues = fused(pixels)
        reference = prenorm_patch_tokens(model, pixels)
        fused.shifts[1] = (fused.shifts[1][0], fused.shifts[1][0])  # block 1's attention bias left out
        wrong = fused(pixels)
    torch.testing.assert_close(epilogues, eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(epilogues, reference, rtol=1e-4, atol=1e-4)
    assert (wrong - reference).abs().max() > 1e-2


def test_equal_batches_give_the_same_features_as_one_batch(tmp_path, tiny_loaded):
    render_dir, voxels = write_synthetic_asset(tmp_path, SHA_A, num_views=7, resolution=64)
    job = FeatureJob(SHA_A, render_dir, voxels)
    [whole] = run_with_deadline(tiny_extractor(tiny_loaded, batch_size=7), [job])
    [split] = run_with_deadline(tiny_extractor(tiny_loaded, batch_size=3), [job])  # batches of 3, 3, 1
    np.testing.assert_allclose(split.features.mean, whole.features.mean, rtol=1e-5, atol=1e-5)


def test_process_from_threads_writes_what_run_writes_and_a_bad_asset_fails_alone(tmp_path, tiny_loaded):
    """A worker's threads call `process` at once: same files as a batch run, one failure."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = []
    for i, sha in enumerate(["1" * 64, "2" * 64, "3" * 64]):
        render_dir, voxels = write_synthetic_asset(tmp_path, sha, num_views=4, resolution=64, radius=0.3 + 0.05 * i)
        jobs.append(FeatureJob(sha, render_dir, voxels))
    (jobs[1].render_dir / "002.png").write_bytes(b"not a png")
    extractor = tiny_extractor(tiny_loaded)
    threaded_jobs = [FeatureJob(j.sha256, j.render_dir, j.voxels_path, tmp_path / "threads" / f"{j.sha256}.npz")
                     for j in jobs]
    with ThreadPoolExecutor(3) as pool:
        outcomes = list(pool.map(extractor.process, threaded_jobs))
    reference = run_with_deadline(extractor, jobs)
    assert [o.error is None for o in outcomes] == [o.error is None for o in reference] == [True, False, True]
    assert "cannot decode view" in outcomes[1].error.reason and not threaded_jobs[1].output_path.exists()
    for job, ref in zip(threaded_jobs[::2], reference[::2]):
        with np.load(job.output_path) as npz:
            assert npz["patchtokens"].dtype == np.float16 and npz["indices"].dtype == np.uint8
            np.testing.assert_array_equal(npz["patchtokens"], ref.features.patchtokens)
            np.testing.assert_array_equal(npz["indices"], ref.features.indices)
    assert (tmp_path / "threads" / "provenance.json").is_file()


def test_deflate_level_0_writes_the_same_arrays_stored_in_the_deflate_stream(tmp_path):
    import zipfile

    from slatflow.features import AssetFeatures, write_features

    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((500, 64)).astype(np.float16)
    features = AssetFeatures(rng.integers(0, 64, (500, 3)).astype(np.uint8), tokens, tokens.astype(np.float32), 4)
    sizes = {}
    for level in (0, 1):
        path = tmp_path / f"level{level}.npz"
        write_features(path, features, deflate_level=level)
        with np.load(path) as npz:
            np.testing.assert_array_equal(npz["patchtokens"], tokens)
        with zipfile.ZipFile(path) as archive:
            assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_DEFLATED}
        sizes[level] = path.stat().st_size
    assert sizes[0] > tokens.nbytes > sizes[1]
    with pytest.raises(ConfigError, match="deflate_level must be in 0..9"):
        FeatureSettings(weights="random", deflate_level=10)


@pytest.mark.parametrize("size", [224, 448, 518, 742])
def test_position_embedding_interpolation_matches_dinov2(official_tiny, tiny_loaded, size):
    reference = reference_model(TINY_ARCH, official_tiny[0])
    grid = size // 14
    with torch.no_grad():
        ours = tiny_loaded.model.embeddings.interpolate_pos_encoding(torch.zeros(1, grid * grid + 1, 64), size, size)
        theirs = reference.interpolate_pos_encoding(grid * grid, size)
    assert ours.shape == (1, grid * grid + 1, TINY_ARCH.embed_dim)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Weight loading: official .pth, HF folder, hub id from the cache, random
# ----------------------------------------------------------------------------------------------


def test_official_checkpoint_keys_map_one_to_one(official_tiny, tiny_loaded):
    state = official_tiny[0]
    loaded = tiny_loaded.model.state_dict()
    assert sum(v.numel() for v in state.values()) == sum(v.numel() for v in loaded.values())
    q_key = next(k for k in loaded if k.startswith("encoder.layer.1.") and ("q_proj.weight" in k or "query.weight" in k))
    v_key = q_key.replace("q_proj", "v_proj").replace("query", "value")
    torch.testing.assert_close(loaded[q_key], state["blocks.1.attn.qkv.weight"][:64], rtol=0, atol=0)
    torch.testing.assert_close(loaded[v_key], state["blocks.1.attn.qkv.weight"][128:], rtol=0, atol=0)
    torch.testing.assert_close(loaded["encoder.layer.0.layer_scale2.lambda1"], state["blocks.0.ls2.gamma"])
    torch.testing.assert_close(loaded["embeddings.register_tokens"], state["register_tokens"])
    torch.testing.assert_close(loaded["layernorm.bias"], state["norm.bias"])


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s: s.pop("blocks.1.ls1.gamma"), "lacks the key 'blocks.1.ls1.gamma'"),
        (lambda s: s.update({"blocks.2.norm1.weight": torch.ones(64)}), "does not"),
        (lambda s: s.update({"pos_embed": torch.zeros(1, 257, 64)}), "pos_embed has shape"),
        (lambda s: s.update({"blocks.0.mlp.fc1.weight": torch.zeros(128, 64)}), "does not fit"),
    ],
)
def test_official_checkpoint_is_loaded_strictly(tmp_path, official_tiny, mutate, message):
    state = dict(official_tiny[0])
    mutate(state)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ConfigError, match=message):
        load_dinov2(TINY_ARCH, str(path))


def _save_hub_layout(folder: Path, state: dict) -> Path:
    """A folder as published on the HF hub: config.json + model.safetensors (hub key names)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    hf_config(TINY_ARCH).to_json_file(folder / "config.json")
    save_file(convert_official_state_dict(state, TINY_ARCH), folder / "model.safetensors")
    return folder


def test_hf_folder_and_hub_cache_load_the_same_model(tmp_path, official_tiny, tiny_loaded):
    folder = _save_hub_layout(tmp_path / "local", official_tiny[0])
    # the HF cache layout that `hf download` fills, read with no network
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_cache = tmp_path / "cache" / "models--slatflow-test--dinov2-tiny"
    _save_hub_layout(repo_cache / "snapshots" / commit, official_tiny[0])
    (repo_cache / "refs").mkdir()
    (repo_cache / "refs" / "main").write_text(commit)
    from_folder = load_dinov2(TINY_ARCH, str(folder))
    from_hub = load_dinov2(TINY_ARCH, "slatflow-test/dinov2-tiny", cache_dir=str(tmp_path / "cache"),
                           local_files_only=True)
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = prenorm_patch_tokens(tiny_loaded.model, pixels)
        for loaded in (from_folder, from_hub):
            assert not loaded.random_weights
            torch.testing.assert_close(prenorm_patch_tokens(loaded.model, pixels), expected, rtol=0, atol=1e-6)


def test_missing_weights_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="hf download"):
        load_dinov2(TINY_ARCH, "slatflow-test/not-cached", cache_dir=str(tmp_path), local_files_only=True)
    with pytest.raises(ConfigError, match="does not exist"):
        load_dinov2(TINY_ARCH, str(tmp_path / "missing.pth"))
    with pytest.raises(ConfigError, match="looks like a path"):
        load_dinov2(TINY_ARCH, "./nowhere/dinov2")
    folder = _save_hub_layout(tmp_path / "small", random_official_state_dict(TINY_ARCH))
    with pytest.raises(ConfigError, match="expects"):
        load_dinov2(ARCHITECTURES["dinov2_vits14_reg"], str(folder))


def test_vitl14_reg4_official_checkpoint_builds_and_loads_strictly(tmp_path):
    """The real architecture: 304,372,736 parameters from an official-format random .pth."""
    arch = ARCHITECTURES["dinov2_vitl14_reg"]
    state = random_official_state_dict(arch)
    path = tmp_path / "dinov2_vitl14_reg4_pretrain.pth"
    torch.save(state, path)
    loaded = load_dinov2(arch, str(path), model_name="dinov2_vitl14_reg")
    params = loaded.model.state_dict()
    assert sum(p.numel() for p in params.values()) == 304_372_736
    assert not any(p.is_meta for p in loaded.model.parameters())
    assert loaded.model.config.image_size == 518 and loaded.model.config.patch_size == 14
    k_key = next(k for k in params if k.startswith("encoder.layer.23.") and ("k_proj.bias" in k or "key.bias" in k))
    torch.testing.assert_close(params[k_key], state["blocks.23.attn.qkv.bias"][1024:2048], rtol=0, atol=0)
    torch.testing.assert_close(params["embeddings.position_embeddings"], state["pos_embed"], rtol=0, atol=0)


def test_random_weights_are_announced_and_recorded(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        loaded = load_dinov2(TINY_ARCH, "random", model_name="dinov2_tiny")
    assert loaded.random_weights
    assert RANDOM_WEIGHTS_BANNER in caplog.text and "dinov2_tiny" in caplog.text
    again = load_dinov2(TINY_ARCH, "random")
    for a, b in zip(loaded.model.parameters(), again.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # seeded: reproducible
    render_dir, voxels = write_synthetic_asset(tmp_path, SHA_A, num_views=2, resolution=32)
    out = tmp_path / "f.npz"
    [outcome] = run_with_deadline(tiny_extractor(loaded), [FeatureJob(SHA_A, render_dir, voxels, out)])
    assert outcome.error is None
    with np.load(out) as npz:
        assert bool(npz["random_weights"])


def test_feature_names_and_settings_validation():
    assert FeatureSettings().feature_name == "dinov2_vitl14_reg"
    assert FeatureSettings().weights == "facebook/dinov2-with-registers-large"
    small = FeatureSettings(model="dinov2_vits14_reg", weights="facebook/dinov2-with-registers-small", image_size=224)
    assert small.feature_name == "dinov2_vits14_reg_224px"
    assert FeatureSettings(visibility=True).feature_name == "dinov2_vitl14_reg_vis"
    assert FeatureSettings(weights="random").feature_name == "dinov2_vitl14_reg_random"
    section = {"model": "dinov2_vits14_reg", "weights": "random", "image_size": 224, "threads": 3}
    settings = FeatureSettings.from_config(section)
    assert settings.decode_workers == 3 and settings.feature_name == "dinov2_vits14_reg_224px_random"
    assert FeatureSettings.from_config(section, threads=5).decode_workers == 5
    with pytest.raises(ConfigError, match="multiple of 14"):
        FeatureSettings(image_size=500)
    with pytest.raises(ConfigError, match="not a known"):
        FeatureSettings(model="dinov2_vitl14")
    with pytest.raises(ConfigError, match="batch_size"):
        FeatureSettings(batch_size=0)
    with pytest.raises(ConfigError, match="use facebook/dinov2-with-registers-small"):
        FeatureSettings(model="dinov2_vits14_reg")  # the default weights are ViT-L's
    if not torch.cuda.is_available():  # checked before any model is loaded
        with pytest.raises(ConfigError, match="no CUDA device"):
            FeatureExtractor(FeatureSettings(device="cuda"))


# ----------------------------------------------------------------------------------------------
# Bad input: a clear per-asset error, the other assets still written, never a hang
# ----------------------------------------------------------------------------------------------


def _drop_png(render_dir: Path, voxels: Path):
    (render_dir / "001.png").unlink()


def _extra_png(render_dir: Path, voxels: Path):
    Image.new("RGBA", (32, 32)).save(render_dir / "007.png")


def _fewer_frames(render_dir: Path, voxels: Path):
    transforms = json.loads((render_dir / "transforms.json").read_text())
    transforms["frames"] = transforms["frames"][:2]
    (render_dir / "transforms.json").write_text(json.dumps(transforms))


def _corrupt_png(render_dir: Path, voxels: Path):
    (render_dir / "002.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)


def _truncated_png(render_dir: Path, voxels: Path):
    data = (render_dir / "002.png").read_bytes()
    (render_dir / "002.png").write_bytes(data[: len(data) // 2])


def _non_square_png(render_dir: Path, voxels: Path):
    Image.new("RGBA", (32, 24)).save(render_dir / "000.png")


def _bad_json(render_dir: Path, voxels: Path):
    (render_dir / "transforms.json").write_text("{ not json")


def _no_transforms(render_dir: Path, voxels: Path):
    (render_dir / "transforms.json").unlink()


def _bad_matrix(render_dir: Path, voxels: Path):
    transforms = json.loads((render_dir / "transforms.json").read_text())
    transforms["frames"][1]["transform_matrix"] = [[1, 0, 0], [0, 1, 0]]
    (render_dir / "transforms.json").write_text(json.dumps(transforms))


def _voxel_outside(render_dir: Path, voxels: Path):
    from slatflow.io import write_points_ply

    write_points_ply(voxels, np.concatenate([sphere_voxels(0.3), [[0.2, 0.51, 0.0]]]))


def _voxel_nan(render_dir: Path, voxels: Path):
    from slatflow.io import write_points_ply

    write_points_ply(voxels, np.concatenate([sphere_voxels(0.3), [[np.nan, 0.0, 0.0]]]))


def _no_voxels_file(render_dir: Path, voxels: Path):
    voxels.unlink()


def _garbage_voxels(render_dir: Path, voxels: Path):
    voxels.write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 10\n")


@pytest.mark.parametrize(
    "break_asset, reason",
    [
        (_drop_png, r"1 of 4 view PNGs .* missing \(first: \['001.png'\]\)"),
        (_extra_png, r"holds 1 view PNGs that transforms.json does not list \(first: \['007.png'\]\)"),
        (_fewer_frames, r"holds 2 view PNGs that transforms.json does not list"),
        (_corrupt_png, r"cannot decode view .*002.png"),
        (_truncated_png, r"cannot decode view .*002.png"),
        (_non_square_png, r"000.png: view is 32x24, expected square"),
        (_bad_json, r"cannot read .*transforms.json"),
        (_no_transforms, r"transforms.json does not exist"),
        (_bad_matrix, r"frame 1: transform_matrix must be a finite 4x4 matrix"),
        (_voxel_outside, r"1 of \d+ voxels .* lie outside the grid \[-0.5, 0.5\)\^3 \(first: \[0.2, 0.51"),
        (_voxel_nan, r"1 of \d+ voxels .* outside the grid"),
        (_no_voxels_file, r"voxel file .* does not exist"),
        (_garbage_voxels, r"cannot read voxel PLY"),
    ],
)
def test_bad_asset_fails_alone_with_a_clear_reason(tmp_path, tiny_loaded, break_asset, reason):
    bad_dir, bad_voxels = write_synthetic_asset(tmp_path, SHA_A, num_views=4, resolution=32, radius=0.3)
    good_dir, good_voxels = write_synthetic_asset(tmp_path, SHA_B, num_views=4, resolution=32, radius=0.3)
    break_asset(bad_dir, bad_voxels)
    jobs = [
        FeatureJob(SHA_A, bad_dir, bad_voxels, tmp_path / "features" / f"{SHA_A}.npz"),
        FeatureJob(SHA_B, good_dir, good_voxels, tmp_path / "features" / f"{SHA_B}.npz"),
    ]
    bad, good = run_with_deadline(tiny_extractor(tiny_loaded), jobs, seconds=60)
    assert isinstance(bad.error, AssetError) and bad.error.sha256 == SHA_A
    assert bad.error.stage == "features"
    assert "\n" not in bad.error.reason
    assert re.search(reason, bad.error.reason), bad.error.reason
    assert not jobs[0].output_path.exists()
    assert good.error is None and jobs[1].output_path.exists()


@pytest.mark.parametrize("in_size, out_size", [(512, 518), (64, 518), (700, 518), (96, 224), (518, 518)])
def test_device_resize_is_bit_identical_to_pil(in_size, out_size):
    """Noise with every kind of alpha (0, 255, partial) exercises clipping, premultiplication
    and its integer inverse; 700 -> 518 the downscaling filter width."""
    rng = np.random.default_rng(in_size)
    images = rng.integers(0, 256, (3, in_size, in_size, 4), dtype=np.uint8)
    images[1, ..., 3] = rng.choice([0, 1, 2, 128, 254, 255], (in_size, in_size))
    images[2, ..., 3] = 255
    ours = lanczos_resize_rgba(torch.from_numpy(images), out_size).numpy()
    pil = [Image.fromarray(im, "RGBA").resize((out_size, out_size), Image.Resampling.LANCZOS) for im in images]
    np.testing.assert_array_equal(ours, np.stack([np.asarray(im) for im in pil]))


def test_rgb_views_are_read_as_opaque(tmp_path):
    """TRELLIS crashes on an RGB PNG; slatflow reads it as RGBA with alpha 255."""
    render_dir, _ = write_synthetic_asset(tmp_path, SHA_A, num_views=2, resolution=32)
    Image.open(render_dir / "000.png").convert("RGB").save(render_dir / "000.png")
    rgba = decode_view(SHA_A, render_dir / "000.png", 518)
    assert rgba.shape == (518, 518, 4) and (rgba[..., 3] == 255).all()
    assert len(read_view_frames(SHA_A, render_dir)) == 2


# ----------------------------------------------------------------------------------------------
# Visibility-aware mean (optional)
# ----------------------------------------------------------------------------------------------


def _sphere_depth(c2w: np.ndarray, resolution: int, radius: float) -> np.ndarray:
    """Analytic depth (along the optical axis) of a sphere at pixel centres; inf off the sphere."""
    focal = 0.5 / math.tan(math.radians(40) / 2)
    j, i = np.meshgrid(np.arange(resolution), np.arange(resolution))
    d_cam = np.stack([((j + 0.5) / resolution - 0.5) / focal, ((i + 0.5) / resolution - 0.5) / focal,
                      np.ones((resolution, resolution))], -1)  # (R, R, 3), z = 1
    rot = c2w[:3, :3].copy()
    rot[:, 1:3] *= -1
    d_world = d_cam @ rot.T
    o = c2w[:3, 3]
    a, b, c = (d_world**2).sum(-1), 2 * (d_world @ o), o @ o - radius**2
    disc = b**2 - 4 * a * c
    t = (-b - np.sqrt(np.clip(disc, 0, None))) / (2 * a)  # z = t since d_cam has unit z
    return np.where(disc > 0, t, np.inf)


def test_rasterized_depth_matches_analytic_sphere():
    vertices, faces = sphere_mesh(0.4, rings=64, segments=128)
    c2ws = view_cameras(SHA_A, 3)
    views = [ViewFrame(Path("x"), c, math.radians(40)) for c in c2ws]
    proj = torch.from_numpy(projection_matrices(views)).float()
    depth = rasterize_depth(torch.from_numpy(vertices), torch.from_numpy(faces), proj, 96).numpy()
    for v, c2w in enumerate(c2ws):
        expected = _sphere_depth(c2w, 96, 0.4)
        both = np.isfinite(expected) & np.isfinite(depth[v])
        assert both.sum() > 0.95 * np.isfinite(expected).sum()  # coverage (tessellated silhouette)
        assert np.isfinite(depth[v]).sum() <= np.isfinite(expected).sum()  # polygon inside the sphere
        np.testing.assert_allclose(depth[v][both], expected[both], atol=0.5 / 64)  # half a voxel
        interior = both & (np.abs(np.gradient(np.where(both, expected, 0))[0]) < 0.01)  # off the silhouette
        np.testing.assert_allclose(depth[v][interior], expected[interior], atol=2e-3)


def test_visibility_keeps_the_camera_facing_voxels(tmp_path):
    voxels = sphere_voxels(0.4)
    c2ws = view_cameras(SHA_A, 4)
    vertices, faces = sphere_mesh(0.4)
    views = [ViewFrame(Path("x"), c, math.radians(40)) for c in c2ws]
    proj = torch.from_numpy(projection_matrices(views)).float()
    grid, depth = project_to_grid(torch.from_numpy(voxels), proj)
    depth_maps = rasterize_depth(torch.from_numpy(vertices), torch.from_numpy(faces), proj, 256)
    weights = visibility_weights(grid, depth, depth_maps).numpy()  # (V, N)
    for v, c2w in enumerate(c2ws):
        to_camera = c2w[:3, 3] - voxels  # (N, 3)
        facing = (voxels * to_camera).sum(1) / (np.linalg.norm(voxels, axis=1) * np.linalg.norm(to_camera, axis=1))
        # seen within ~60 deg of the normal: visible (the tolerance's promise); the back: hidden
        # (voxels just outside the sphere near the silhouette are rightly seen from behind it)
        assert (weights[v][facing > 0.55] == 1).all()
        assert (weights[v][facing < -0.5] == 0).all()
        assert 0.3 < weights[v].mean() < 0.6


def test_visibility_mean_uses_only_seeing_views(tmp_path, tiny_loaded):
    render_dir, voxels = write_synthetic_asset(tmp_path, SHA_A, num_views=6, resolution=64, with_mesh=True)
    job = FeatureJob(SHA_A, render_dir, voxels, tmp_path / "vis.npz")
    [plain] = run_with_deadline(tiny_extractor(tiny_loaded), [FeatureJob(SHA_A, render_dir, voxels)])
    [vis] = run_with_deadline(tiny_extractor(tiny_loaded, visibility=True, sample_memory_mb=1), [job])
    assert vis.error is None
    seen = vis.features.views_seen
    assert seen.min() >= 0 and seen.max() <= 6 and 0 < seen.mean() < 6  # about half the views see a voxel
    full = seen == 6
    np.testing.assert_allclose(vis.features.mean[full], plain.features.mean[full], atol=1e-5)
    partial = (seen > 0) & (seen < 6)
    assert np.abs(vis.features.mean[partial] - plain.features.mean[partial]).max() > 0.1
    with np.load(job.output_path) as npz:
        assert bool(npz["visibility"]) and npz["views_seen"].shape == (len(seen),)


def test_visibility_needs_the_mesh(tmp_path, tiny_loaded):
    render_dir, voxels = write_synthetic_asset(tmp_path, SHA_A, num_views=2, resolution=32)
    [outcome] = run_with_deadline(tiny_extractor(tiny_loaded, visibility=True),
                                  [FeatureJob(SHA_A, render_dir, voxels)])
    assert outcome.error is not None and "mesh.ply, which does not exist" in outcome.error.reason


# ----------------------------------------------------------------------------------------------
# GPU (run through the device tool)
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_fp32_equals_trellis_and_bf16_is_close(tmp_path, official_tiny):
    tiny_loaded = load_dinov2(TINY_ARCH, str(official_tiny[1]))  # its own copy: the extractor moves it
    render_dir, voxels = write_synthetic_asset(tmp_path, SHA_A, num_views=8, resolution=128)
    reference = reference_model(TINY_ARCH, official_tiny[0]).cuda()
    _, ref_mean = trellis_reference_features(reference, render_dir, voxels, device="cuda")
    job = FeatureJob(SHA_A, render_dir, voxels)
    [fp32] = run_with_deadline(tiny_extractor(tiny_loaded, device="cuda", dtype="float32"), [job])
    [bf16] = run_with_deadline(tiny_extractor(tiny_loaded, device="cuda"), [job])
    assert np.abs(fp32.features.mean - ref_mean).max() <= 1e-4  # float32 on CUDA runs without TF32
    a, b = bf16.features.mean, fp32.features.mean
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert np.median(cosine) >= 0.999
