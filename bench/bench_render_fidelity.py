"""Fidelity of the raster engine against Cycles at TRELLIS's settings, on the same cameras.

Every sample asset is rendered twice with `render_views`, once with Cycles (512^2, 128
samples + OIDN, Filmic: TRELLIS's settings) and once with `engine: RASTER`, with the same
few views of its sha256-offset sequence. Per view: the IoU of the alpha masks (alpha >= 128),
the PSNR of the straight RGB over the pixels both masks cover, and SSIM of the images
composited over black (scikit-image). A side-by-side sheet (Cycles above, raster below) is
written next to the figures. CPU only; Cycles takes ~40 CPU-s per view here.

    .venv/bin/python bench/bench_render_fidelity.py --views 2 --out bench/out/render_fidelity.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from render_fixtures import SAMPLE_ASSETS, SAMPLE_FILES, sha256_of  # noqa: E402
from slatflow.render import RenderAsset, RenderSettings, render_views  # noqa: E402

logger = logging.getLogger("bench_render_fidelity")

MASK_THRESHOLD = 128


def read_rgba(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGBA"))


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Mask IoU, PSNR inside both masks and SSIM over black of two uint8 (H, W, 4) images."""
    from skimage.metrics import structural_similarity

    mask_ref = reference[..., 3] >= MASK_THRESHOLD
    mask_new = candidate[..., 3] >= MASK_THRESHOLD
    union = (mask_ref | mask_new).sum()
    both = mask_ref & mask_new
    iou = float(both.sum() / union) if union else 1.0
    diff = reference[both][:, :3].astype(np.float64) - candidate[both][:, :3]  # (P, 3)
    mse = float((diff**2).mean()) if both.any() else 0.0
    psnr = 10 * math.log10(255.0**2 / mse) if mse > 0 else math.inf

    def over_black(image):
        return image[..., :3].astype(np.float64) * (image[..., 3:] / 255.0)

    ssim = structural_similarity(over_black(reference), over_black(candidate), channel_axis=2, data_range=255.0)
    return {"mask_iou": round(iou, 4), "psnr_db": round(psnr, 2), "ssim": round(float(ssim), 4)}


def sheet(pairs: list[tuple[np.ndarray, np.ndarray]], path: Path, tile: int = 256) -> None:
    """Cycles views in the top row, raster views below, over white."""
    from PIL import Image

    canvas = Image.new("RGBA", (tile * len(pairs), 2 * tile), (255, 255, 255, 255))
    for column, images in enumerate(pairs):
        for row, image in enumerate(images):
            canvas.alpha_composite(Image.fromarray(image).resize((tile, tile), Image.LANCZOS), (column * tile, row * tile))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.convert("RGB").save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--views", type=int, default=2, help="views per asset")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--assets", nargs="*", default=sorted(SAMPLE_FILES), help="sample formats to compare")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "render_fidelity.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("slatflow.blender").setLevel(logging.WARNING)

    cycles = RenderSettings(num_views=args.views, resolution=args.resolution, threads=args.threads, timeout_s=7200)
    raster = RenderSettings(num_views=args.views, resolution=args.resolution, engine="RASTER", timeout_s=7200)
    figures: dict = {"views": args.views, "resolution": args.resolution, "assets": {}}
    pairs = []
    with tempfile.TemporaryDirectory(prefix="bench_fidelity_") as work:
        for fmt in args.assets:
            source = SAMPLE_ASSETS / SAMPLE_FILES[fmt]
            asset = RenderAsset(sha256_of(source), source)
            results = {}
            for name, settings in (("cycles", cycles), ("raster", raster)):
                [result] = render_views([asset], Path(work) / name, settings)
                if result.error is not None:
                    raise result.error
                results[name] = result.out_dir
            per_view = []
            for i in range(args.views):
                reference = read_rgba(results["cycles"] / f"{i:03d}.png")
                candidate = read_rgba(results["raster"] / f"{i:03d}.png")
                per_view.append(compare(reference, candidate))
                pairs.append((reference, candidate))
            figures["assets"][SAMPLE_FILES[fmt]] = {
                key: round(statistics.mean(v[key] for v in per_view), 4) for key in per_view[0]
            } | {"views": per_view}
            logger.info("%s: %s", SAMPLE_FILES[fmt], figures["assets"][SAMPLE_FILES[fmt]])
    every = [v for a in figures["assets"].values() for v in a["views"]]
    figures["mean"] = {key: round(statistics.mean(v[key] for v in every), 4) for key in every[0]}
    figures["min"] = {key: min(v[key] for v in every) for key in every[0]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    sheet(pairs, args.out.with_suffix(".png"))
    print(json.dumps({k: figures[k] for k in ("mean", "min")}, indent=2))


if __name__ == "__main__":
    main()
