"""Benchmark: slatflow's extract_fields against the NeuS loop as written, side by side.

The query is a cheap analytic torus SDF, so the figures measure the extraction machinery
(point generation, query calls, copies), not a network. Each variant runs in its own
subprocess, so its peak memory (ru_maxrss, or torch.cuda.max_memory_allocated on a GPU) is
its own; the fields are compared on a subsample to show both compute the same thing.

    .venv/bin/python bench/bench_geometry.py                     # CPU: 256^3 and 512^3
    .venv/bin/python bench/bench_geometry.py --device cuda       # GPU (the lead runs it)
    .venv/bin/python bench/bench_geometry.py --mesh              # + mesh SDF / watertight mesh

The GPU run needs only numpy and torch (no skimage, PyMCubes, trimesh or libigl).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BOUND = 0.5
TORUS = (0.3, 0.1)  # major, minor radius


def torus_sdf(points):
    """Signed distance to a torus around z (numpy or torch points (P, 3))."""
    major, minor = TORUS
    if isinstance(points, np.ndarray):
        ring = np.sqrt(points[:, 0] ** 2 + points[:, 1] ** 2) - major
        return np.sqrt(ring**2 + points[:, 2] ** 2) - minor
    import torch

    ring = torch.sqrt(points[:, 0] ** 2 + points[:, 1] ** 2) - major
    return torch.sqrt(ring**2 + points[:, 2] ** 2) - minor


def neus_extract_fields(bound_min, bound_max, resolution, query_func, device):
    """NeuS's extract_fields as written (models/renderer.py), with the points made on
    `device` as NeuS's default CUDA tensor type does: 64^3 blocks, per-block meshgrid and
    concatenation, query, `.detach().cpu().numpy()`, copy into a numpy array."""
    import torch

    n = 64
    xs_all = torch.linspace(bound_min[0], bound_max[0], resolution, device=device).split(n)
    ys_all = torch.linspace(bound_min[1], bound_max[1], resolution, device=device).split(n)
    zs_all = torch.linspace(bound_min[2], bound_max[2], resolution, device=device).split(n)
    u = np.zeros([resolution] * 3, dtype=np.float32)
    with torch.no_grad():
        for xi, xs in enumerate(xs_all):
            for yi, ys in enumerate(ys_all):
                for zi, zs in enumerate(zs_all):
                    xx, yy, zz = torch.meshgrid(xs, ys, zs, indexing="ij")
                    pts = torch.cat([xx.reshape(-1, 1), yy.reshape(-1, 1), zz.reshape(-1, 1)], dim=-1)
                    val = query_func(pts).reshape(len(xs), len(ys), len(zs)).detach().cpu().numpy()
                    u[xi * n : xi * n + len(xs), yi * n : yi * n + len(ys), zi * n : zi * n + len(zs)] = val
    return u


def run_variant(variant: str, resolution: int, device: str, repeat: int, sample_path: str) -> dict:
    """One variant in this process: best time of `repeat` runs and peak memory."""
    import torch

    from slatflow.geometry import extract_fields

    lo, hi = [-BOUND] * 3, [BOUND] * 3
    cuda = device.startswith("cuda")

    def once():
        if variant == "neus":
            return neus_extract_fields(lo, hi, resolution, torus_sdf, device)
        if variant == "slatflow":
            return extract_fields(lo, hi, resolution, torus_sdf, device=device)
        if variant == "slatflow-numpy":
            return extract_fields(lo, hi, resolution, torus_sdf)
        if variant.startswith("slatflow-chunk"):
            return extract_fields(
                lo, hi, resolution, torus_sdf, chunk=int(variant[len("slatflow-chunk") :]), device=device
            )
        raise ValueError(variant)

    times = []
    if cuda:
        once()  # CUDA context and kernels warm
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    field = None
    for _ in range(repeat):
        field = None  # free the previous run's field before the next one allocates its own
        start = time.perf_counter()
        field = once()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    np.save(sample_path, field[::7, ::7, ::7])
    result = {
        "seconds": min(times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "field_mb": field.nbytes / 2**20,
    }
    if cuda:
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def baseline_rss_mb(device: str) -> float:
    """Peak RSS of a process that only imports what the variants import."""
    code = (
        "import resource, torch, numpy, slatflow.geometry\n"
        + ("torch.zeros(1, device='cuda')\n" if device.startswith("cuda") else "")
        + "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def bench_fields(resolutions, device: str, repeat: int, rounds: int, threads: int) -> None:
    """Each variant in its own subprocess, the variants interleaved over `rounds` rounds (a
    shared machine's load then weighs on all alike); best time and largest memory kept."""
    variants = ["neus", "slatflow", "slatflow-chunk128"]
    if not device.startswith("cuda"):
        variants.append("slatflow-numpy")
    base = baseline_rss_mb(device)
    print(
        f"extract_fields, torus SDF, device={device}, torch threads={threads}, "
        f"best of {rounds} rounds x {repeat} runs"
    )
    print(
        f"(memory: peak RSS above an import-only process, {base:.0f} MB, "
        "less the field itself, R^3 x 4 bytes)"
    )
    header = f"{'R':>5} {'variant':>18} {'seconds':>9} {'vs NeuS':>8} {'extra RSS MB':>13} {'field MB':>9}"
    if device.startswith("cuda"):
        header += f" {'peak GPU MB':>12}"
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        for resolution in resolutions:
            results: dict[str, dict] = {}
            for _ in range(rounds):
                for variant in variants:
                    sample = os.path.join(tmp, f"{variant}-{resolution}.npy")
                    cmd = [
                        sys.executable,
                        __file__,
                        "--worker",
                        variant,
                        "--resolution",
                        str(resolution),
                        "--device",
                        device,
                        "--repeat",
                        str(repeat),
                        "--sample",
                        sample,
                        "--threads",
                        str(threads),
                    ]
                    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
                    if out.returncode:
                        raise SystemExit(f"{variant} at {resolution}^3 failed:\n{out.stderr}")
                    run = json.loads(out.stdout.strip().splitlines()[-1])
                    best = results.setdefault(variant, run)
                    for key, value in run.items():
                        best[key] = min(best[key], value) if key == "seconds" else max(best[key], value)
                    best["sample"] = np.load(sample)
            for variant, r in results.items():
                diff = float(np.abs(r["sample"] - results["neus"]["sample"]).max())
                line = (
                    f"{resolution:>5} {variant:>18} {r['seconds']:>9.3f} "
                    f"{results['neus']['seconds'] / r['seconds']:>7.2f}x "
                    f"{r['peak_rss_mb'] - base - r['field_mb']:>13.0f} {r['field_mb']:>9.0f}"
                )
                if "peak_gpu_mb" in r:
                    line += f" {r['peak_gpu_mb']:>12.0f}"
                print(line + f"   max |diff| vs NeuS {diff:.1e}", flush=True)


def bench_mesh(threads: int) -> None:
    """Mesh SDF on a grid: slatflow's truncated MeshSDF (exact distance in a band, winding
    number sign everywhere) against libigl's signed_distance with fast-winding-number sign
    on every point; then the whole watertight-mesh step and marching cubes alone."""
    import igl
    import trimesh

    from slatflow import geometry

    print(f"\nmesh SDF, icosphere r=0.4, torch/numpy threads={threads}")
    for subdivisions in (4, 6):
        sphere = trimesh.creation.icosphere(subdivisions=subdivisions, radius=0.4)
        vertices, faces = np.asarray(sphere.vertices), np.asarray(sphere.faces, dtype=np.int64)
        for resolution in (128,):
            lo, hi = geometry.padded_unit_cube_grid(resolution, 2)
            spacing = (hi[0] - lo[0]) / (resolution - 1)

            def full_igl(points):
                s, _, _, _ = igl.signed_distance(
                    np.asarray(points, np.float64),
                    vertices,
                    faces,
                    sign_type=igl.SIGNED_DISTANCE_TYPE_FAST_WINDING_NUMBER,
                )
                return s

            start = time.perf_counter()
            reference = geometry.extract_fields(lo, hi, resolution, full_igl, chunk=128)
            t_full = time.perf_counter() - start
            start = time.perf_counter()
            truncated = geometry.extract_fields(
                lo, hi, resolution, geometry.MeshSDF(vertices, faces, truncation=2 * spacing), chunk=128
            )
            t_trunc = time.perf_counter() - start
            near = np.abs(reference) < 2 * spacing
            err = float(np.abs(truncated[near] - reference[near]).max())
            print(
                f"  {len(faces):>7} faces, {resolution}^3: igl signed_distance(FWN) {t_full:.2f} s, "
                f"MeshSDF(truncation=2 cells) {t_trunc:.2f} s ({t_full / t_trunc:.1f}x), "
                f"max |diff| in band {err:.1e}"
            )
    sphere = trimesh.creation.icosphere(subdivisions=6, radius=0.4)
    for resolution in (128, 256):
        start = time.perf_counter()
        mesh = geometry.watertight_mesh(sphere.vertices, sphere.faces, resolution=resolution)
        print(
            f"  watertight_mesh {len(sphere.faces)} faces at {resolution}^3: "
            f"{time.perf_counter() - start:.2f} s, "
            f"{len(mesh.faces)} faces out"
        )
    field = geometry.extract_fields([-BOUND] * 3, [BOUND] * 3, 256, torus_sdf)
    for method in ("skimage", "pymcubes"):
        start = time.perf_counter()
        geometry.marching_cubes(field, 0.0, method=method)
        print(f"  marching cubes 256^3 ({method}): {time.perf_counter() - start:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--repeat", type=int, default=2, help="runs per subprocess")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of subprocesses")
    # 1 thread: on a shared 2-core box, OpenMP threads spin against other processes (2 threads
    # measured 4-5x slower than 1 under load)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--mesh", action="store_true", help="also benchmark the mesh SDF (CPU, needs libigl)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--resolution", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--sample", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(run_variant(args.worker, args.resolution, args.device, args.repeat, args.sample)))
        return
    bench_fields(args.resolutions, args.device, args.repeat, args.rounds, args.threads)
    if args.mesh:
        bench_mesh(args.threads)


if __name__ == "__main__":
    main()
