"""Tests of the latent stage: TRELLIS's encoders in pure PyTorch, checkpoints, stage functions.

The references here are written from TRELLIS's code (sparse_structure_vae.py,
structured_latent_vae/, modules/sparse/attention/windowed_attn.py) as naive float64 loops,
independently of slatflow.models.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from latents_fixtures import TINY_SLAT_ARGS, TINY_SS_ARGS, random_patchtokens, surface_voxels, voxel_centres
from safetensors.torch import save_file

from slatflow import errors, latents
from slatflow.errors import AssetError, ConfigError
from slatflow.io import write_points_ply
from slatflow.latents import LatentJob
from slatflow.models import checkpoint, load_encoder, names
from slatflow.models.slat_encoder import SLatEncoder, window_partition, windowed_attention
from slatflow.models.sparse_structure import SparseStructureEncoder

REPO = Path(__file__).resolve().parents[1]

# The released checkpoints' json files, as the contract and TRELLIS's configs/vae/*.json give them.
OFFICIAL_SS = {
    "name": "SparseStructureEncoder",
    "args": {
        "in_channels": 1,
        "latent_channels": 8,
        "num_res_blocks": 2,
        "num_res_blocks_middle": 2,
        "channels": [32, 128, 512],
        "use_fp16": True,
    },
}
OFFICIAL_SLAT = {
    "name": "SLatEncoder",
    "args": {
        "resolution": 64,
        "in_channels": 1024,
        "model_channels": 768,
        "latent_channels": 8,
        "num_blocks": 12,
        "num_heads": 12,
        "mlp_ratio": 4,
        "attn_mode": "swin",
        "window_size": 8,
        "use_fp16": True,
    },
}


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.inference_mode():
        yield


def tiny_config(kind: str) -> dict:
    official = OFFICIAL_SS if kind == "ss" else OFFICIAL_SLAT
    extra = TINY_SS_ARGS if kind == "ss" else TINY_SLAT_ARGS
    return {"name": official["name"], "args": {**official["args"], **extra}}


# --- the official key set --------------------------------------------------------------


def expected_ss_shapes(args: dict) -> dict[str, tuple[int, ...]]:
    """TRELLIS's SparseStructureEncoder state dict, key -> shape, from its constructor args."""
    channels, latent = args["channels"], args["latent_channels"]
    shapes = {"input_layer.weight": (channels[0], args["in_channels"], 3, 3, 3), "input_layer.bias": (channels[0],)}

    def res_block(prefix: str, c: int) -> None:
        for norm in ("norm1", "norm2"):
            shapes[f"{prefix}.{norm}.weight"] = shapes[f"{prefix}.{norm}.bias"] = (c,)
        for conv in ("conv1", "conv2"):
            shapes[f"{prefix}.{conv}.weight"] = (c, c, 3, 3, 3)
            shapes[f"{prefix}.{conv}.bias"] = (c,)

    index = 0
    for level, c in enumerate(channels):
        for _ in range(args["num_res_blocks"]):
            res_block(f"blocks.{index}", c)
            index += 1
        if level < len(channels) - 1:
            shapes[f"blocks.{index}.conv.weight"] = (channels[level + 1], c, 2, 2, 2)
            shapes[f"blocks.{index}.conv.bias"] = (channels[level + 1],)
            index += 1
    for index in range(args["num_res_blocks_middle"]):
        res_block(f"middle_block.{index}", channels[-1])
    shapes["out_layer.0.weight"] = shapes["out_layer.0.bias"] = (channels[-1],)
    shapes["out_layer.2.weight"] = (2 * latent, channels[-1], 3, 3, 3)
    shapes["out_layer.2.bias"] = (2 * latent,)
    return shapes


def expected_slat_shapes(args: dict) -> dict[str, tuple[int, ...]]:
    """TRELLIS's SLatEncoder state dict (no norm parameters, no position buffers)."""
    width, hidden = args["model_channels"], int(args["model_channels"] * args["mlp_ratio"])
    shapes = {"input_layer.weight": (width, args["in_channels"]), "input_layer.bias": (width,)}
    for i in range(args["num_blocks"]):
        for name, (out_f, in_f) in {
            "attn.to_qkv": (3 * width, width),
            "attn.to_out": (width, width),
            "mlp.mlp.0": (hidden, width),
            "mlp.mlp.2": (width, hidden),
        }.items():
            shapes[f"blocks.{i}.{name}.weight"] = (out_f, in_f)
            shapes[f"blocks.{i}.{name}.bias"] = (out_f,)
    shapes["out_layer.weight"] = (2 * args["latent_channels"], width)
    shapes["out_layer.bias"] = (2 * args["latent_channels"],)
    return shapes


def model_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def test_official_ss_key_set_and_shapes():
    model = SparseStructureEncoder(**OFFICIAL_SS["args"])
    expected = expected_ss_shapes(OFFICIAL_SS["args"])
    assert model_shapes(model) == expected
    # The contract's landmarks: blocks 0..7, downsampling convs at 2 and 5, about 59M parameters.
    assert {k for k in expected if k.endswith(".conv.weight")} == {"blocks.2.conv.weight", "blocks.5.conv.weight"}
    assert max(int(k.split(".")[1]) for k in expected if k.startswith("blocks.")) == 7
    assert 58e6 < sum(math.prod(s) for s in expected.values()) < 60e6


def test_official_slat_key_set_and_shapes():
    model = SLatEncoder(**OFFICIAL_SLAT["args"])
    assert model_shapes(model) == expected_slat_shapes(OFFICIAL_SLAT["args"])


# --- checkpoint loading ----------------------------------------------------------------------


def write_checkpoint(stem: Path, config: dict, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Write `<stem>.json` + `<stem>.safetensors` with random tensors in the official layout.

    Torso tensors are float16 (the `_fp16` checkpoints' torso), the rest float32.
    """
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, shape in shapes.items():
        tensor = torch.randn(shape, generator=generator) * 0.02
        torso = key.startswith(("blocks.", "middle_block.")) and ".norm" not in key
        tensors[key] = tensor.half() if torso else tensor
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(config))
    save_file(tensors, str(stem.with_suffix(".safetensors")))
    return tensors


@pytest.mark.parametrize("kind", ["ss", "slat"])
def test_official_checkpoint_loads_strictly_from_a_local_path(tmp_path, kind):
    config, shapes = (
        (OFFICIAL_SS, expected_ss_shapes(OFFICIAL_SS["args"]))
        if kind == "ss"
        else (OFFICIAL_SLAT, expected_slat_shapes(OFFICIAL_SLAT["args"]))
    )
    name = names.DEFAULT_NAMES[kind]
    tensors = write_checkpoint(tmp_path / "ckpts" / name, config, shapes)
    encoder = load_encoder(str(tmp_path / "ckpts" / name), kind)
    assert encoder.name == name and not encoder.random_weights
    state = encoder.model.state_dict()
    assert set(state) == set(tensors)
    for key in list(tensors)[:: max(1, len(tensors) // 10)]:
        assert torch.equal(state[key], tensors[key].float()), key


def test_checkpoint_that_does_not_match_is_a_config_error(tmp_path):
    config = tiny_config("ss")
    shapes = expected_ss_shapes(config["args"])
    write_checkpoint(tmp_path / "extra", config, {**shapes, "blocks.0.norm1.running_mean": (8,)})
    missing = dict(shapes)
    del missing["out_layer.2.bias"]
    write_checkpoint(tmp_path / "missing", config, missing)
    write_checkpoint(tmp_path / "shape", config, {**shapes, "input_layer.bias": (9,)})
    for stem, phrase in [("extra", "Unexpected key"), ("missing", "Missing key"), ("shape", "size mismatch")]:
        with pytest.raises(ConfigError, match=phrase):
            load_encoder(str(tmp_path / stem), "ss")
    (tmp_path / "wrong.json").write_text(json.dumps(tiny_config("slat")))
    (tmp_path / "wrong.safetensors").write_bytes((tmp_path / "extra.safetensors").read_bytes())
    with pytest.raises(ConfigError, match="not a ss encoder"):
        load_encoder(str(tmp_path / "wrong"), "ss")
    with pytest.raises(ConfigError, match="expected .*nothing_here.json"):
        load_encoder(str(tmp_path / "nothing_here"), "ss")


def fake_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes]) -> None:
    """huggingface_hub's cache layout for one repo at one commit, as a download leaves it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    for name, data in files.items():
        path = repo_dir / "snapshots" / commit / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def run_offline(code: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_hub_checkpoint_loads_strictly_from_the_offline_cache(tmp_path):
    config = tiny_config("slat")
    tensors = write_checkpoint(tmp_path / "src" / "slat_enc_tiny", config, expected_slat_shapes(config["args"]))
    fake_hub_cache(
        tmp_path / "hub",
        names.HUB_REPO,
        {
            f"ckpts/slat_enc_tiny.{suffix}": (tmp_path / "src" / f"slat_enc_tiny.{suffix}").read_bytes()
            for suffix in ("json", "safetensors")
        },
    )
    code = (
        "from slatflow.models import load_encoder\n"
        f"e = load_encoder('{names.HUB_REPO}/ckpts/slat_enc_tiny', 'slat')\n"
        "print(e.name, e.random_weights, float(e.model.out_layer.bias.sum()))\n"
        "try:\n"
        f"    load_encoder('{names.HUB_REPO}/ckpts/absent', 'slat')\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, str(exc).replace(' ', '_'))\n"
    )
    done = run_offline(code, tmp_path / "hub")
    assert done.returncode == 0, done.stderr
    name, random_weights, bias_sum, error, message = done.stdout.split()
    assert (name, random_weights) == ("slat_enc_tiny", "False")
    assert float(bias_sum) == pytest.approx(float(tensors["out_layer.bias"].sum()), abs=1e-6)
    assert error == "ConfigError" and "HF_HUB_OFFLINE=1" in message and "absent.json" in message


def test_random_spec_is_seeded_loud_and_named_apart(caplog):
    first = load_encoder("random", "slat", random_args=TINY_SLAT_ARGS)
    second = load_encoder("random", "slat", random_args=TINY_SLAT_ARGS)
    assert first.random_weights
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()))
    assert "RANDOM WEIGHTS" in caplog.text
    assert names.encoder_name("random", "ss") == "ss_enc_conv3d_16l8_fp16_random"
    assert names.encoder_name("random", "slat", TINY_SLAT_ARGS) == "slat_enc_swin8_B_64l8_fp16_random_custom"
    same = {"channels": [32, 128, 512], "num_res_blocks": 2}  # the schema's defaults: still the release
    assert names.encoder_name("random", "ss", same) == "ss_enc_conv3d_16l8_fp16_random"
    assert names.encoder_name("microsoft/TRELLIS-image-large/ckpts/ss_enc_conv3d_16l8_fp16", "ss") == (
        "ss_enc_conv3d_16l8_fp16"
    )


# --- naive references of TRELLIS's forward passes --------------------------------------------


def trellis_windows(coords: torch.Tensor, window_size: int, shift: int) -> list[torch.Tensor]:
    """The voxel rows of each window, computed as TRELLIS's `calc_window_partition` does."""
    shifted = coords.clone().long()
    shifted[:, 1:] += shift
    max_coords = shifted[:, 1:].max(dim=0).values.tolist()
    num_windows = [math.ceil((m + 1) / window_size) for m in max_coords]
    offset = torch.cumprod(torch.tensor([1] + num_windows[::-1]), dim=0).tolist()[::-1]
    shifted[:, 1:] //= window_size
    key = (shifted * torch.tensor(offset)).sum(dim=1)
    return [torch.nonzero(key == value).squeeze(1) for value in torch.unique(key)]


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax attention with an explicit (L, M) mask; q (L, H, C), k and v (M, H, C)."""
    scores = torch.einsum("lhc,mhc->hlm", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hlm,mhc->lhc", scores.softmax(dim=-1), v)


def sincos_embedding(positions: torch.Tensor, channels: int) -> torch.Tensor:
    freq_dim = channels // 3 // 2
    freqs = 1.0 / 10000 ** (torch.arange(freq_dim, dtype=torch.float64) / freq_dim)
    parts = []
    for axis in range(3):
        angle = positions[:, axis, None].double() * freqs
        parts += [torch.sin(angle), torch.cos(angle)]
    embed = torch.cat(parts, dim=1)
    return F.pad(embed, (0, channels - embed.shape[1]))


def reference_slat(state: dict, args: dict, feats: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """TRELLIS's SLatEncoder forward in float64, window by window."""
    w = {k: v.double() for k, v in state.items()}
    width, heads, window = args["model_channels"], args["num_heads"], args["window_size"]
    num = len(feats)
    h = feats.double() @ w["input_layer.weight"].T + w["input_layer.bias"]
    h = h + sincos_embedding(coords[:, 1:], width)
    gelu = lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))  # noqa: E731
    for i in range(args["num_blocks"]):
        p = f"blocks.{i}."
        x = F.layer_norm(h, (width,), eps=1e-6)
        qkv = (x @ w[p + "attn.to_qkv.weight"].T + w[p + "attn.to_qkv.bias"]).reshape(num, 3, heads, -1)
        out = torch.zeros(num, heads, width // heads, dtype=torch.float64)
        for rows in trellis_windows(coords, window, window // 2 * (i % 2)):
            q, k, v = qkv[rows].unbind(1)
            out[rows] = naive_attention(q, k, v, torch.ones(len(rows), len(rows), dtype=torch.bool))
        h = h + out.reshape(num, width) @ w[p + "attn.to_out.weight"].T + w[p + "attn.to_out.bias"]
        x = F.layer_norm(h, (width,), eps=1e-6)
        x = gelu(x @ w[p + "mlp.mlp.0.weight"].T + w[p + "mlp.mlp.0.bias"])
        h = h + x @ w[p + "mlp.mlp.2.weight"].T + w[p + "mlp.mlp.2.bias"]
    h = F.layer_norm(h, (width,), eps=1e-5)
    return (h @ w["out_layer.weight"].T + w["out_layer.bias"])[:, : args["latent_channels"]]


def reference_ss(state: dict, args: dict, grid: torch.Tensor) -> torch.Tensor:
    """TRELLIS's SparseStructureEncoder forward in float64 from the state dict."""
    w = {k: v.double() for k, v in state.items()}

    def norm(x, prefix):  # channel LayerNorm, eps 1e-5
        x = x.permute(0, 2, 3, 4, 1)
        x = F.layer_norm(x, x.shape[-1:], w[prefix + ".weight"], w[prefix + ".bias"], eps=1e-5)
        return x.permute(0, 4, 1, 2, 3)

    def conv(x, prefix, **kw):
        return F.conv3d(x, w[prefix + ".weight"], w[prefix + ".bias"], **kw)

    def res_block(x, p):
        h = conv(F.silu(norm(x, p + ".norm1")), p + ".conv1", padding=1)
        return x + conv(F.silu(norm(h, p + ".norm2")), p + ".conv2", padding=1)

    h = conv(grid.double(), "input_layer", padding=1)
    index = 0
    for level, _ in enumerate(args["channels"]):
        for _ in range(args["num_res_blocks"]):
            h = res_block(h, f"blocks.{index}")
            index += 1
        if level < len(args["channels"]) - 1:
            h = conv(h, f"blocks.{index}.conv", stride=2)
            index += 1
    for index in range(args["num_res_blocks_middle"]):
        h = res_block(h, f"middle_block.{index}")
    h = conv(F.silu(norm(h, "out_layer.0")), "out_layer.2", padding=1)
    return h[:, : args["latent_channels"]]


def packed_coords(*sizes_and_seeds: tuple[int, int], resolution: int = 24) -> tuple[torch.Tensor, list[np.ndarray]]:
    """(N, 4) coordinates of several surface-like assets, batch index first."""
    assets = [surface_voxels(n, resolution, seed=seed) for n, seed in sizes_and_seeds]
    coords = np.concatenate([np.concatenate([np.full((len(a), 1), b), a], 1) for b, a in enumerate(assets)])
    return torch.from_numpy(coords.astype(np.int64)), assets


@pytest.mark.parametrize("window_size,shift", [(8, 0), (8, 4), (4, 2), (None, 0)])
def test_windowed_attention_equals_masked_full_attention(window_size, shift, monkeypatch):
    coords, _ = packed_coords((600, 1), (400, 2), resolution=20)  # windows of up to ~100 voxels
    generator = torch.Generator().manual_seed(0)
    qkv = torch.randn(len(coords), 3, 4, 16, generator=generator)
    batch = coords[:, 0]
    same = batch[:, None] == batch[None, :]
    if window_size is not None:
        cell = (coords[:, 1:] + shift) // window_size
        same &= (cell[:, None, :] == cell[None, :, :]).all(-1)
    expected = naive_attention(*qkv.double().unbind(1), same)
    partition = window_partition(coords, window_size, shift)
    if window_size == 8:
        assert any(b.key_mask is not None for b in partition.buckets)  # padding is exercised
    assert torch.allclose(windowed_attention(qkv, partition).double(), expected, atol=2e-6)
    monkeypatch.setattr("slatflow.models.slat_encoder.MAX_SCORES_PER_CALL", 2**16)  # many chunks
    assert torch.allclose(windowed_attention(qkv, partition).double(), expected, atol=2e-6)


def test_window_partition_matches_trellis_windows():
    coords, _ = packed_coords((900, 3), (300, 4))
    for shift in (0, 4):
        ours = window_partition(coords, 8, shift)
        windows = {tuple(sorted(rows[rows < len(coords)].tolist())) for b in ours.buckets for rows in b.rows}
        theirs = {tuple(sorted(rows.tolist())) for rows in trellis_windows(coords, 8, shift)}
        assert windows == theirs


def test_packed_windows_are_trellis_windows_and_attend_as_the_buckets_do(monkeypatch):
    """The packed layout (flash attention's variable-length kernel, GPU only) through a
    stand-in kernel that attends window by window over the offsets, as the kernel does."""
    import torch.nn.attention.varlen

    def per_window(q, k, v, offsets, offsets_k, longest, longest_k):
        assert offsets.dtype == torch.int32 and torch.equal(offsets, offsets_k) and longest == longest_k
        bounds = offsets.tolist()
        assert max(b - a for a, b in zip(bounds, bounds[1:])) == longest
        parts = [F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
                 for a, b in zip(bounds, bounds[1:])]
        return torch.cat(parts)

    monkeypatch.setattr(torch.nn.attention.varlen, "varlen_attn", per_window)
    coords, _ = packed_coords((900, 3), (300, 4))
    qkv = torch.randn(len(coords), 3, 4, 16, generator=torch.Generator().manual_seed(0))
    for shift in (0, 4):
        packed = window_partition(coords, 8, shift, packed=True)
        order, bounds = packed.packed.order, packed.packed.offsets.tolist()
        windows = {tuple(sorted(order[a:b].tolist())) for a, b in zip(bounds, bounds[1:])}
        assert windows == {tuple(sorted(rows.tolist())) for rows in trellis_windows(coords, 8, shift)}
        assert torch.equal(order[packed.packed.inverse], torch.arange(len(coords)))
        expected = windowed_attention(qkv, window_partition(coords, 8, shift))
        assert torch.allclose(windowed_attention(qkv, packed), expected, atol=1e-6)


def seeded_slat_case(seed: int, *sizes: int) -> tuple[SLatEncoder, torch.Tensor, torch.Tensor, list[np.ndarray]]:
    """A tiny random SLat encoder and packed inputs of assets of `sizes` voxels."""
    torch.manual_seed(seed)
    model = SLatEncoder(**tiny_config("slat")["args"]).eval()
    coords, assets = packed_coords(*((n, seed * 10 + i) for i, n in enumerate(sizes)))
    feats = torch.randn(len(coords), TINY_SLAT_ARGS["in_channels"])
    return model, coords, feats, assets


def test_slat_encoder_matches_naive_trellis_reference():
    model, coords, feats, _ = seeded_slat_case(1, 600, 400)
    ours = model(feats, coords)
    assert ours.dtype == torch.float32 and ours.shape == (len(coords), 8)
    expected = reference_slat(model.state_dict(), tiny_config("slat")["args"], feats, coords)
    assert torch.allclose(ours.double(), expected, atol=1e-5, rtol=1e-5)


def test_slat_latent_does_not_depend_on_voxel_order_or_packing():
    model, coords, feats, assets = seeded_slat_case(2, 800, 500)
    base = model(feats, coords)
    perm = torch.randperm(len(coords), generator=torch.Generator().manual_seed(0))  # interleaves assets
    assert torch.allclose(model(feats[perm], coords[perm]), base[perm], atol=1e-6)
    first = len(assets[0])
    alone = model(feats[first:], coords[first:] * torch.tensor([0, 1, 1, 1]))
    assert torch.allclose(alone, base[first:], atol=1e-6)


def test_sparse_structure_encoder_matches_naive_trellis_reference():
    config = tiny_config("ss")
    torch.manual_seed(3)
    model = SparseStructureEncoder(**config["args"]).eval()
    grids = [latents.voxel_occupancy(surface_voxels(1500, 32, seed=s), 32) for s in (1, 2)]
    grid = torch.from_numpy(np.stack(grids))  # (2, 1, 32, 32, 32): any side divisible by 4 works
    ours = model(grid)
    assert ours.shape == (2, 8, 8, 8, 8) and ours.dtype == torch.float32
    expected = reference_ss(model.state_dict(), config["args"], grid)
    assert torch.allclose(ours.double(), expected, atol=1e-5, rtol=1e-4)


def test_half_torso_casts_only_torso_linears_and_convs():
    ss = SparseStructureEncoder(**tiny_config("ss")["args"])
    ss.set_torso_dtype(torch.float16)
    dtypes = {k: v.dtype for k, v in ss.state_dict().items()}
    assert dtypes["input_layer.weight"] == dtypes["out_layer.2.weight"] == dtypes["out_layer.0.weight"] == torch.float32
    assert dtypes["blocks.0.conv1.weight"] == dtypes["blocks.1.conv.weight"] == torch.float16
    assert dtypes["blocks.0.norm1.weight"] == dtypes["middle_block.0.norm2.bias"] == torch.float32
    slat = SLatEncoder(**tiny_config("slat")["args"])
    slat.set_torso_dtype(torch.bfloat16)
    dtypes = {k: v.dtype for k, v in slat.state_dict().items()}
    assert dtypes["input_layer.weight"] == dtypes["out_layer.weight"] == torch.float32
    assert dtypes["blocks.3.attn.to_qkv.weight"] == dtypes["blocks.0.mlp.mlp.2.bias"] == torch.bfloat16


def test_bf16_torso_stays_close_to_fp32():
    model, coords, feats, _ = seeded_slat_case(4, 500)
    full = model(feats, coords)
    model.set_torso_dtype(torch.bfloat16)
    half = model(feats, coords)
    assert half.dtype == torch.float32
    assert (half - full).abs().max() / full.abs().max() < 0.05


# --- the stage -------------------------------------------------------------------------------


def test_voxel_indices_follow_trellis_rounding_and_axes():
    indices = surface_voxels(2000, seed=11)
    centres = voxel_centres(indices)
    trellis = ((torch.tensor(centres) + 0.5) * 64).int().numpy()  # encode_ss_latent.get_voxels
    ours = latents.voxel_indices_from_points("a" * 64, centres)
    assert np.array_equal(ours, trellis) and np.array_equal(ours, indices)
    grid = latents.voxel_occupancy(ours)
    assert grid.shape == (1, 64, 64, 64) and grid.sum() == len(indices)
    x, y, z = indices[0]
    assert grid[0, x, y, z] == 1
    with pytest.raises(AssetError, match="outside the 64\\^3 grid"):
        latents.voxel_indices_from_points("b" * 64, centres + 0.6)
    with pytest.raises(AssetError, match="NaN or inf"):
        latents.voxel_indices_from_points("b" * 64, np.full((3, 3), np.nan, dtype=np.float32))


def test_encode_ss_latents_writes_means_and_names_bad_assets(tmp_path):
    encoder = load_encoder("random", "ss", random_args=TINY_SS_ARGS)
    jobs, good = [], {}
    for i, seed in enumerate((21, 22, 23)):
        sha = f"{i:064x}"
        good[sha] = surface_voxels(1500 + 500 * i, seed=seed)
        write_points_ply(tmp_path / "voxels" / f"{sha}.ply", voxel_centres(good[sha]))
        jobs.append(LatentJob(sha, tmp_path / "voxels" / f"{sha}.ply", tmp_path / "ss" / f"{sha}.npz"))
    (tmp_path / "voxels" / "garbage.ply").write_bytes(b"not a ply")
    write_points_ply(tmp_path / "voxels" / "empty.ply", np.zeros((0, 3)))
    write_points_ply(tmp_path / "voxels" / "outside.ply", np.full((4, 3), 0.75))
    bad = {name: LatentJob(name, tmp_path / "voxels" / f"{name}.ply", tmp_path / "ss" / f"{name}.npz") for name in ("garbage", "empty", "outside")}
    order = [bad["garbage"], *jobs[:2], bad["empty"], bad["outside"], jobs[2]]
    outcomes = latents.encode_ss_latents(order, encoder, device="cpu", batch_size=2)
    assert [outcome.sha256 for outcome in outcomes] == [job.sha256 for job in order]  # one per job, in order
    failures = errors.failures(outcomes)
    assert set(failures) == set(bad)
    assert "unreadable voxel file" in failures["garbage"].reason
    assert "expected (N>0, 3)" in failures["empty"].reason
    assert "outside the 64^3 grid" in failures["outside"].reason
    assert not any((tmp_path / "ss" / f"{name}.npz").exists() for name in bad)
    for job in jobs:
        with np.load(job.output) as data:
            assert set(data.files) == {"mean", "random_weights"} and bool(data["random_weights"])
            mean = data["mean"]
        with zipfile.ZipFile(job.output) as archive:  # deflate members of stored blocks (LATENT_DEFLATE_LEVEL)
            info = archive.getinfo("mean.npy")
            assert info.compress_type == zipfile.ZIP_DEFLATED and info.compress_size > info.file_size
        assert mean.dtype == np.float32 and mean.shape == (8, 16, 16, 16)
        direct = encoder.model(torch.from_numpy(latents.voxel_occupancy(good[job.sha256]))[None])[0]
        assert np.allclose(mean, direct.numpy(), atol=1e-5)  # oneDNN picks kernels by batch size


def test_worker_requests_arriving_together_share_a_forward_pass():
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    calls, gate = [], threading.Event()

    def forward(batch):
        calls.append([item for _, item in batch])
        gate.wait(10)  # the first request holds the device while the others arrive
        return [np.full(2, float(item)) for _, item in batch]

    codec = latents._Codec("ss_latent", read=None, size_of=lambda item: 1, budget=3, forward=forward,
                           pack=None, describe=str, random_weights=False)
    batcher = latents._RequestBatcher(codec)
    jobs = [LatentJob(f"{i:064x}", Path("in"), Path("out")) for i in range(5)]
    with ThreadPoolExecutor(5) as pool:
        first = pool.submit(batcher.encode, jobs[0], 0)
        while not calls:
            time.sleep(0.01)
        rest = [pool.submit(batcher.encode, job, i) for i, job in enumerate(jobs[1:], 1)]
        time.sleep(0.3)
        gate.set()
        results = [f.result(timeout=10) for f in [first, *rest]]
    assert [r.tolist() for r in results] == [[float(i)] * 2 for i in range(5)]
    assert [len(c) for c in calls] == [1, 3, 1], "the waiting requests went in batches of the budget"
    assert sorted(sum(calls, [])) == list(range(5))


def test_ss_worker_service_from_threads_writes_what_a_batch_run_writes(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    settings = {"latents": {"ss_encoder": "random", "random_ss_args": TINY_SS_ARGS, "device": "cpu"}, "threads": 1}
    handle = latents.ss_worker_service(settings)
    assert handle.concurrency > 1
    requests = []
    for i, seed in enumerate((31, 32, 33)):
        sha = f"{i:064x}"
        write_points_ply(tmp_path / "voxels" / f"{sha}.ply", voxel_centres(surface_voxels(800 + 300 * i, seed=seed)))
        requests.append({"sha256": sha, "source": str(tmp_path / "voxels" / f"{sha}.ply"),
                         "output": str(tmp_path / "worker" / f"{sha}.npz")})
    (tmp_path / "voxels" / "garbage.ply").write_bytes(b"not a ply")
    bad = {"sha256": "garbage", "source": str(tmp_path / "voxels" / "garbage.ply"), "output": str(tmp_path / "g.npz")}

    def serve(request):  # a job's side: it reads the voxels and writes the latent the worker returns
        try:
            latents.run_latent_job("ss", LatentJob.from_request(request), handle)
        except AssetError as exc:
            return exc.reason

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(serve, [*requests, bad]))
    assert outcomes[:3] == [None] * 3 and "unreadable voxel file" in outcomes[3]
    encoder = load_encoder("random", "ss", random_args=TINY_SS_ARGS)
    jobs = [LatentJob(r["sha256"], Path(r["source"]), tmp_path / "batch" / f"{r['sha256']}.npz") for r in requests]
    assert errors.failures(latents.encode_ss_latents(jobs, encoder, device="cpu")) == {}
    for request, job in zip(requests, jobs):
        with np.load(request["output"]) as ours, np.load(job.output) as reference:
            assert ours["mean"].dtype == np.float32 and bool(ours["random_weights"])
            np.testing.assert_allclose(ours["mean"], reference["mean"], atol=1e-5)


def test_slat_jobs_read_their_features_and_the_worker_returns_what_a_batch_run_writes(tmp_path):
    """A SLat job reads its feature file and sends it; the worker checks the width the encoder
    reads and the finiteness, encodes, and returns the arrays the job writes."""
    from concurrent.futures import ThreadPoolExecutor

    channels = TINY_SLAT_ARGS["in_channels"]
    settings = {"latents": {"slat_encoder": "random", "random_slat_args": TINY_SLAT_ARGS, "device": "cpu"}, "threads": 1}
    handle = latents.slat_worker_service(settings)
    tokens = {"good0": random_patchtokens(400, channels, seed=1), "good1": random_patchtokens(700, channels, seed=2),
              "narrow": random_patchtokens(400, channels // 2, seed=3), "nan": random_patchtokens(400, channels, seed=4)}
    tokens["nan"][7, 1] = np.nan
    jobs = {}
    for i, (name, tok) in enumerate(tokens.items()):
        write_features(tmp_path / "features" / f"{name}.npz", indices=surface_voxels(len(tok), seed=10 + i), patchtokens=tok)
        jobs[name] = LatentJob(name, tmp_path / "features" / f"{name}.npz", tmp_path / "worker" / f"{name}.npz")

    def serve(job):
        try:
            latents.run_latent_job("slat", job, handle)
        except AssetError as exc:
            return exc.reason

    with ThreadPoolExecutor(4) as pool:
        outcomes = dict(zip(jobs, pool.map(serve, jobs.values())))
    assert outcomes["good0"] is None and outcomes["good1"] is None
    assert f"expected (400, {channels})" in outcomes["narrow"] and "in_channels" in outcomes["narrow"]
    assert "NaN or inf" in outcomes["nan"]
    assert not jobs["narrow"].output.exists() and not jobs["nan"].output.exists()
    encoder = load_encoder("random", "slat", random_args=TINY_SLAT_ARGS)
    batch = [dataclasses.replace(jobs[name], output=tmp_path / "batch" / f"{name}.npz") for name in ("good0", "good1")]
    assert errors.failures(latents.encode_slat_latents(batch, encoder, device="cpu")) == {}
    for job in batch:
        with np.load(jobs[job.sha256].output) as ours, np.load(job.output) as reference:
            assert sorted(ours.files) == ["coords", "feats", "random_weights"] and bool(ours["random_weights"])
            assert np.array_equal(ours["coords"], reference["coords"]) and ours["coords"].dtype == np.uint8
            np.testing.assert_allclose(ours["feats"], reference["feats"], atol=1e-5)


def write_features(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)


def test_encode_slat_latents_packs_assets_and_keeps_voxel_order(tmp_path):
    encoder = load_encoder("random", "slat", random_args=TINY_SLAT_ARGS)
    channels = TINY_SLAT_ARGS["in_channels"]
    jobs, inputs = [], {}
    for i, n in enumerate((900, 400, 1200)):
        sha = f"{i:064x}"
        inputs[sha] = (surface_voxels(n, seed=30 + i), random_patchtokens(n, channels, seed=i))
        write_features(tmp_path / "features" / f"{sha}.npz", indices=inputs[sha][0], patchtokens=inputs[sha][1])
        jobs.append(LatentJob(sha, tmp_path / "features" / f"{sha}.npz", tmp_path / "packed" / f"{sha}.npz"))
    assert errors.failures(latents.encode_slat_latents(jobs, encoder, device="cpu", max_voxels_per_batch=10_000)) == {}
    alone = [LatentJob(j.sha256, j.source, tmp_path / "alone" / j.output.name) for j in jobs]
    assert errors.failures(latents.encode_slat_latents(alone, encoder, device="cpu", max_voxels_per_batch=1)) == {}
    for job, single in zip(jobs, alone):
        indices, tokens = inputs[job.sha256]
        with np.load(job.output) as packed, np.load(single.output) as one:
            assert set(packed.files) == {"feats", "coords", "random_weights"}
            assert packed["feats"].dtype == np.float32 and packed["feats"].shape == (len(indices), 8)
            assert packed["coords"].dtype == np.uint8 and np.array_equal(packed["coords"], indices)
            assert np.allclose(packed["feats"], one["feats"], atol=1e-5)
            direct = encoder.model(
                torch.from_numpy(tokens).float(), torch.from_numpy(np.concatenate([np.zeros((len(indices), 1)), indices], 1)).long()
            )
            assert np.allclose(packed["feats"], direct.numpy(), atol=1e-5)


def test_encode_slat_latents_names_each_bad_feature_file(tmp_path):
    encoder = load_encoder("random", "slat", random_args=TINY_SLAT_ARGS)
    channels = TINY_SLAT_ARGS["in_channels"]
    idx = surface_voxels(300, seed=40)
    tok = random_patchtokens(300, channels)
    nan_tok = tok.copy()
    nan_tok[5, 3] = np.nan
    repeated = idx.copy()
    repeated[1] = repeated[0]
    cases = {
        "missing_key": ({"indices": idx}, "missing ['patchtokens']"),
        "indices_2d": ({"indices": idx[:, :2], "patchtokens": tok}, "indices have shape (300, 2), expected (N, 3)"),
        "float_indices": ({"indices": idx.astype(np.float32), "patchtokens": tok}, "indices have dtype float32"),
        "int_tokens": ({"indices": idx, "patchtokens": tok.astype(np.int32)}, "patchtokens have dtype int32"),
        "wrong_width": ({"indices": idx, "patchtokens": tok[:, :16]}, "patchtokens have shape (300, 16), expected (300, 32)"),
        "row_mismatch": ({"indices": idx, "patchtokens": tok[:200]}, "expected (300, 32)"),
        "empty": ({"indices": idx[:0], "patchtokens": tok[:0]}, "no voxels"),
        "outside": ({"indices": idx.astype(np.int16) + 64, "patchtokens": tok}, "expected [0, 64)"),
        "repeated": ({"indices": repeated, "patchtokens": tok}, "1 repeated voxel indices"),
        "nan_tokens": ({"indices": idx, "patchtokens": nan_tok}, "NaN or inf"),
    }
    jobs = []
    for name, (arrays, _) in cases.items():
        write_features(tmp_path / f"{name}.npz", **arrays)
        jobs.append(LatentJob(name, tmp_path / f"{name}.npz", tmp_path / "out" / f"{name}.npz"))
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 truncated")
    jobs.append(LatentJob("corrupt", tmp_path / "corrupt.npz", tmp_path / "out" / "corrupt.npz"))
    write_features(tmp_path / "good.npz", indices=idx, patchtokens=tok)
    jobs.append(LatentJob("good", tmp_path / "good.npz", tmp_path / "out" / "good.npz"))

    failures = errors.failures(latents.encode_slat_latents(jobs, encoder, device="cpu"))
    assert set(failures) == set(cases) | {"corrupt"}
    for name, (_, phrase) in cases.items():
        assert phrase in failures[name].reason, (name, failures[name].reason)
        assert failures[name].stage == latents.SLAT_STAGE and str(tmp_path / name) in failures[name].reason
    assert "unreadable feature file" in failures["corrupt"].reason
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.npz"]


class NanForAssetOne(torch.nn.Module):
    """A stand-in SLat model whose output is NaN for the voxels of batch item 1."""

    def forward(self, feats, coords):
        out = feats[:, :8].clone()
        out[coords[:, 0] == 1] = float("nan")
        return out


def test_non_finite_latent_fails_only_its_asset_and_random_inputs_are_flagged(tmp_path):
    real = load_encoder("random", "slat", random_args=TINY_SLAT_ARGS)
    encoder = checkpoint.LoadedEncoder("nan", "slat", NanForAssetOne(), real.config, False, "test")
    jobs = []
    for i in range(3):
        flag = {"random_weights": np.bool_(True)} if i == 2 else {}  # features of a random model
        write_features(tmp_path / f"{i}.npz", indices=surface_voxels(200, seed=i), patchtokens=random_patchtokens(200, 32), **flag)
        jobs.append(LatentJob(str(i), tmp_path / f"{i}.npz", tmp_path / "out" / f"{i}.npz"))
    failures = errors.failures(latents.encode_slat_latents(jobs, encoder, device="cpu", max_voxels_per_batch=10_000))
    assert set(failures) == {"1"} and "non-finite latent" in failures["1"].reason
    assert (tmp_path / "out" / "0.npz").exists() and (tmp_path / "out" / "2.npz").exists()
    with np.load(tmp_path / "out" / "0.npz") as data:
        assert set(data.files) == {"feats", "coords", "random_weights"} and not data["random_weights"]
    with np.load(tmp_path / "out" / "2.npz") as data:
        assert data["random_weights"]  # inherited from the feature file


def test_features_left_unchecked_by_the_reader_are_checked_in_the_forward_pass(tmp_path):
    """A CUDA encoder's reader leaves the NaN check to the device: the forward pass then fails
    that asset, naming the file and the cause, and encodes the others of its batch."""
    encoder = load_encoder("random", "slat", random_args=TINY_SLAT_ARGS)
    codec = latents._slat_codec(encoder, device="cpu")
    batch = []
    for i in range(3):
        tokens = random_patchtokens(200, 32, seed=i)
        if i == 1:
            tokens[7, 2] = np.inf
        write_features(tmp_path / f"{i}.npz", indices=surface_voxels(200, seed=i), patchtokens=tokens)
        item = latents.read_sparse_features(str(i), tmp_path / f"{i}.npz", 32, check_finite=False)
        batch.append((LatentJob(str(i), tmp_path / f"{i}.npz", tmp_path / "out" / f"{i}.npz"), item))
    assert not batch[1][1].finite_checked
    results = codec.forward(batch)
    assert isinstance(results[1], AssetError) and "NaN or inf" in results[1].reason and "1.npz" in results[1].reason
    for (job, item), result in zip(batch[::2], results[::2]):
        alone = codec.forward([(job, dataclasses.replace(item, finite_checked=True))])[0]
        assert result.shape == (200, 8) and np.isfinite(result).all()
        np.testing.assert_allclose(result, alone, atol=1e-5)  # the bad neighbour changed nothing
    with pytest.raises(AssetError, match="NaN or inf"):  # the reader's own check, on by default
        latents.read_sparse_features("1", tmp_path / "1.npz", 32)


def test_compiled_forward_pads_a_single_asset_and_falls_back_when_the_compiler_fails(caplog):
    import logging

    model = load_encoder("random", "ss", random_args=TINY_SS_ARGS).model
    grids = torch.from_numpy(np.stack([latents.voxel_occupancy(surface_voxels(300, seed=i)) for i in range(3)]))
    compiled = latents.CompiledBatchForward(model, "ss encoder")
    seen = []

    def recording(batch):  # stands in for the compiled graph: what it is called with
        seen.append(len(batch))
        return model(batch)

    compiled._compiled = recording
    with torch.inference_mode():
        reference = model(grids)
        torch.testing.assert_close(compiled(grids[:1]), reference[:1])
        torch.testing.assert_close(compiled(grids), reference)

        def broken(batch):
            raise RuntimeError("Failed to find C compiler")

        compiled._compiled = broken
        with caplog.at_level(logging.WARNING):
            torch.testing.assert_close(compiled(grids), reference)
    assert seen == [2, 3]  # one asset padded to two: no graph of its own for batch 1
    assert compiled._compiled is None and "torch.compile of the ss encoder failed (RuntimeError" in caplog.text


@pytest.mark.parametrize("serving", [True, False])
def test_only_a_model_worker_compiles_the_encoder(monkeypatch, serving):
    """A job run in-process (workers disabled) serves one asset: a compile would cost more than it."""
    from slatflow import worker

    asked, place = {}, latents.place

    def fake_place(encoder, kind, device, precision, compile=False):
        asked["compile"] = compile
        return place(encoder, kind, device, precision)

    monkeypatch.setattr(worker, "_SERVING", [serving])
    monkeypatch.setattr(latents, "place", fake_place)
    latents.ss_worker_service({"latents": {"ss_encoder": "random", "random_ss_args": TINY_SS_ARGS, "device": "cpu"},
                               "threads": 1})
    assert asked["compile"] is serving


def test_latent_stats_follow_trellis_stat_latent(tmp_path):
    rng = np.random.default_rng(0)
    paths, means, mean2s = [], [], []
    for i in range(5):
        feats = (rng.standard_normal((100 + 50 * i, 8)) * (i + 1) + i).astype(np.float32)
        means.append(feats.mean(axis=0))  # TRELLIS's stat_latent, float32 as it runs
        mean2s.append((feats**2).mean(axis=0))
        paths.append(tmp_path / "latents" / f"{i}.npz")
        write_features(paths[-1], feats=feats, coords=np.zeros((len(feats), 3), np.uint8))
    mean = np.array(means).mean(axis=0)
    std = np.sqrt(np.array(mean2s).mean(axis=0) - mean**2)
    stats = latents.write_latent_stats(paths, tmp_path / "latents" / "stats.json")
    saved = json.loads((tmp_path / "latents" / "stats.json").read_text())
    assert np.allclose(saved["mean"], mean, rtol=1e-5, atol=1e-6) and np.allclose(saved["std"], std, rtol=1e-5)
    assert saved["num_assets"] == 5 and saved["random_weights"] is False and len(saved["std"]) == 8
    assert stats.num_assets == 5

    write_features(tmp_path / "const.npz", feats=np.full((10, 8), 3.3, np.float32), random_weights=np.bool_(True))
    const = latents.compute_latent_stats([tmp_path / "const.npz"])
    assert np.all(const.std == 0) and const.random_weights
    write_features(tmp_path / "bad.npz", feats=np.zeros((10, 4), np.float32))
    with pytest.raises(AssetError, match="4 channels, others have 8"):
        latents.compute_latent_stats([paths[0], tmp_path / "bad.npz"])
    with pytest.raises(AssetError, match="unreadable latent"):
        latents.compute_latent_stats([tmp_path / "nothing.npz"])


def test_official_architectures_encode_on_cpu(tmp_path):
    """The released architectures (random weights) through the stage, as the sample run uses them."""
    indices = surface_voxels(2500, seed=50)
    sha = "c" * 64
    write_points_ply(tmp_path / "voxels" / f"{sha}.ply", voxel_centres(indices))
    write_features(tmp_path / "features" / f"{sha}.npz", indices=indices, patchtokens=random_patchtokens(2500, 1024))
    ss_job = LatentJob(sha, tmp_path / "voxels" / f"{sha}.ply", tmp_path / "ss" / f"{sha}.npz")
    slat_job = LatentJob(sha, tmp_path / "features" / f"{sha}.npz", tmp_path / "slat" / f"{sha}.npz")
    assert errors.failures(latents.encode_ss_latents([ss_job], "random", device="cpu")) == {}
    assert errors.failures(latents.encode_slat_latents([slat_job], "random", device="cpu")) == {}
    with np.load(ss_job.output) as ss, np.load(slat_job.output) as slat:
        assert ss["mean"].shape == (8, 16, 16, 16) and np.isfinite(ss["mean"]).all() and ss["mean"].std() > 0
        assert slat["feats"].shape == (2500, 8) and slat["feats"].std() > 0


def test_float16_finiteness_check_agrees_with_numpy():
    values = np.array([0.0, -0.0, 6e-8, -6e-8, 1.0, 65504.0, -65504.0, np.inf, -np.inf, np.nan], dtype=np.float16)
    for value in values:
        array = np.full((4, 3), 1.0, dtype=np.float16)
        array[2, 1] = value
        assert latents._all_finite(array) == bool(np.isfinite(array).all()), value
