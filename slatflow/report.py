"""The quality report: one self-contained HTML page about a slatflow output root.

Built from what is on disk: metadata.csv (counts per stage, num_voxels, quality columns),
the failure records (OUT/failed), Snakemake's per-job benchmark files
(OUT/benchmarks/<rule>/<sha>.tsv, for the time per stage) and, for a sample of assets,
their renders, voxels and watertight mesh, drawn side by side. Histograms are inline SVG
and previews inline PNG (PIL), so the page needs no plotting library and no other file.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from slatflow.grid import TRELLIS_RESOLUTION, voxel_indices
from slatflow.quality import QUALITY_COLUMNS
from slatflow.stages import REPORT, STAGES, stage_of_column

logger = logging.getLogger(__name__)

PREVIEW_SIZE = 192  # pixels per preview tile
RENDER_PREVIEWS = 3  # views shown per asset, spread over the view sequence
SECTIONS = ("summary", "failures", "suspicious", "histograms", "timings", "previews", "conventions")
# a 3/4 view from above, like most of TRELLIS's views (yaw 45 degrees, pitch 30 degrees)
_VIEW_YAW, _VIEW_PITCH = math.radians(45), math.radians(30)

# (metadata column, histogram title); {resolution} is the voxel grid's side
HISTOGRAMS = [("num_voxels", "num_voxels ({resolution}^3 surface voxels)")] + [
    (column, column.replace("_", " ")) for column, _, _ in QUALITY_COLUMNS
]

_STYLE = """
body { font-family: sans-serif; margin: 24px; color: #222; }
h1 { margin-bottom: 4px; }
table { border-collapse: collapse; margin: 8px 0 16px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; font-size: 13px; }
th { background: #f0f0f0; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
.tile { text-align: center; font-size: 12px; }
.asset { border: 1px solid #ddd; padding: 8px; margin-bottom: 12px; }
.asset img { border: 1px solid #eee; margin-right: 4px; }
.bad { color: #b00; }
code { font-size: 12px; }
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def svg_histogram(values: np.ndarray, title: str, bins: int = 20, width: int = 320, height: int = 170) -> str:
    """An inline SVG histogram of finite `values`, with the range and the count."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    top, bottom, left = 22, 30, 8
    plot_w, plot_h = width - 2 * left, height - top - bottom
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
        f'<text x="{left}" y="14" font-size="12">{_e(title)} (n={len(values)})</text>',
    ]
    if len(values):
        lo, hi = float(values.min()), float(values.max())
        if hi == lo:
            lo, hi = lo - 0.5, hi + 0.5
        counts, _ = np.histogram(values, bins=bins, range=(lo, hi))
        bar_w = plot_w / bins
        for i, count in enumerate(counts):
            bar_h = plot_h * count / counts.max()
            parts.append(
                f'<rect x="{left + i * bar_w:.1f}" y="{top + plot_h - bar_h:.1f}" '
                f'width="{max(bar_w - 1, 1):.1f}" height="{bar_h:.1f}" fill="#4a7bb7">'
                f"<title>{count}</title></rect>"
            )
        parts.append(f'<text x="{left}" y="{height - 8}" font-size="11">{lo:.4g}</text>')
        parts.append(
            f'<text x="{width - left}" y="{height - 8}" font-size="11" text-anchor="end">{hi:.4g}</text>'
        )
        parts.append(
            f'<text x="{width - left}" y="14" font-size="11" text-anchor="end">max bin {counts.max()}</text>'
        )
    else:
        parts.append(
            f'<text x="{left}" y="{top + plot_h / 2}" font-size="12" fill="#888">no values yet</text>'
        )
    parts.append(
        f'<line x1="{left}" y1="{top + plot_h}" x2="{width - left}" y2="{top + plot_h}" stroke="#444"/></svg>'
    )
    return "".join(parts)


# ---------------------------------------------------------------------------------------
# Previews: orthographic point splats with a z-buffer (PIL has no 3D drawing)


def _view_rotation() -> np.ndarray:
    """float64 (3, 3): world (Z up) -> view (x right, y up, z toward the viewer)."""
    cy, sy, cp, sp = math.cos(_VIEW_YAW), math.sin(_VIEW_YAW), math.cos(_VIEW_PITCH), math.sin(_VIEW_PITCH)
    toward = np.array([cy * cp, sy * cp, sp])  # from the origin to the eye
    right = np.cross([0.0, 0.0, 1.0], toward)
    right /= np.linalg.norm(right)
    up = np.cross(toward, right)
    return np.stack([right, up, toward])


def splat_image(points: np.ndarray, normals: np.ndarray, colour: Sequence[int], size: int = PREVIEW_SIZE):
    """A PIL RGB image of shaded points (normalized frame) seen orthographically from above.

    Args:
        points: float (N, 3) in [-0.5, 0.5]^3 (a little beyond is clipped).
        normals: float (N, 3) unit normals, for Lambert shading.
        colour: RGB of a surface facing the light.
    """
    from PIL import Image

    rotation = _view_rotation()
    view = np.asarray(points, np.float64) @ rotation.T  # (N, 3)
    shade_normals = np.asarray(normals, np.float64) @ rotation.T  # (N, 3)
    scale = size / 1.8  # the unit cube's projection spans at most sqrt(3) < 1.8
    px = np.floor(view[:, 0] * scale + size / 2).astype(np.int64)
    py = np.floor(size / 2 - view[:, 1] * scale).astype(np.int64)
    keep = (px >= 0) & (px < size) & (py >= 0) & (py < size)
    px, py, depth, shade_normals = px[keep], py[keep], view[keep, 2], shade_normals[keep]
    pixel = py * size + px
    order = np.lexsort((-depth, pixel))  # per pixel, nearest to the viewer first
    first = order[np.unique(pixel[order], return_index=True)[1]]  # (P,) one point per covered pixel
    light = np.array([0.3, 0.6, 0.75])
    light /= np.linalg.norm(light)
    facing = shade_normals[first] @ light  # (P,)
    # surfaces seen from behind (an open mesh's inside) are shaded dimmer
    back = shade_normals[first, 2] < 0
    intensity = np.where(back, 0.25, 0.35 + 0.65 * np.clip(facing, 0, 1))  # (P,)
    image = np.full((size * size, 3), 250, dtype=np.uint8)
    image[pixel[first]] = np.clip(np.outer(intensity, colour), 0, 255).astype(np.uint8)
    return Image.fromarray(image.reshape(size, size, 3), "RGB")


def mesh_preview(vertices: np.ndarray, faces: np.ndarray, size: int = PREVIEW_SIZE, seed: int = 0):
    """A PIL image of a triangle mesh (area-weighted point splats, flat normals)."""
    vertices = np.asarray(vertices, np.float64)
    faces = np.asarray(faces, np.int64)
    rng = np.random.default_rng(seed)
    tri = vertices[faces]  # (F, 3, 3)
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # (F, 3)
    area = np.linalg.norm(cross, axis=1)
    count = 12 * size * size  # enough splats to cover every visible pixel several times
    face = rng.choice(len(faces), size=count, p=area / area.sum())
    u, v = rng.random(count), rng.random(count)
    flip = u + v > 1
    u[flip], v[flip] = 1 - u[flip], 1 - v[flip]
    points = (
        tri[face, 0] + u[:, None] * (tri[face, 1] - tri[face, 0]) + v[:, None] * (tri[face, 2] - tri[face, 0])
    )
    normals = cross[face] / np.maximum(area[face, None], 1e-20)
    return splat_image(points, normals, (120, 160, 230), size)


def voxel_preview(centres: np.ndarray, resolution: int = TRELLIS_RESOLUTION, size: int = PREVIEW_SIZE):
    """A PIL image of voxels drawn as cubes (points on each cube's exposed faces)."""
    idx = np.clip(voxel_indices(centres, resolution), 0, resolution - 1)  # (N, 3)
    centres = np.asarray(centres, np.float64)
    occupied = np.zeros((resolution + 2,) * 3, dtype=bool)  # with an empty ring
    occupied[tuple((idx + 1).T)] = True
    lattice = np.stack(np.meshgrid(*[np.linspace(-0.45, 0.45, 5)] * 2, indexing="ij"), -1).reshape(
        -1, 2
    )  # (25, 2)
    points, normals = [], []
    for axis in range(3):
        others = [a for a in range(3) if a != axis]
        for sign in (-1, 1):
            step = np.zeros(3, np.int64)
            step[axis] = sign
            exposed = ~occupied[tuple((idx + 1 + step).T)]  # (N,) the neighbour is empty
            base = centres[exposed]  # (E, 3)
            face_points = np.repeat(base, len(lattice), axis=0)  # (E * 25, 3)
            face_points[:, axis] += sign * 0.5 / resolution
            face_points[:, others] += np.tile(lattice, (len(base), 1)) / resolution
            points.append(face_points)
            normals.append(np.repeat(step[None].astype(np.float64), len(face_points), axis=0))
    return splat_image(np.concatenate(points), np.concatenate(normals), (240, 160, 80), size)


def render_thumbnail(path: str | os.PathLike, size: int = PREVIEW_SIZE):
    """A render composited over a light background and resized."""
    from PIL import Image

    with Image.open(path) as image:
        rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (250, 250, 250, 255))
    return Image.alpha_composite(background, rgba).convert("RGB").resize((size, size), Image.LANCZOS)


def _png_data_uri(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(image, caption: str) -> str:
    return (
        f'<div class="tile"><img src="{_png_data_uri(image)}" width="{image.width}" height="{image.height}" '
        f'alt="{_e(caption)}"/><br/>{_e(caption)}</div>'
    )


def asset_previews(sha256: str, out_dir: Path, voxel_resolution: int = TRELLIS_RESOLUTION) -> str:
    """One asset's row: a few renders, its voxels and its watertight mesh, side by side.

    A file that cannot be read (a quarantined asset's leftovers, a truncated file) becomes a
    tile that says so: one asset's file never stops the report.
    """
    from slatflow.io import read_mesh_ply, read_ply_points

    def voxel_tile(path: Path) -> str:
        centres = read_ply_points(path)
        return _img(voxel_preview(centres, voxel_resolution), f"voxels ({len(centres)})")

    def mesh_tile(path: Path) -> str:
        vertices, faces = read_mesh_ply(sha256, path, REPORT.name)
        return _img(mesh_preview(vertices, faces), f"watertight mesh ({len(faces)} faces)")

    tiles = []
    views = sorted((out_dir / "renders" / sha256).glob("[0-9][0-9][0-9].png"))
    spread = np.linspace(0, len(views) - 1, RENDER_PREVIEWS).round().astype(int) if views else []
    for path in sorted({views[i] for i in spread}):
        tiles.append(_tile_or_problem(path, lambda p: _img(render_thumbnail(p), f"render {p.stem}")))
    for path, make in ((out_dir / "voxels" / f"{sha256}.ply", voxel_tile), (out_dir / "meshes" / f"{sha256}.ply", mesh_tile)):
        if path.is_file():
            tiles.append(_tile_or_problem(path, make))
    if not tiles:
        tiles.append("<p>no renders, voxels or mesh on disk yet</p>")
    return f'<div class="grid">{"".join(tiles)}</div>'


def _tile_or_problem(path: Path, make) -> str:
    """`make(path)`, or a tile naming the file and why it cannot be drawn."""
    try:
        return make(path)
    except Exception as exc:  # noqa: BLE001 - any reader's error: the page goes on without it
        reason = " ".join(str(getattr(exc, "reason", exc)).split())[:300] or type(exc).__name__
        logger.warning("report: cannot draw %s: %s: %s", path, type(exc).__name__, reason)
        return f'<div class="tile bad">{_e(path.parent.name)}/{_e(path.name)}<br/>unreadable: {_e(reason)}</div>'


# ---------------------------------------------------------------------------------------
# The page


def _stage_counts(metadata, out_dir: Path, failures) -> list[tuple[str, int, int]]:
    """(stage, assets done, assets failed) for each stage column of metadata and each
    per-asset folder of this module's stages."""
    failed: dict[str, int] = {}
    for failure in failures:
        failed[failure.stage] = failed.get(failure.stage, 0) + 1
    rows = []
    for column in metadata.columns:
        if metadata[column].dtype != bool or column.endswith("_random_weights"):
            continue
        stage = stage_of_column(column) or column
        rows.append((column, int(metadata[column].sum()), failed.pop(stage, 0)))
    # the per-asset folders of the stages without a metadata column (meshes, sdf, quality)
    for stage in STAGES:
        if stage.columns or not (stage.folder and stage.suffix) or "/" in stage.suffix:
            continue
        path = out_dir / stage.folder
        done = sum(1 for e in os.scandir(path) if e.name.endswith(stage.suffix)) if path.is_dir() else 0
        rows.append((stage.folder, done, failed.pop(stage.name, 0)))
    rows.extend((f"({stage})", 0, count) for stage, count in sorted(failed.items()))
    return rows


def read_benchmarks(out_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """Seconds per job of each rule, from Snakemake's `benchmark:` files
    (OUT/benchmarks/<rule>/[<model>/]<sha256>.tsv, column `s`)."""
    root = Path(out_dir) / "benchmarks"
    seconds: dict[str, list[float]] = {}
    if not root.is_dir():
        return {}
    for path in sorted(root.rglob("*.tsv")):
        try:
            lines = path.read_text().splitlines()
            column = lines[0].split("\t").index("s")
            values = [float(line.split("\t")[column]) for line in lines[1:] if line.strip()]
        except (OSError, ValueError, IndexError) as exc:
            logger.warning("unreadable benchmark file %s: %s", path, exc)
            continue
        rule = path.relative_to(root).parts[0]  # model stages keep a folder per model below it
        seconds.setdefault(rule, []).extend(values)
    return {rule: np.asarray(values) for rule, values in seconds.items()}


def build_report(
    out_dir: str | os.PathLike,
    metadata: "pd.DataFrame | str | os.PathLike | None" = None,  # noqa: F821
    num_previews: int = 6,
    seed: int = 0,
    voxel_resolution: int = TRELLIS_RESOLUTION,
) -> str:
    """The report's HTML (one self-contained page).

    Args:
        out_dir: the output root (OUT).
        metadata: the metadata table (indexed by sha256) or the path of a metadata.csv;
            default OUT/metadata.csv.
        num_previews: assets drawn in the previews: suspicious ones first, then a seeded
            random sample of the others with outputs on disk.
        seed: the sample's seed.
        voxel_resolution: the voxel grid's side (`voxelize.resolution`).
    """
    import pandas as pd

    from slatflow.quarantine import load_failures

    out_dir = Path(out_dir)
    if not isinstance(metadata, pd.DataFrame):
        path = Path(metadata) if metadata else out_dir / "metadata.csv"
        metadata = pd.read_csv(path, dtype={"sha256": str}).set_index("sha256")
    failures = load_failures(out_dir)
    suspicious = metadata.get("suspicious", pd.Series("", index=metadata.index)).fillna("").astype(str)

    body = [f"<h1>slatflow quality report</h1><p>{_e(out_dir)}: {len(metadata)} assets</p>"]

    body.append('<h2 id="summary">Counts per stage</h2>')
    body.append(_table(["stage output", "done", "failed"], _stage_counts(metadata, out_dir, failures)))

    body.append(f'<h2 id="failures">Failures ({len(failures)})</h2>')
    if failures:
        body.append(
            _table(
                ["stage", "asset", "reason", "log"], ((f.stage, f.sha256, f.reason, f.log) for f in failures)
            )
        )
    else:
        body.append("<p>none</p>")

    flagged = suspicious[suspicious != ""]
    body.append(f'<h2 id="suspicious">Suspicious assets ({len(flagged)})</h2>')
    body.append(_table(["asset", "reasons"], flagged.items()) if len(flagged) else "<p>none</p>")

    body.append('<h2 id="histograms">Histograms</h2><div class="grid">')
    for column, title in HISTOGRAMS:
        values = (
            pd.to_numeric(metadata[column], errors="coerce").to_numpy() if column in metadata else np.zeros(0)
        )
        body.append(svg_histogram(values, title.format(resolution=voxel_resolution)))
    body.append("</div>")

    timings = read_benchmarks(out_dir)
    body.append('<h2 id="timings">Time per stage (Snakemake benchmark files)</h2>')
    if timings:
        rows = [
            (
                rule,
                len(s),
                f"{np.median(s):.2f}",
                f"{np.percentile(s, 90):.2f}",
                f"{s.max():.2f}",
                f"{s.sum():.1f}",
            )
            for rule, s in sorted(timings.items())
        ]
        body.append(_table(["rule", "jobs", "median s", "p90 s", "max s", "total s"], rows))
        body.append('<div class="grid">')
        body.extend(svg_histogram(s, f"{rule} seconds per job") for rule, s in sorted(timings.items()))
        body.append("</div>")
    else:
        body.append("<p>no benchmark files under benchmarks/</p>")

    chosen = _preview_assets(metadata.index, flagged.index, out_dir, num_previews, seed)
    body.append(f'<h2 id="previews">Previews ({len(chosen)} assets)</h2>')
    for sha256 in chosen:
        reasons = suspicious.get(sha256, "")
        metrics = ", ".join(
            f"{column} {metadata.at[sha256, column]:.4g}"
            for column, _, _ in QUALITY_COLUMNS
            if column in metadata and pd.notna(metadata.at[sha256, column])
        )
        header = f"<p><code>{_e(sha256)}</code> {_e(metrics)}"
        header += f' <span class="bad">{_e(reasons)}</span></p>' if reasons else "</p>"
        body.append(f'<div class="asset">{header}{asset_previews(sha256, out_dir, voxel_resolution)}</div>')

    from slatflow.quality import __doc__ as quality_doc

    convention = quality_doc.split("Surface metric convention", 1)[-1].strip() if quality_doc else ""
    body.append('<h2 id="conventions">Conventions</h2>')
    body.append(f"<p>Surface metric convention {_e(convention)}</p>")

    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"/><title>slatflow quality report</title>'
        f"<style>{_STYLE}</style></head><body>{''.join(body)}</body></html>\n"
    )


def _preview_assets(index, flagged, out_dir: Path, count: int, seed: int) -> list[str]:
    """Suspicious assets first, then a seeded sample of the others that have outputs."""
    chosen = [sha for sha in flagged if sha in index][:count]
    others = [
        sha
        for sha in index
        if sha not in chosen
        and ((out_dir / "voxels" / f"{sha}.ply").exists() or (out_dir / "renders" / sha).is_dir())
    ]
    rng = np.random.default_rng(seed)
    extra = (
        rng.choice(len(others), size=min(count - len(chosen), len(others)), replace=False) if others else []
    )
    return chosen + [others[i] for i in sorted(extra)]


def write_report(out_path: str | os.PathLike, out_dir: str | os.PathLike, **kwargs) -> None:
    """Write `build_report(out_dir, **kwargs)` to `out_path`, atomically."""
    from slatflow.io import write_text_atomic

    write_text_atomic(out_path, build_report(out_dir, **kwargs))
