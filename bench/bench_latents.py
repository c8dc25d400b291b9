"""Benchmark of the latent encoders: ms per asset on CPU and CUDA, half-precision error.

The released architectures with seeded random weights (timings do not depend on the
values) on surface-like voxel sets (tests/latents_fixtures.py) of 5k, 20k and 32k voxels:
- SS encoder: dense 64^3 occupancy, batch 1 and a batch of several assets (GPU);
- SLat encoder: one asset per forward pass, and several packed into one (GPU), beside a
  per-window loop of SDPA calls (what a direct port of TRELLIS's varlen call does) as the
  reference, as a ratio (on CPU at the first size only, to stay within 3 minutes);
- fp16 and bf16 torsos (GPU) against fp32 on the same device: max |diff|, and max |diff|
  and RMS diff relative to the fp32 latents' max |value| and RMS.

Run from the repository root (needs torch, numpy, safetensors only):
    PYTHONPATH=. python bench/bench_latents.py --device cuda --out bench/out/latents_cuda.json
    PYTHONPATH=. python bench/bench_latents.py --device cpu --out bench/out/latents_cpu.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import slatflow.models.slat_encoder as slat_module
from slatflow.latents import exact_fp32, place_encoder, voxel_occupancy
from slatflow.models import load_encoder
from tests.latents_fixtures import random_patchtokens, surface_voxels

logger = logging.getLogger("bench_latents")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Voxels one GPU forward pass may pack (slatflow.latents.SLAT_VOXELS_PER_BATCH["cuda"]).
GPU_VOXEL_BUDGET = 4 * 32768
SS_GPU_BATCH = 8
# The per-window reference runs at the production torso dtype of each device.
REFERENCE_PRECISION = {"cuda": "fp16", "cpu": "fp32"}


def timed(fn, device: torch.device, repeats: int, warm_up: bool = True) -> tuple[float, object]:
    """Median wall seconds of `fn()` over `repeats` runs (after one warm-up run), and its last result."""
    result = fn() if warm_up else None
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def error_figures(approx: torch.Tensor, exact: torch.Tensor) -> dict[str, float]:
    diff = (approx.float() - exact.float()).abs()
    return {
        "max_abs": float(diff.max()),
        "max_rel": float(diff.max() / exact.abs().max()),
        "rms_rel": float(diff.pow(2).mean().sqrt() / exact.pow(2).mean().sqrt()),
    }


def per_window_attention(qkv: torch.Tensor, partition) -> torch.Tensor:
    """Reference: one SDPA call per window, no padding (a direct port of the varlen call)."""
    num, _, heads, channels = qkv.shape
    out = qkv.new_zeros(num, heads, channels)
    for bucket in partition.buckets:
        for rows in bucket.rows:
            rows = rows[rows < num]
            q, k, v = qkv[rows].permute(1, 2, 0, 3).unbind(0)  # 3 x (H, L, C)
            out[rows] = F.scaled_dot_product_attention(q, k, v).transpose(0, 1)
    return out


def slat_inputs(sizes: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed (feats float32 (N, 1024), coords int64 (N, 4)) of assets of `sizes` voxels."""
    feats, coords = [], []
    for b, n in enumerate(sizes):
        indices = surface_voxels(n, seed=b).astype(np.int64)
        coords.append(np.concatenate([np.full((n, 1), b), indices], axis=1))
        feats.append(random_patchtokens(n, 1024, seed=b).astype(np.float32))
    return torch.from_numpy(np.concatenate(feats)).to(device), torch.from_numpy(np.concatenate(coords)).to(device)


def bench_ss(device: torch.device, precisions: list[str], repeats: int) -> list[dict]:
    encoder = load_encoder("random", "ss")
    batch = SS_GPU_BATCH if device.type == "cuda" else 1
    grids = np.stack([voxel_occupancy(surface_voxels(20000, seed=b)) for b in range(batch)])
    grids = torch.from_numpy(grids).to(device)  # (B, 1, 64, 64, 64)
    rows, exact = [], None
    for precision in precisions:
        dtype = DTYPES[precision]
        model = place_encoder(encoder, device, dtype)
        for per_forward in sorted({1, batch}):
            with torch.inference_mode(), exact_fp32(device, dtype):
                seconds, mean = timed(lambda: model(grids[:per_forward]), device, repeats)
            row = {"encoder": "ss", "device": device.type, "precision": precision, "assets_per_forward": per_forward}
            row["ms_per_asset"] = 1000 * seconds / per_forward
            if precision == "fp32" and per_forward == 1:
                exact = mean
            elif per_forward == 1 and exact is not None:
                row["error_vs_fp32"] = error_figures(mean, exact)
            rows.append(row)
            logger.info("%s", row)
        del model
    return rows


def bench_slat(device: torch.device, sizes: list[int], precisions: list[str], repeats: int, reference: bool) -> list[dict]:
    """SLat timings per size; on CPU only the first size warms up and runs the reference (time)."""
    encoder = load_encoder("random", "slat")
    rows = []
    for position, size in enumerate(sizes):
        warm_up = device.type == "cuda" or position == 0
        exact = None
        packed = max(1, min(8, GPU_VOXEL_BUDGET // size)) if device.type == "cuda" else 1
        feats, coords = slat_inputs([size] * packed, device)
        for precision in precisions:
            dtype = DTYPES[precision]
            model = place_encoder(encoder, device, dtype)
            for per_forward in sorted({1, packed}):
                count = size * per_forward
                with torch.inference_mode(), exact_fp32(device, dtype):
                    seconds, mean = timed(lambda: model(feats[:count], coords[:count]), device, repeats, warm_up)
                row = {
                    "encoder": "slat",
                    "device": device.type,
                    "voxels": size,
                    "precision": precision,
                    "assets_per_forward": per_forward,
                    "ms_per_asset": 1000 * seconds / per_forward,
                }
                if per_forward == 1 and precision == "fp32":
                    exact = mean
                elif per_forward == 1 and exact is not None:
                    row["error_vs_fp32"] = error_figures(mean, exact)
                rows.append(row)
                logger.info("%s", row)
            if reference and precision == REFERENCE_PRECISION[device.type] and warm_up:
                original = slat_module.windowed_attention
                slat_module.windowed_attention = per_window_attention
                try:
                    with torch.inference_mode(), exact_fp32(device, dtype):
                        seconds_ref, _ = timed(lambda: model(feats[:size], coords[:size]), device, 1)
                finally:
                    slat_module.windowed_attention = original
                ours = next(r for r in rows if r["voxels"] == size and r["precision"] == precision and r["assets_per_forward"] == 1)
                ours["per_window_reference_ms"] = 1000 * seconds_ref
                ours["speedup_vs_per_window"] = ours["per_window_reference_ms"] / ours["ms_per_asset"]
                logger.info("per-window reference %s voxels %s: %.1f ms", size, precision, 1000 * seconds_ref)
            del model
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000, 32768], help="SLat voxels per asset")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs after a warm-up (default 5 GPU, 1 CPU)")
    parser.add_argument("--no-reference", action="store_true", help="skip the per-window SDPA reference")
    parser.add_argument("--skip-ss", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    repeats = args.repeats or (5 if device.type == "cuda" else 1)
    precisions = ["fp32", "fp16", "bf16"] if device.type == "cuda" else ["fp32"]
    torch.set_grad_enabled(False)
    rows = [] if args.skip_ss else bench_ss(device, precisions, repeats)
    rows += bench_slat(device, args.sizes, precisions, repeats, reference=not args.no_reference)
    environment = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
    }
    for row in rows:
        error = row.get("error_vs_fp32", {})
        extra = f"  err max_rel {error['max_rel']:.2e} rms_rel {error['rms_rel']:.2e}" if error else ""
        ref = f"  per-window ref {row['per_window_reference_ms']:.0f} ms (x{row['speedup_vs_per_window']:.1f})" if "per_window_reference_ms" in row else ""
        print(
            f"{row['encoder']:4s} {row['device']:4s} {row.get('voxels', '-'):>6} vox {row['precision']} "
            f"x{row['assets_per_forward']}/fwd: {row['ms_per_asset']:9.1f} ms/asset{extra}{ref}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"environment": environment, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
