"""Per-asset quality checks: how well the stage outputs agree with the source mesh.

The metrics, thresholds and record reading live here; `geometry.check_quality_asset` runs
them on an asset's files. For each asset, `quality/<sha>.json` holds
- surface metrics of the watertight mesh (`meshes/<sha>.ply`) and of a mesh rebuilt from the
  64^3 voxels (marching cubes on the voxel SDF), each against `renders/<sha>/mesh.ply`;
- render-mask coverage of `renders/<sha>/*.png` (alpha only);
- the voxel count, timings, and the reasons an asset is flagged as suspicious.

Surface metric convention (Occupancy Networks' "Chamfer-L1", Mescheder et al. 2019):
both meshes are sampled with N >= 100k area-weighted points (seeded), in the normalized
[-0.5, 0.5]^3 frame of mesh.ply. For samples A of the checked mesh and B of the reference,
    Chamfer-L1 = (mean_{a in A} d(a, ref) + mean_{b in B} d(b, checked)) / 2,
the mean of the two directed mean Euclidean (not squared) distances. With
`distance="surface"` (default) d is the exact distance to the other mesh's triangles, so
identical meshes score 0 whatever N; with `distance="samples"` it is the distance to the
other mesh's nearest sample (scipy cKDTree), the common point-cloud variant, which has a
floor of about half the sample spacing. F-score@tau = 2PR / (P + R) with precision
P = fraction of A within tau of the reference and recall R = fraction of B within tau of
the checked mesh; tau = 0.01 (1% of the unit cube's edge).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np

logger = logging.getLogger(__name__)

SURFACE_SAMPLES = 100_000  # per mesh; the floor the convention above asks for
FSCORE_THRESHOLD = 0.01  # in the unit-cube frame

# How d(point, other mesh) is measured; see the module docstring.
DistanceTo = Literal["surface", "samples"]
# (vertices float (V, 3), faces int (F, 3)), e.g. a geometry.TriangleMesh; this module does
# not import geometry, so that metadata.csv's aggregation needs no torch.
Mesh = tuple[np.ndarray, np.ndarray]


class SurfaceMetrics(NamedTuple):
    """Agreement of a checked mesh with a reference (convention in the module docstring).

    chamfer_l1: unit-cube units, 0 for identical surfaces.
    fscore, precision, recall: in [0, 1] at `threshold`.
    """

    chamfer_l1: float
    fscore: float
    precision: float
    recall: float


class MaskCoverage(NamedTuple):
    """Alpha coverage of an asset's renders.

    num_views: PNGs read.
    nonempty_fraction: fraction of views with at least one pixel of alpha > 0.
    mean_coverage: mean over views of the fraction of pixels with alpha > 0.
    """

    num_views: int
    nonempty_fraction: float
    mean_coverage: float


@dataclass(frozen=True)
class QualityThresholds:
    """Limits beyond which an asset is flagged `suspicious` (never dropped).

    Defaults are set from what a correct pipeline gives: a 256^3 watertight mesh is within
    ~0.002 Chamfer-L1 of a closed source mesh and the voxel shell within ~0.006 (half a
    voxel), every view of a normalized asset sees it, and TRELLIS trains on <= 32768 voxels.
    """

    max_chamfer_mesh: float = 0.01
    min_fscore_mesh: float = 0.9
    max_chamfer_voxels: float = 0.02
    min_fscore_voxels: float = 0.7
    min_nonempty_views: float = 1.0
    min_mask_coverage: float = 0.01
    max_num_voxels: int = 32768

    @classmethod
    def from_config(cls, section: dict) -> "QualityThresholds":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in section.items() if k in names})


def sample_surface(mesh: Mesh, count: int, rng: np.random.Generator) -> np.ndarray:
    """float64 (count, 3): points drawn uniformly by area on the mesh (trimesh's sampler)."""
    import trimesh

    surface = trimesh.Trimesh(*mesh, process=False)
    if surface.area <= 0:
        raise ValueError("the mesh has zero surface area")
    points, _ = trimesh.sample.sample_surface(surface, count, seed=rng)
    return np.asarray(points, dtype=np.float64)


def distance_to_mesh(points: np.ndarray, mesh: Mesh) -> np.ndarray:
    """float64 (P,): exact Euclidean distance from each point to the mesh's triangles."""
    import igl

    vertices = np.ascontiguousarray(mesh[0], dtype=np.float64)
    faces = np.ascontiguousarray(mesh[1], dtype=np.int64)
    tree = igl.AABB()
    tree.init(vertices, faces)
    squared, _, _ = tree.squared_distance(vertices, faces, np.ascontiguousarray(points, dtype=np.float64))
    return np.sqrt(squared)


def surface_metrics(
    checked: Mesh,
    reference: Mesh,
    num_samples: int = SURFACE_SAMPLES,
    threshold: float = FSCORE_THRESHOLD,
    rng: np.random.Generator | None = None,
    distance: DistanceTo = "surface",
) -> SurfaceMetrics:
    """Chamfer-L1 and F-score@threshold of `checked` against `reference`.

    Args:
        checked, reference: meshes in the same frame (unit cube for the defaults).
        num_samples: area-weighted samples per mesh.
        threshold: F-score distance threshold tau.
        rng: the sampler's generator; default `np.random.default_rng(0)`.
        distance: "surface" (exact point-to-triangle) or "samples" (nearest sample).
    """
    rng = np.random.default_rng(0) if rng is None else rng
    samples_checked = sample_surface(checked, num_samples, rng)  # (N, 3)
    samples_reference = sample_surface(reference, num_samples, rng)  # (N, 3)
    if distance == "surface":
        to_reference = distance_to_mesh(samples_checked, reference)  # (N,)
        to_checked = distance_to_mesh(samples_reference, checked)  # (N,)
    elif distance == "samples":
        from scipy.spatial import cKDTree

        to_reference, _ = cKDTree(samples_reference).query(samples_checked, workers=-1)
        to_checked, _ = cKDTree(samples_checked).query(samples_reference, workers=-1)
    else:
        raise ValueError(f"distance must be 'surface' or 'samples', got {distance!r}")
    precision = float(np.mean(to_reference < threshold))
    recall = float(np.mean(to_checked < threshold))
    fscore = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    chamfer = 0.5 * (float(to_reference.mean()) + float(to_checked.mean()))
    return SurfaceMetrics(chamfer, fscore, precision, recall)


def render_mask_coverage(render_dir: str | os.PathLike) -> MaskCoverage:
    """Alpha coverage of the view PNGs in `render_dir` (only the alpha band is kept)."""
    from PIL import Image

    paths = sorted(Path(render_dir).glob("*.png"))
    if not paths:
        return MaskCoverage(0, 0.0, 0.0)
    covered = []
    for path in paths:
        with Image.open(path) as image:
            if "A" not in image.getbands():
                covered.append(1.0)  # no alpha: every pixel is opaque
                continue
            alpha = np.asarray(image.getchannel("A"))  # (H, W) uint8
        covered.append(float(np.count_nonzero(alpha)) / alpha.size)
    covered = np.asarray(covered)
    return MaskCoverage(len(paths), float(np.mean(covered > 0)), float(covered.mean()))


def suspicious_reasons(record: dict, thresholds: QualityThresholds) -> list[str]:
    """The reasons, one line each, that a quality record breaks a threshold."""
    reasons = []

    def check(value: float | None, limit: float, bad: bool, text: str) -> None:
        if value is not None and bad:
            reasons.append(f"{text} {value:.4g} (limit {limit:g})")

    compared = (
        ("mesh", "watertight mesh", thresholds.max_chamfer_mesh, thresholds.min_fscore_mesh),
        ("voxels", "voxel mesh", thresholds.max_chamfer_voxels, thresholds.min_fscore_voxels),
    )
    for key, label, max_chamfer, min_fscore in compared:
        metrics = record.get(key)
        if metrics:
            check(metrics["chamfer_l1"], max_chamfer, metrics["chamfer_l1"] > max_chamfer, f"{label} Chamfer-L1")
            check(metrics["fscore"], min_fscore, metrics["fscore"] < min_fscore, f"{label} F-score@0.01")
    masks = record.get("masks")
    if masks:
        if masks["num_views"] == 0:
            reasons.append("no render PNGs to check")
        else:
            check(
                masks["nonempty_fraction"],
                thresholds.min_nonempty_views,
                masks["nonempty_fraction"] < thresholds.min_nonempty_views,
                "fraction of non-empty views",
            )
            check(
                masks["mean_coverage"],
                thresholds.min_mask_coverage,
                masks["mean_coverage"] < thresholds.min_mask_coverage,
                "mean mask coverage",
            )
    num_voxels = record.get("num_voxels")
    if num_voxels is not None and num_voxels > thresholds.max_num_voxels:
        reasons.append(
            f"num_voxels {num_voxels} above {thresholds.max_num_voxels} (TRELLIS's training filter)"
        )
    return reasons


@dataclass(frozen=True)
class QualitySettings:
    """How the checks run (config section `quality:`)."""

    num_samples: int = SURFACE_SAMPLES
    fscore_threshold: float = FSCORE_THRESHOLD
    seed: int = 0
    voxel_samples_per_voxel: int = 2
    thresholds: QualityThresholds = QualityThresholds()

    @classmethod
    def from_config(cls, section: dict) -> "QualitySettings":
        return cls(
            num_samples=section.get("num_samples", SURFACE_SAMPLES),
            fscore_threshold=section.get("fscore_threshold", FSCORE_THRESHOLD),
            seed=section.get("seed", 0),
            voxel_samples_per_voxel=section.get("voxel_samples_per_voxel", 2),
            thresholds=QualityThresholds.from_config(section.get("thresholds", {})),
        )


# metadata.csv columns: (column, record section, field)
QUALITY_COLUMNS = [
    ("mesh_chamfer_l1", "mesh", "chamfer_l1"),
    ("mesh_fscore", "mesh", "fscore"),
    ("voxel_chamfer_l1", "voxels", "chamfer_l1"),
    ("voxel_fscore", "voxels", "fscore"),
    ("mask_nonempty_fraction", "masks", "nonempty_fraction"),
    ("mask_coverage", "masks", "mean_coverage"),
]


def quality_columns(out_dir: str | os.PathLike, index) -> "pandas.DataFrame":  # noqa: F821
    """metadata.csv's quality columns for the assets of `index` (sha256), read from
    `OUT/quality/*.json`: the metrics above and `suspicious` (reasons joined by "; ",
    empty when none). Assets without a record get NaN and an empty string; without an
    OUT/quality folder (the stage never ran) there are no columns."""
    import pandas as pd

    folder = Path(out_dir) / "quality"
    if not folder.is_dir():
        return pd.DataFrame(index=index)
    present = {e.name[: -len(".json")] for e in os.scandir(folder) if e.name.endswith(".json")}
    rows = {}
    for sha256 in index:
        if sha256 not in present:
            continue
        try:
            record = json.loads((folder / f"{sha256}.json").read_text())
        except (OSError, ValueError) as exc:
            logger.warning("unreadable quality record of %s: %s", sha256, exc)
            continue
        row = {}
        for column, section, field in QUALITY_COLUMNS:
            value = (record.get(section) or {}).get(field)
            row[column] = math.nan if value is None else float(value)
        row["suspicious"] = "; ".join(record.get("suspicious", []))
        rows[sha256] = row
    columns = [c for c, _, _ in QUALITY_COLUMNS] + ["suspicious"]
    frame = pd.DataFrame.from_dict(rows, orient="index", columns=columns).reindex(index)
    frame["suspicious"] = frame["suspicious"].fillna("")
    return frame
