"""Benchmark of the render stage: seconds per view and per asset with Cycles on this CPU.

Configurations, one sample asset each, run one after another in one invocation:
- `trellis_reference`: TRELLIS's settings exactly as its script runs them (512^2, 128 samples
  + OIDN, persistent data off), a few views, extrapolated to 150;
- `trellis`: the same images with slatflow's runtime choices (persistent data on: the BVH
  and shaders are kept between views), a few views, extrapolated to 150, and its ratio to
  the reference;
- `no_denoise`: TRELLIS's settings without OIDN, to show the denoiser's share;
- `sample`: config/sample.yaml's render settings (12 views of 128^2 at 16 samples), all views.

Per configuration: Blender's start + import + setup (`load_s`), the first view (scene sync
included) and the mean of the others, the mesh export and what is left (process start, moving
files), and the extrapolated seconds per asset = load + first + (V-1) x mean + rest.

The CPU is shared on a development machine: the load average is recorded at start and end;
compare only figures from one run. Run from the repository root:
    .venv/bin/python bench/bench_render.py --views 3 --out bench/out/render_cpu.json

`--engine raster` measures the raster engine instead, in one run:
- `raster_stream`: a stream of assets through one `Rasterizer` (as the raster worker serves
  them): a generated 100k-triangle textured glb (trimesh, no Blender needed, so it runs on the
  GPU machine), 150 views of 512^2 each, after one warm-up asset; per asset the scene load,
  shadows, draws with read-back, the PNG writes and transforms.json, end to end;
- where bpy is installed: `blender_export`, Blender's start, import, normalization and glb +
  mesh.ply export of the same glb (CPU seconds per asset), and `sample_cycles` against
  `sample_raster`, the sample's settings with each engine on one sample asset, per view.
    .venv/bin/python bench/bench_render.py --engine raster --out bench/out/render_raster.json  # a GPU
    .venv/bin/python bench/bench_render.py --engine raster --assets 0  # this CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from render_fixtures import SAMPLE_ASSETS, sha256_of  # noqa: E402
from slatflow.render import (  # noqa: E402
    RenderAsset,
    RenderSettings,
    render_views,
    rasterize_exported_scene,
    trellis_views,
)

logger = logging.getLogger("bench_render")

TRELLIS_VIEWS = 150


def sample_render_settings() -> dict:
    return yaml.safe_load((REPO / "config" / "sample.yaml").read_text())["render"]


def configurations(views: int, threads: int) -> dict[str, tuple[RenderSettings, int]]:
    """name -> (settings, views that count for a full asset)."""
    trellis = RenderSettings(num_views=views, threads=threads, timeout_s=7200)
    sample = RenderSettings.from_config(sample_render_settings(), threads=threads, timeout_s=7200)
    return {
        "trellis_reference": (dataclasses.replace(trellis, persistent_data=False), TRELLIS_VIEWS),
        "trellis": (trellis, TRELLIS_VIEWS),
        "no_denoise": (dataclasses.replace(trellis, denoise=False), TRELLIS_VIEWS),
        "sample": (sample, sample.num_views),
    }


def measure(asset: RenderAsset, settings: RenderSettings, full_views: int, work: Path) -> dict:
    before = os.times()
    started = time.monotonic()
    [result] = render_views([asset], work, settings)
    wall = time.monotonic() - started
    after = os.times()
    if result.error is not None:
        raise result.error
    views = list(result.view_seconds)
    first, others = views[0], views[1:] or views
    mean_other = statistics.mean(others)
    rest = result.seconds - result.load_seconds - sum(views)
    cpu = (after.children_user + after.children_system) - (before.children_user + before.children_system)
    per_asset = result.load_seconds + first + (full_views - 1) * mean_other + rest
    return {
        "device": result.device,
        "resolution": settings.resolution,
        "samples": settings.samples,
        "denoise": settings.denoise,
        "persistent_data": settings.persistent_data,
        "views_rendered": len(views),
        "load_s": round(result.load_seconds, 2),
        "first_view_s": round(first, 4),
        "mean_view_s": round(mean_other, 4),
        "rest_s": round(rest, 2),
        "views_per_asset": full_views,
        "seconds_per_asset": round(per_asset, 1),
        "extrapolated": len(views) < full_views,
        "wall_s": round(wall, 1),
        "child_cpu_s": round(cpu, 1),
        # CPU time is what a shared machine cannot blur: per view, Blender's start included
        "cpu_s_per_view": round(cpu / len(views), 2),
    }


def textured_glb(path: Path, triangles: int = 100_000, texture_size: int = 1024) -> int:
    """Write a UV sphere of about `triangles` triangles with a seeded texture of smooth colour
    patches and fine stripes (per-texel noise would make PNG encoding, not drawing, the
    measure: it does not compress); returns its triangle count."""
    import trimesh
    from PIL import Image

    rings = max(int(np.sqrt(triangles / 4)), 3)  # uv_sphere makes 4 x rings^2 triangles
    sphere = trimesh.creation.uv_sphere(radius=0.5, count=[rings, rings])
    x, y, z = sphere.vertices.T
    uv = np.stack([np.arctan2(y, x) / (2 * np.pi) + 0.5, np.arccos(np.clip(z / 0.5, -1, 1)) / np.pi], 1)
    rng = np.random.default_rng(0)
    patches = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).resize(
        (texture_size, texture_size), Image.BILINEAR)
    stripes = (np.arange(texture_size) // 8 % 2 * 40).astype(np.uint8)[None, :, None]  # (1, W, 1)
    texels = np.clip(np.asarray(patches, np.int16) - stripes, 0, 255).astype(np.uint8)
    material = trimesh.visual.material.PBRMaterial(baseColorTexture=Image.fromarray(texels), roughnessFactor=0.6,
                                                   metallicFactor=0.0)
    sphere.visual = trimesh.visual.TextureVisuals(uv=uv, material=material)
    sphere.export(path)
    return len(sphere.faces)


def raster_stream(glb: Path, assets: int, work: Path) -> dict:
    """End-to-end seconds per asset of 150 views at 512^2 through one Rasterizer."""
    from slatflow import raster

    settings = RenderSettings(engine="RASTER")
    rasterizer = raster.Rasterizer(raster.RasterOptions(**settings.raster_options()))
    rasterize = lambda request: raster.render_scene(rasterizer, request)  # noqa: E731
    per_asset, parts = [], []
    for i in range(assets + 1):  # the first is the warm-up
        sha256 = f"{i:064x}"
        views, extra = trellis_views(sha256, settings.num_views, settings.radius, settings.fov)
        job = {"sha256": sha256, "scene_path": str(glb), "resolution": settings.resolution,
               "output_dir": str(work / sha256), "transforms_extra": extra}
        started = time.perf_counter()
        result = rasterize_exported_scene(job, {"scale": 1.0, "offset": [0, 0, 0]}, views, settings, rasterize)
        if i:
            per_asset.append(time.perf_counter() - started)
            parts.append(result)
    rasterizer.close()
    mean = statistics.mean(per_asset)
    return {
        "device": rasterizer.device,
        "views": settings.num_views,
        "resolution": settings.resolution,
        "msaa_samples": settings.raster_samples,
        "assets_timed": assets,
        "seconds_per_asset": round(mean, 3),
        "seconds_per_asset_min": round(min(per_asset), 3),
        "ms_per_view": round(1000 * mean / settings.num_views, 2),
        "png_bytes_per_asset": sum(p.stat().st_size for p in (work / f"{1:064x}").glob("*.png")),
    }


def raster_figures(args) -> dict:
    figures = {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="bench_raster_") as work:
        glb = Path(work) / "textured.glb"
        figures["triangles"] = textured_glb(glb, args.triangles)
        if args.assets:
            figures["raster_stream"] = raster_stream(glb, args.assets, Path(work) / "stream")
            logger.info("raster_stream: %s", figures["raster_stream"])
        try:
            import bpy  # noqa: F401
        except ImportError:
            figures["blender_export"] = "bpy is not installed here"
        else:
            export = RenderSettings(engine="RASTER", num_views=1, threads=args.threads, timeout_s=7200)
            figures["blender_export"] = measure(RenderAsset(sha256_of(glb), glb), export, 1, Path(work) / "export")
            logger.info("blender_export: %s", figures["blender_export"])
            sample = RenderSettings.from_config(sample_render_settings(), threads=args.threads, timeout_s=7200)
            asset = RenderAsset(sha256_of(args.asset), args.asset)
            raster_sample = dataclasses.replace(sample, engine="RASTER")
            measure(asset, raster_sample, raster_sample.num_views, Path(work) / "warm-up")  # a worker is warm
            for name, settings in (("sample_cycles", sample), ("sample_raster", raster_sample)):
                figures[name] = measure(asset, settings, settings.num_views, Path(work) / name)
                logger.info("%s: %s", name, figures[name])
            figures["sample_cycles_over_raster_per_view"] = round(
                figures["sample_cycles"]["mean_view_s"] / figures["sample_raster"]["mean_view_s"], 1)
    figures["loadavg_end"] = os.getloadavg()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["cycles", "raster"], default="cycles")
    parser.add_argument("--assets", type=int, default=5,
                        help="raster: assets of the stream timed after the warm-up; 0 skips it (slow on a CPU)")
    parser.add_argument("--triangles", type=int, default=100_000, help="raster: the generated glb's size")
    parser.add_argument("--asset", type=Path, default=SAMPLE_ASSETS / "crate_obj" / "crate.obj")
    parser.add_argument("--views", type=int, default=3, help="views rendered at TRELLIS settings")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--only", nargs="*", help="configurations to run (default all)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "render_cpu.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("slatflow.blender").setLevel(logging.WARNING)  # Blender's own lines
    if args.engine == "raster":
        figures = raster_figures(args)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
        print(json.dumps(figures, indent=2))
        return

    asset = RenderAsset(sha256_of(args.asset), args.asset)
    figures = {"asset": str(args.asset.relative_to(REPO)) if args.asset.is_relative_to(REPO) else str(args.asset),
               "threads": args.threads, "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="bench_render_") as work:
        for name, (settings, full_views) in configurations(args.views, args.threads).items():
            if args.only and name not in args.only:
                continue
            figures[name] = measure(asset, settings, full_views, Path(work) / name)
            logger.info("%s: %s", name, figures[name])
    figures["loadavg_end"] = os.getloadavg()
    if "trellis" in figures and "trellis_reference" in figures:
        figures["reference_over_trellis_mean_view"] = round(
            figures["trellis_reference"]["mean_view_s"] / figures["trellis"]["mean_view_s"], 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
