"""Benchmark of the voxelizer against Open3D, side by side in one run, as a ratio.

For each mesh (bumpy torus of 10k, 100k and 1M triangles, a soup of triangles spanning the
grid, and the sample assets trimesh loads, normalized and clamped as the contract says):
- the median time of `slatflow.voxelize.voxelize_mesh` (numpy arrays in, sorted int32
  indices out: checks, grid, kernel, extraction) and of Open3D's
  `VoxelGrid.create_from_triangle_mesh_within_bounds` alone (its mesh built beforehand and
  its voxels left inside the VoxelGrid, which favours Open3D), in alternating order;
  `ratio` = slatflow / Open3D (below 1: slatflow is faster);
- the same voxel set is checked once per mesh (the benchmark aborts if they differ);
- file to file, one asset's whole step (`mesh.ply` -> voxel PLY): `voxelize_asset` beside
  TRELLIS's step (Open3D reads the PLY, clamp, voxelize, list the voxels, write centres);
- peak memory: one fresh process per (method, mesh) reports its resident memory before
  the voxelization and its peak during it (Linux VmHWM, reset just before the call); the
  increase is what the voxelization itself needed;
- the per-process start cost (each Snakemake job is a fresh process): wall time of a fresh
  interpreter that imports the voxelizer and voxelizes one triangle (numba loads its
  cached machine code), beside one that imports open3d and does the same.

Run from the repository root (needs numpy, numba, trimesh, open3d):
    PYTHONPATH=. nice -n 10 .venv/bin/python bench/bench_voxelize.py --out bench/out/voxelize.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from slatflow.io import write_points_ply
from slatflow.voxelize import clamp_vertices, voxelize_asset, voxelize_mesh
from tests.voxelize_fixtures import (
    bumpy_torus,
    huge_triangle_soup,
    in_grid,
    open3d_mesh,
    open3d_voxels,
    sample_asset_meshes,
    trellis_voxelize_file,
    write_mesh_ply,
)

logger = logging.getLogger("bench_voxelize")
REPO = Path(__file__).resolve().parents[1]
SYNTHETIC = ("torus-10k", "torus-100k", "torus-1M", "huge-soup-1k")


def build_mesh(name: str) -> tuple[np.ndarray, np.ndarray]:
    """A benchmark mesh by name: the synthetic ones, or `sample:<file name>`."""
    if name.startswith("sample:"):
        vertices, faces = sample_asset_meshes(REPO / "sample" / "assets")[name.removeprefix("sample:")]
        return clamp_vertices(vertices), faces
    makers = {
        "torus-10k": lambda: bumpy_torus(10_000),
        "torus-100k": lambda: bumpy_torus(100_000),
        "torus-1M": lambda: bumpy_torus(1_000_000),
        "huge-soup-1k": lambda: huge_triangle_soup(1_000, np.random.default_rng(0)),
    }
    return makers[name]()


def open3d_voxelize(mesh, resolution: int):
    import open3d as o3d

    return o3d.geometry.VoxelGrid.create_from_triangle_mesh_within_bounds(
        mesh, 1 / resolution, (-0.5, -0.5, -0.5), (0.5, 0.5, 0.5)
    )


def time_side_by_side(name: str, resolution: int, repeats: int) -> dict:
    """Median seconds of both methods on one mesh, alternating which runs first."""
    vertices, faces = build_mesh(name)
    ours = voxelize_mesh(vertices, faces, resolution)
    reference = in_grid(open3d_voxels(vertices, faces, resolution), resolution)
    if not np.array_equal(ours, reference):
        raise SystemExit(f"{name}: slatflow and Open3D voxel sets differ")
    mesh = open3d_mesh(vertices, faces)
    times: dict[str, list[float]] = {"slatflow": [], "open3d": []}
    runs = {
        "slatflow": lambda: voxelize_mesh(vertices, faces, resolution),
        "open3d": lambda: open3d_voxelize(mesh, resolution),
    }
    for repeat in range(repeats):
        order = ("slatflow", "open3d") if repeat % 2 == 0 else ("open3d", "slatflow")
        for method in order:
            start = time.perf_counter()
            runs[method]()
            times[method].append(time.perf_counter() - start)
    slatflow_s = statistics.median(times["slatflow"])
    open3d_s = statistics.median(times["open3d"])
    return {
        "mesh": name,
        "triangles": len(faces),
        "voxels": len(ours),
        "resolution": resolution,
        "repeats": repeats,
        "slatflow_s": slatflow_s,
        "open3d_s": open3d_s,
        "ratio": slatflow_s / open3d_s,
    }


def time_file_to_file(name: str, resolution: int, repeats: int, work: Path) -> dict:
    """Median seconds of one asset's whole step, mesh.ply -> voxels/<sha>.ply, both ways.

    slatflow: `voxelize_asset`; TRELLIS: Open3D reads the PLY, clamps, voxelizes, lists the
    voxels, and the centres are written with the same PLY writer.
    """
    mesh_path = write_mesh_ply(work / name.replace(":", "_") / "mesh.ply", *build_mesh(name))
    ours_path, trellis_path = work / "slatflow.ply", work / "trellis.ply"

    def trellis() -> None:
        write_points_ply(trellis_path, trellis_voxelize_file(mesh_path, resolution))

    runs = {"slatflow": lambda: voxelize_asset("bench", mesh_path, ours_path, resolution), "trellis": trellis}
    times: dict[str, list[float]] = {"slatflow": [], "trellis": []}
    for repeat in range(repeats + 1):  # the first round warms the file cache, not timed
        order = ("slatflow", "trellis") if repeat % 2 == 0 else ("trellis", "slatflow")
        for method in order:
            start = time.perf_counter()
            runs[method]()
            if repeat:
                times[method].append(time.perf_counter() - start)
    slatflow_s = statistics.median(times["slatflow"])
    trellis_s = statistics.median(times["trellis"])
    return {"file_slatflow_s": slatflow_s, "file_trellis_s": trellis_s, "file_ratio": slatflow_s / trellis_s}


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child_peak_memory(method: str, name: str, resolution: int) -> None:
    """In a fresh process: resident memory before, and its peak during, one voxelization (MiB).

    The peak (VmHWM) is reset just before the call (Linux `clear_refs` 5), so building
    the mesh does not hide what the voxelization needs.
    """
    vertices, faces = build_mesh(name)
    if method == "open3d":
        mesh = open3d_mesh(vertices, faces)
        run = lambda: open3d_voxelize(mesh, resolution)  # noqa: E731
    else:
        voxelize_mesh(np.zeros((3, 3)), np.array([[0, 1, 2]]), resolution)  # load the kernel
        run = lambda: voxelize_mesh(vertices, faces, resolution)  # noqa: E731
    Path("/proc/self/clear_refs").write_text("5")
    before = _proc_status_kib("VmRSS")
    run()
    peak = _proc_status_kib("VmHWM")
    json.dump({"before_mib": before / 1024, "after_mib": peak / 1024}, sys.stdout)


def peak_memory(method: str, name: str, resolution: int) -> dict:
    command = [sys.executable, __file__, "--child", method, name, "--resolution", str(resolution)]
    done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=900)
    rss = json.loads(done.stdout)
    return {f"{method}_peak_mib": rss["after_mib"], f"{method}_increase_mib": rss["after_mib"] - rss["before_mib"]}


STARTUP_SNIPPETS = {
    "python+numpy": "import numpy",
    "slatflow": "import numpy as np\nfrom slatflow.voxelize import voxelize_mesh\n"
    "voxelize_mesh(np.zeros((3, 3)), np.array([[0, 1, 2]]))",
    "open3d": "import numpy as np\nimport open3d as o3d\n"
    "m = o3d.geometry.TriangleMesh(o3d.utility.Vector3dVector(np.eye(3)), o3d.utility.Vector3iVector([[0, 1, 2]]))\n"
    "o3d.geometry.VoxelGrid.create_from_triangle_mesh_within_bounds(m, 1 / 64, (-.5,) * 3, (.5,) * 3)",
}


def process_start_seconds(method: str, repeats: int = 3) -> float:
    """Median wall time of a fresh interpreter that imports `method` and voxelizes a triangle.

    `slatflow-cold` is slatflow with an empty numba cache (NUMBA_CACHE_DIR): the one-off
    compilation a machine pays once; later processes load the cached machine code.
    """
    seconds = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as cache_dir:
            env = dict(os.environ)
            if method == "slatflow-cold":
                env["NUMBA_CACHE_DIR"] = cache_dir
            snippet = STARTUP_SNIPPETS[method.removesuffix("-cold")]
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", snippet], check=True, timeout=300, cwd=REPO, env=env)
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per method and mesh")
    parser.add_argument("--meshes", nargs="*", default=None, help="default: synthetic + sample assets")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-process memory runs")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "MESH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_peak_memory(*args.child, args.resolution)
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("trimesh", "slatflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    names = args.meshes
    if names is None:
        samples = sample_asset_meshes(REPO / "sample" / "assets")
        names = [*SYNTHETIC, *(f"sample:{name}" for name in samples)]
    rows = []
    work = Path(tempfile.mkdtemp(prefix="bench_voxelize_"))
    for name in names:
        repeats = args.repeats if not name.endswith("1M") else max(3, args.repeats // 2)
        row = time_side_by_side(name, args.resolution, repeats)
        row.update(time_file_to_file(name, args.resolution, repeats, work))
        if not args.no_memory:
            row.update(peak_memory("slatflow", name, args.resolution))
            row.update(peak_memory("open3d", name, args.resolution))
        rows.append(row)
        logger.info(
            "%-20s %7d tris %6d voxels | voxelize: slatflow %.4f s open3d %.4f s ratio %.3f | "
            "file to file: slatflow %.4f s trellis %.4f s ratio %.3f%s",
            name, row["triangles"], row["voxels"], row["slatflow_s"], row["open3d_s"], row["ratio"],
            row["file_slatflow_s"], row["file_trellis_s"], row["file_ratio"],
            "" if args.no_memory else " | peak +MiB slatflow %.1f open3d %.1f"
            % (row["slatflow_increase_mib"], row["open3d_increase_mib"]),
        )
    shutil.rmtree(work)
    startup = {method: process_start_seconds(method) for method in (*STARTUP_SNIPPETS, "slatflow-cold")}
    logger.info(
        "fresh process (import + one voxelization): slatflow %.2f s, open3d %.2f s "
        "(python + numpy alone: %.2f s; slatflow with an empty numba cache, compiling: %.2f s)",
        startup["slatflow"], startup["open3d"], startup["python+numpy"], startup["slatflow-cold"],
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": rows, "process_start_s": startup}, indent=2) + "\n")


if __name__ == "__main__":
    main()
