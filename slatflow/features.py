"""Features stage: DINOv2 patch features of the renders, averaged onto the voxels.

TRELLIS's recipe (dataset_toolkits/extract_feature.py), kept exactly: each view is opened
with PIL, resized to 518x518 LANCZOS as RGBA, scaled to [0, 1], premultiplied by alpha
(black background) and ImageNet-normalized; DINOv2's `x_prenorm` patch tokens (the last
block's output before the final LayerNorm, cls and register tokens dropped) form a
(D, 37, 37) map per view; each voxel centre is projected into every view, sampled
bilinearly (`grid_sample`, align_corners=False, zero padding) and averaged over ALL views;
the mean is stored as float16 with the voxel indices.

What differs from TRELLIS is how it runs: views are decoded by a thread pool while the GPU
runs the model (the next asset is decoded during the current one) and resized on the GPU
with integer arithmetic bit-identical to PIL's, the model runs in bf16 autocast with SDPA
attention on the GPU, the per-view samples are summed on the
device in voxel chunks (bounded memory instead of a (V, N, D) array), outputs are
compressed in background threads, and a bad asset is a one-line `AssetError`, never a hang
or a silently dropped view. An optional visibility-aware mean (off by default, since TRELLIS
averages over all views) uses depth maps rasterized from the render's `mesh.ply`.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np

from slatflow import cameras
from slatflow.dinov2 import FusedDinov2, LoadedDinov2, load_dinov2, prenorm_patch_tokens
from slatflow.errors import AssetError, AssetOutcome, ConfigError
from slatflow.feature_settings import (  # noqa: F401 - re-exported: the stage's public names
    PROVENANCE_FILE,
    TRELLIS_IMAGE_SIZE,
    FeatureSettings,
    read_random_weights_flags,
    resolve_arch,
)
from slatflow.grid import TRELLIS_RESOLUTION, outside_grid, voxel_indices
from slatflow.io import save_npz_atomic, write_json_atomic, written_by
from slatflow.logs import warn_random_weights
from slatflow.precision import exact_fp32
from slatflow.stages import FEATURES

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

STAGE = FEATURES.name
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Depth maps for the visibility test: a voxel spans about 2.8 pixels at 256^2 (FOV 40 deg,
# radius 2), fine enough to resolve voxel-scale occluders at a quarter of a 512^2 render.
VISIBILITY_DEPTH_RESOLUTION = 256
# A voxel centre lies up to half a voxel diagonal behind the surface it was made from;
# one full diagonal of slack also keeps surfaces seen up to ~60 deg off-normal visible.
VISIBILITY_DEPTH_TOLERANCE_VOXELS = math.sqrt(3)
# Requests a features worker serves at once: one asset on the device while others decode
# their views or compress their outputs (each ~1 CPU-s per asset; the workflow runs up to
# 8 model jobs side by side, rules/common.smk).
WORKER_REQUESTS_AT_ONCE = 4
_VIEW_FILE = re.compile(r"^\d+\.png$")  # the render stage's view names (000.png, ...)
_IMAGE_MODES = ("RGBA", "RGB", "LA", "L", "P")  # what PIL converts to RGBA without loss of meaning


@dataclass(frozen=True)
class FeatureJob:
    """One asset's inputs and output.

    Attributes:
        sha256: the asset's key.
        render_dir: `renders/<sha256>/` (transforms.json, the view PNGs, mesh.ply).
        voxels_path: `voxels/<sha256>.ply`.
        output_path: `features/<name>/<sha256>.npz`; None keeps the result in memory only.
    """

    sha256: str
    render_dir: Path
    voxels_path: Path
    output_path: Path | None = None

    def to_request(self) -> dict:
        """The job as a model worker's request (JSON)."""
        return {"sha256": self.sha256, "render_dir": str(self.render_dir), "voxels": str(self.voxels_path),
                "output": str(self.output_path)}

    @classmethod
    def from_request(cls, request: dict) -> "FeatureJob":
        return cls(request["sha256"], Path(request["render_dir"]), Path(request["voxels"]), Path(request["output"]))


@dataclass
class AssetFeatures:
    """The features of one asset.

    Attributes:
        indices: uint8 (N, 3), voxel grid indices (x, y, z) in [0, voxel_resolution).
        patchtokens: float16 (N, D), the mean feature of each voxel (TRELLIS's output).
        mean: float32 (N, D), the same before the float16 cast (for tests and comparisons).
        num_views: views averaged.
        views_seen: int32 (N,), views that see each voxel (visibility only, else None).
        random_weights: the model had random weights.
    """

    indices: np.ndarray
    patchtokens: np.ndarray
    mean: np.ndarray
    num_views: int
    views_seen: np.ndarray | None = None
    random_weights: bool = False


@dataclass(frozen=True, kw_only=True)
class FeatureOutcome(AssetOutcome):
    """What happened to one job: written (`error` None) or failed with a one-line reason."""

    output_path: Path | None
    seconds: float
    features: AssetFeatures | None = None


def _failed(job: FeatureJob, error: AssetError, started: float) -> FeatureOutcome:
    return FeatureOutcome(job.sha256, error, output_path=job.output_path, seconds=time.perf_counter() - started)


@dataclass(frozen=True)
class ViewFrame:
    """One view of transforms.json: its PNG and camera (TRELLIS/Blender conventions)."""

    path: Path
    c2w: np.ndarray  # float64 (4, 4), OpenGL camera-to-world
    fov: float  # camera_angle_x, radians


# ----------------------------------------------------------------------------------------------
# Inputs: transforms.json, view PNGs, voxels (CPU, run in loader threads)
# ----------------------------------------------------------------------------------------------


def read_view_frames(sha256: str, render_dir: str | os.PathLike) -> list[ViewFrame]:
    """Read and check transforms.json against the PNGs beside it.

    Raises:
        AssetError: transforms.json is missing or malformed, a frame's PNG is missing, or the
            folder holds view PNGs that no frame lists (a partial or mixed render).
    """
    render_dir = Path(render_dir)
    transforms_path = render_dir / "transforms.json"
    try:
        transforms = json.loads(transforms_path.read_text())
    except FileNotFoundError:
        raise AssetError(sha256, f"{transforms_path} does not exist (not rendered?)", STAGE) from None
    except (OSError, ValueError) as exc:
        raise AssetError(sha256, f"cannot read {transforms_path}: {exc}", STAGE) from None
    frames = transforms.get("frames") if isinstance(transforms, dict) else None
    if not isinstance(frames, list) or not frames:
        raise AssetError(sha256, f"{transforms_path} has no 'frames' list (expected one entry per view)", STAGE)
    views = [_parse_frame(sha256, frame, i, render_dir, transforms_path) for i, frame in enumerate(frames)]
    listed = [view.path.name for view in views]
    if len(set(listed)) != len(listed):
        duplicates = sorted({name for name in listed if listed.count(name) > 1})
        raise AssetError(sha256, f"{transforms_path} lists the same file twice: {duplicates[:3]}", STAGE)
    missing = [view.path.name for view in views if not view.path.is_file()]
    if missing:
        raise AssetError(
            sha256, f"{len(missing)} of {len(views)} view PNGs listed in {transforms_path} are missing "
            f"(first: {missing[:3]})", STAGE)
    unlisted = sorted(
        p.name for p in render_dir.iterdir() if _VIEW_FILE.match(p.name) and p.name not in set(listed)
    )
    if unlisted:
        raise AssetError(
            sha256, f"{render_dir} holds {len(unlisted)} view PNGs that {transforms_path.name} does not list "
            f"(first: {unlisted[:3]}); frames and files disagree", STAGE)
    return views


def _parse_frame(sha256: str, frame, index: int, render_dir: Path, transforms_path: Path) -> ViewFrame:
    where = f"{transforms_path} frame {index}"
    if not isinstance(frame, dict):
        raise AssetError(sha256, f"{where} is not an object", STAGE)
    file_path = frame.get("file_path")
    if not isinstance(file_path, str) or not file_path:
        raise AssetError(sha256, f"{where} has no file_path", STAGE)
    try:
        c2w = np.asarray(frame["transform_matrix"], dtype=np.float64)
        fov = float(frame["camera_angle_x"])
    except (KeyError, TypeError, ValueError) as exc:
        raise AssetError(sha256, f"{where}: missing or non-numeric transform_matrix/camera_angle_x ({exc})",
                         STAGE) from None
    if c2w.shape != (4, 4) or not np.isfinite(c2w).all():
        raise AssetError(sha256, f"{where}: transform_matrix must be a finite 4x4 matrix, got shape {c2w.shape}",
                         STAGE)
    if not 0 < fov < math.pi:
        raise AssetError(sha256, f"{where}: camera_angle_x {fov} is not in (0, pi) radians", STAGE)
    return ViewFrame(render_dir / file_path, c2w, fov)


def decode_view(sha256: str, path: Path, image_size: int | None) -> np.ndarray:
    """Open a view PNG and resize it as TRELLIS does (PIL LANCZOS on the RGBA image).

    PIL resizes RGBA through premultiplied RGBa and rounds to 8 bits; PIL itself, or
    `lanczos_resize_rgba`, keeps those roundings bit-identical to TRELLIS. Non-RGBA PNGs are
    converted to RGBA first (TRELLIS would fail on them).

    Args:
        image_size: the side to resize to; None returns the decoded size.

    Returns:
        uint8 (S, S, 4), straight (not premultiplied) RGBA, row 0 at the top.

    Raises:
        AssetError: the file is not a readable, square image.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            if image.mode not in _IMAGE_MODES:
                raise AssetError(sha256, f"{path}: image mode {image.mode} is not RGBA/RGB/LA/L/P", STAGE)
            if image.width != image.height:
                raise AssetError(sha256, f"{path}: view is {image.width}x{image.height}, expected square", STAGE)
            if image.mode != "RGBA":
                image = image.convert("RGBA")
            if image_size is not None:
                image = image.resize((image_size, image_size), Image.Resampling.LANCZOS)
            return np.asarray(image)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
        raise AssetError(sha256, f"cannot decode view {written_by(path)}: {type(exc).__name__}: {exc}", STAGE) from None


# PIL's 8-bit resampling (libImaging/Resample.c): coefficients in double, normalized, then
# fixed point with 22 fractional bits; each pass rounds and clips to 8 bits.
_PIL_PRECISION_BITS = 22
_LANCZOS_SUPPORT = 3.0


def _pil_lanczos(x: float) -> float:
    def sinc(t: float) -> float:
        if t == 0.0:
            return 1.0
        t = t * math.pi
        return math.sin(t) / t  # Python's math.sin is the same C library sin PIL calls

    return sinc(x) * sinc(x / 3) if -3.0 <= x < 3.0 else 0.0


@functools.lru_cache(maxsize=16)
def _pil_lanczos_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """PIL's `precompute_coeffs` + `normalize_coeffs_8bpc` for LANCZOS over [0, in_size).

    Returns:
        first: int64 (out,), first input pixel of each output pixel's taps.
        weights: int64 (out, K), fixed-point tap weights (zero past each pixel's taps).
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = _LANCZOS_SUPPORT * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    inv_filterscale = 1.0 / filterscale
    first = np.zeros(out_size, dtype=np.int64)
    weights = np.zeros((out_size, ksize), dtype=np.int64)
    for xx in range(out_size):
        center = 0.0 + (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        count = min(int(center + support + 0.5), in_size) - xmin
        taps = [_pil_lanczos((x + xmin - center + 0.5) * inv_filterscale) for x in range(count)]
        total = 0.0
        for w in taps:
            total += w
        if total != 0.0:
            taps = [w / total for w in taps]
        one = 1 << _PIL_PRECISION_BITS
        weights[xx, :count] = [int(-0.5 + w * one) if w < 0 else int(0.5 + w * one) for w in taps]
        first[xx] = xmin
    return first, weights


_DEVICE_TAPS: dict = {}  # (in, out, device) -> the taps on the device


def _device_taps(in_size: int, out_size: int, device) -> tuple["torch.Tensor", "torch.Tensor"]:
    """`_pil_lanczos_taps` on `device`, copied once: a copy from pageable memory per batch
    would make the launching thread wait for the device's queue to drain."""
    import torch

    key = (in_size, out_size, str(device))
    if key not in _DEVICE_TAPS:
        first, weights = _pil_lanczos_taps(in_size, out_size)
        _DEVICE_TAPS[key] = (torch.from_numpy(first).to(device), torch.from_numpy(weights).to(device, torch.int32))
    return _DEVICE_TAPS[key]


def _pil_resample_axis(image: "torch.Tensor", axis: int, out_size: int) -> "torch.Tensor":
    """One pass of PIL's 8-bit resampling along `axis` of an int32 image."""
    import torch

    first_t, weights_t = _device_taps(image.shape[axis], out_size, image.device)  # (out,), (out, K)
    shape = [1] * image.ndim
    shape[axis] = out_size
    acc = torch.full((), 1 << (_PIL_PRECISION_BITS - 1), dtype=torch.int32, device=image.device)
    for tap in range(weights_t.shape[1]):
        index = (first_t + tap).clamp(max=image.shape[axis] - 1)  # past-the-end taps weigh 0
        acc = acc + image.index_select(axis, index) * weights_t[:, tap].view(shape)
    return (acc >> _PIL_PRECISION_BITS).clamp(0, 255)  # int32 sums fit: |sum| < 2^31 by design


def lanczos_resize_rgba(images: "torch.Tensor", size: int) -> "torch.Tensor":
    """PIL's `Image.resize((size, size), LANCZOS)` of RGBA images, bit-identical, on any device.

    PIL resizes RGBA as premultiplied RGBa (MULDIV255 rounding), horizontal pass then
    vertical pass in fixed point with 8-bit rounding after each, then un-premultiplies with
    integer division. The same integer arithmetic runs here in torch, so the GPU resizes
    while the CPU threads only decode.

    Args:
        images: uint8 (B, H, W, 4) straight RGBA, square (H == W).
        size: output side.

    Returns:
        uint8 (B, size, size, 4).
    """
    import torch

    if images.shape[1] == images.shape[2] == size:
        return images  # PIL returns an unchanged copy
    x = images.to(torch.int32)
    alpha = x[..., 3:]
    t = x[..., :3] * alpha + 128
    x = torch.cat([((t >> 8) + t) >> 8, alpha], dim=-1)  # RGBA -> RGBa
    x = _pil_resample_axis(x, 2, size)  # (B, H, size, 4)
    x = _pil_resample_axis(x, 1, size)  # (B, size, size, 4)
    alpha = x[..., 3:]
    partial = (alpha > 0) & (alpha < 255)
    straight = torch.div(255 * x[..., :3], alpha.clamp(min=1), rounding_mode="floor").clamp(max=255)
    rgb = torch.where(partial, straight, x[..., :3])  # RGBa -> RGBA
    return torch.cat([rgb, alpha], dim=-1).to(torch.uint8)


def load_voxels(sha256: str, path: str | os.PathLike, resolution: int = TRELLIS_RESOLUTION) -> np.ndarray:
    """Read voxel centres and check they lie in the resolution^3 grid.

    Returns:
        float32 (N, 3), voxel centres in the normalized [-0.5, 0.5]^3 frame, Z up.

    Raises:
        AssetError: the file is missing or unreadable, empty, or a point lies outside the grid.
    """
    from slatflow.io import read_ply_points

    path = Path(path)
    if not path.is_file():
        raise AssetError(sha256, f"voxel file {path} does not exist (not voxelized?)", STAGE)
    try:
        positions = read_ply_points(path)
    except Exception as exc:  # noqa: BLE001 - plyfile raises many types for a corrupt file
        raise AssetError(sha256, f"cannot read voxel PLY {written_by(path)}: {type(exc).__name__}: {exc}", STAGE) from None
    if len(positions) == 0:
        raise AssetError(sha256, f"voxel file {path} has no points", STAGE)
    finite = np.isfinite(positions).all(axis=1)  # (N,); a NaN has no index to compute
    outside = ~finite
    outside[finite] = outside_grid(voxel_indices(positions[finite], resolution), resolution)
    if outside.any():
        first = [round(float(c), 5) for c in positions[np.argmax(outside)]]
        raise AssetError(
            sha256, f"{int(outside.sum())} of {len(positions)} voxels in {path} lie outside the grid "
            f"[-0.5, 0.5)^3 (first: {first})", STAGE)
    return positions


def projection_matrices(views: list[ViewFrame]) -> np.ndarray:
    """float64 (V, 3, 4): normalized intrinsics @ OpenCV world-to-camera, per view.

    `P @ [p, 1]` = (u * z, v * z, z): uv in [0, 1] image coordinates and depth z, the
    contract's projection (`slatflow.cameras.project_points`) as one matrix per view.
    """
    mats = []
    for view in views:
        w2c = cameras.extrinsics_from_c2w(view.c2w)  # (4, 4)
        mats.append(cameras.intrinsics_from_fov(view.fov) @ w2c[:3])  # (3, 4)
    return np.stack(mats)


def project_to_grid(points: "torch.Tensor", projection: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
    """Project points into views, in `grid_sample` coordinates.

    Args:
        points: float32 (N, 3), world frame.
        projection: float32 (V, 3, 4), from `projection_matrices`.

    Returns:
        grid: (V, N, 2), uv * 2 - 1 (x right, y down, [-1, 1] spans the image).
        depth: (V, N), distance along each optical axis.
    """
    pix = points @ projection[:, :, :3].transpose(1, 2) + projection[:, None, :, 3]  # (V, N, 3)
    depth = pix[..., 2]
    uv = pix[..., :2] / depth[..., None]  # (V, N, 2) in [0, 1] inside the image
    return uv * 2 - 1, depth


# ----------------------------------------------------------------------------------------------
# Visibility (optional): depth maps rasterized from mesh.ply
# ----------------------------------------------------------------------------------------------


def load_mesh(sha256: str, path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read the render's mesh.ply.

    Returns:
        vertices float32 (M, 3) in the normalized frame; faces int64 (F, 3).

    Raises:
        AssetError: the file is missing, unreadable or has no triangles.
    """
    import trimesh

    path = Path(path)
    if not path.is_file():
        raise AssetError(sha256, f"visibility needs {path}, which does not exist", STAGE)
    try:
        mesh = trimesh.load(path, force="mesh", process=False)
    except Exception as exc:  # noqa: BLE001 - trimesh raises many types for a corrupt file
        raise AssetError(sha256, f"cannot read {path}: {type(exc).__name__}: {exc}", STAGE) from None
    if len(mesh.faces) == 0:
        raise AssetError(sha256, f"{path} has no triangles", STAGE)
    return np.asarray(mesh.vertices, dtype=np.float32), np.asarray(mesh.faces, dtype=np.int64)


def rasterize_depth(
    vertices: "torch.Tensor", faces: "torch.Tensor", projection: "torch.Tensor", resolution: int,
    max_candidates: int = 1 << 22,
) -> "torch.Tensor":
    """Z-buffer depth maps of a triangle mesh (nearest surface per pixel centre).

    No rasterizer runs on both the CPU box and the GPU machine without GL setup, and this
    needs only depths, so it is a small vectorized one: each triangle tests the pixel centres
    in its bounding box (triangles grouped by box size, so work ~ covered pixels) and depth
    is interpolated as 1/z, which is exact for planar triangles under perspective.

    Args:
        vertices: float32 (M, 3), world frame.
        faces: int64 (F, 3).
        projection: float32 (V, 3, 4), from `projection_matrices`.
        resolution: R, the depth map side.
        max_candidates: (triangle, pixel) pairs evaluated at once (bounds memory).

    Returns:
        float32 (V, R, R): depth along the optical axis of the nearest surface at each pixel
        centre (pixel (i, j) covers uv in [j/R, (j+1)/R) x [i/R, (i+1)/R)); +inf where none.
    """
    import torch

    num_views = projection.shape[0]
    depth = torch.full((num_views, resolution * resolution), math.inf, device=vertices.device)
    for view in range(num_views):
        pix = vertices @ projection[view, :, :3].T + projection[view, :, 3]  # (M, 3)
        z = pix[:, 2]
        xy = pix[:, :2] / z[:, None] * resolution  # (M, 2) in pixel units
        tri_xy, tri_z = xy[faces], z[faces]  # (F, 3, 2), (F, 3)
        in_front = (tri_z > 1e-6).all(dim=1)
        tri_xy, tri_z = tri_xy[in_front], tri_z[in_front]
        # pixel centres c + 0.5 inside each triangle's box: c in [ceil(min - .5), floor(max - .5)]
        lo = torch.ceil(tri_xy.amin(dim=1) - 0.5).clamp(0, resolution - 1)  # (F, 2)
        hi = torch.floor(tri_xy.amax(dim=1) - 0.5).clamp(-1, resolution - 1)  # (F, 2)
        extent = (hi - lo + 1).amax(dim=1)  # (F,) box side in pixels (<= 0: covers no centre)
        level = torch.ceil(torch.log2(extent.clamp(min=1))).long()  # (F,) box fits 2^level
        for k in level[extent > 0].unique().tolist():
            side = 1 << k
            sel = torch.nonzero((level == k) & (extent > 0)).squeeze(1)
            step = max(1, max_candidates // (side * side))
            for start in range(0, len(sel), step):
                tri = sel[start:start + step]
                _rasterize_group(depth[view], tri_xy[tri], tri_z[tri], lo[tri], hi[tri], side, resolution)
    return depth.view(num_views, resolution, resolution)


def _rasterize_group(depth_view, tri_xy, tri_z, lo, hi, side, resolution) -> None:
    import torch

    offsets = torch.arange(side, device=tri_xy.device, dtype=tri_xy.dtype)
    oy, ox = torch.meshgrid(offsets, offsets, indexing="ij")
    px = lo[:, None, 0] + ox.reshape(1, -1)  # (T, side^2) pixel column
    py = lo[:, None, 1] + oy.reshape(1, -1)  # (T, side^2) pixel row
    valid = (px <= hi[:, None, 0]) & (py <= hi[:, None, 1])
    cx, cy = px + 0.5, py + 0.5
    (x0, y0), (x1, y1), (x2, y2) = (tri_xy[:, i, :].T[..., None] for i in range(3))  # each (T, 1)
    area = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)  # (T, 1) twice the signed area
    w0 = ((x1 - cx) * (y2 - cy) - (x2 - cx) * (y1 - cy)) / area  # (T, side^2) barycentrics
    w1 = ((x2 - cx) * (y0 - cy) - (x0 - cx) * (y2 - cy)) / area
    w2 = 1 - w0 - w1
    eps = -1e-6  # pixel centres on a shared edge count for both triangles
    inside = valid & (area.abs() > 1e-12) & (w0 >= eps) & (w1 >= eps) & (w2 >= eps)
    inv_z = w0 / tri_z[:, 0:1] + w1 / tri_z[:, 1:2] + w2 / tri_z[:, 2:3]  # (T, side^2)
    flat = (py * resolution + px).long()
    depth_view.scatter_reduce_(0, flat[inside], (1 / inv_z)[inside], reduce="amin")


def visibility_weights(
    grid: "torch.Tensor", depth: "torch.Tensor", depth_maps: "torch.Tensor",
    tolerance: float = VISIBILITY_DEPTH_TOLERANCE_VOXELS / TRELLIS_RESOLUTION,
) -> "torch.Tensor":
    """1 where a voxel is inside a view's frustum and not behind the surface, else 0.

    Args:
        grid: (V, N, 2) from `project_to_grid`.
        depth: (V, N) voxel depths.
        depth_maps: (V, R, R) from `rasterize_depth`.
        tolerance: how far behind the nearest surface a voxel centre may lie, world units.

    Returns:
        float32 (V, N).
    """
    import torch

    resolution = depth_maps.shape[-1]
    uv = (grid + 1) / 2  # (V, N, 2) in [0, 1]
    inside = (depth > 0) & (uv >= 0).all(-1) & (uv < 1).all(-1)  # (V, N)
    pixel = (uv.clamp(0, 1 - 1e-7) * resolution).long()  # (V, N, 2) column, row
    flat = pixel[..., 1] * resolution + pixel[..., 0]  # (V, N)
    surface = torch.gather(depth_maps.flatten(1), 1, flat)  # (V, N)
    return (inside & (depth <= surface + tolerance)).float()


# ----------------------------------------------------------------------------------------------
# The extractor: model once, many assets streamed
# ----------------------------------------------------------------------------------------------


@dataclass
class _PreparedAsset:
    job: FeatureJob
    views: list[ViewFrame]
    images: list[Future]  # each -> uint8 (S, S, 4)
    positions: np.ndarray  # float32 (N, 3)
    projection: np.ndarray  # float64 (V, 3, 4)
    mesh: tuple[np.ndarray, np.ndarray] | None = None
    started: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        for future in self.images:
            future.cancel()


@dataclass
class _DeviceResult:
    """An asset's outputs on their way from the device: host tensors, valid once `done`."""

    mean: "torch.Tensor"  # float32 (N, D)
    patchtokens: "torch.Tensor"  # float16 (N, D), cast on the device (the same rounding as numpy's)
    views_seen: "torch.Tensor | None"  # int32 (N,)
    unseen: "torch.Tensor | None"  # int64 ()
    done: "torch.cuda.Event | None"  # None: computed on the CPU, valid already


def _to_host(tensor: "torch.Tensor") -> "torch.Tensor":
    """A CPU copy; from CUDA into pinned memory without waiting (see `_DeviceResult.done`)."""
    import torch

    if tensor.device.type != "cuda":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


def _to_device(tensor: "torch.Tensor", device: "torch.device") -> "torch.Tensor":
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _recorded_event(device: "torch.device") -> "torch.cuda.Event | None":
    import torch

    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event


class FeatureExtractor:
    """Loads the model once and extracts features for many assets.

    Args:
        settings: the stage's settings.
        loaded: an already loaded model (tests, benchmarks); default loads `settings.weights`.
    """

    def __init__(self, settings: FeatureSettings, loaded: LoadedDinov2 | None = None):
        import torch

        self.settings = settings
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if settings.device == "auto" else settings.device
        )
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"features.device {settings.device!r}: no CUDA device is available")
        if loaded is None:
            arch = resolve_arch(settings.model)
            loaded = load_dinov2(arch, settings.weights, model_name=settings.model, seed=settings.seed)
        self.loaded = loaded
        self.resize_on_device = settings.resize == "device" or (settings.resize == "auto" and self.device.type == "cuda")
        dtype = settings.dtype
        if dtype == "auto":
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        self.compute_dtype = getattr(torch, dtype)
        self.model = loaded.model.to(self.device).eval()
        self.embed_dim = self.model.config.hidden_size
        # Half precision runs the fused forward; float32 stays transformers' own (the reference).
        self.fused = None
        if self.compute_dtype != torch.float32:
            self.fused = FusedDinov2(self.model, self.compute_dtype, settings.attention, settings.compile,
                                     settings.cuda_graph).to(self.device)
        shape = (3, 1, 1)
        self._device_lock = threading.Lock()  # `process` threads take turns on the model
        self._pool_lock = threading.Lock()
        self._decoder: ThreadPoolExecutor | None = None
        self._mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=self.device).view(shape)
        self._std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=self.device).view(shape)
        logger.info(
            "features: %s (%s) on %s, %s, %dpx, batch %d, visibility %s -> features/%s/",
            settings.model, loaded.source, self.device, dtype, settings.image_size, settings.batch_size,
            settings.visibility, settings.feature_name,
        )

    # -- one asset on the device ---------------------------------------------------------------

    def _normalize(self, rgba: "torch.Tensor") -> "torch.Tensor":
        """uint8 (B, S, S, 4) -> float32 (B, 3, S, S): /255, rgb * alpha, ImageNet-normalized."""
        image = rgba.permute(0, 3, 1, 2).float() / 255  # (B, 4, S, S)
        rgb = image[:, :3] * image[:, 3:]  # premultiplied: black background
        return (rgb - self._mean) / self._std

    def patch_token_maps(self, rgba: "torch.Tensor") -> "torch.Tensor":
        """float32 (B, D, S/14, S/14) `x_prenorm` patch tokens of uint8 (B, H, H, 4) views
        (resized to S here when they are not S already)."""
        import torch

        rgba = rgba.to(self.device, non_blocking=True)
        rgba = lanczos_resize_rgba(rgba, self.settings.image_size)  # (B, S, S, 4)
        pixels = self._normalize(rgba)
        if self.fused is not None:
            return self.fused(pixels)
        with (
            torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32),
            exact_fp32(self.device, self.compute_dtype),  # float32 on CUDA means no TF32
        ):
            maps = prenorm_patch_tokens(self.model, pixels)
        return maps.float()

    def _stage_views(self, asset: _PreparedAsset) -> list["torch.Tensor"]:
        """The asset's views as uint8 (B, H, H, 4) host batches of equal size, pinned on CUDA:
        made before the asset takes the device, which then never waits on PNGs or copies."""
        import torch

        num_views = len(asset.views)
        num_batches = -(-num_views // self.settings.batch_size)
        batch = -(-num_views // num_batches)  # equal batches: one shape per asset, no small tail
        staged = []
        for start in range(0, num_views, batch):
            rgba = torch.from_numpy(self._stack_views([f.result() for f in asset.images[start:start + batch]]))
            staged.append(rgba.pin_memory() if self.device.type == "cuda" else rgba)
        return staged

    def _enqueue(self, asset: _PreparedAsset, staged: list["torch.Tensor"]) -> "_DeviceResult":
        """Queue the asset's work on the device; the result is copied back asynchronously.

        Nothing here waits for the device, so the next asset's work queues behind this one's
        while this one's caller waits for its copy outside the device lock.
        """
        import torch
        import torch.nn.functional as F

        # from pinned memory without waiting: a pageable copy would wait for the previous
        # asset's work to finish before this one's could queue behind it
        points = _to_device(torch.from_numpy(asset.positions), self.device)  # (N, 3)
        projection = _to_device(torch.from_numpy(asset.projection.astype(np.float32)), self.device)  # (V, 3, 4)
        num_views, num_voxels = len(asset.views), len(points)
        depth_maps = None
        if asset.mesh is not None:
            vertices, faces = (torch.from_numpy(a).to(self.device) for a in asset.mesh)
            depth_maps = rasterize_depth(vertices, faces, projection, VISIBILITY_DEPTH_RESOLUTION)
        total = torch.zeros(self.embed_dim, num_voxels, device=self.device)  # (D, N) sum over views
        seen = torch.zeros(num_voxels, device=self.device) if depth_maps is not None else None
        unweighted = torch.zeros_like(total) if depth_maps is not None else None
        start = 0
        for rgba in staged:
            stop = start + len(rgba)
            maps = self.patch_token_maps(rgba)  # (B, D, n, n)
            grid, depth = project_to_grid(points, projection[start:stop])  # (B, N, 2), (B, N)
            weights = None
            if depth_maps is not None:
                tolerance = VISIBILITY_DEPTH_TOLERANCE_VOXELS / self.settings.voxel_resolution
                weights = visibility_weights(grid, depth, depth_maps[start:stop], tolerance)  # (B, N)
                seen += weights.sum(0)
            chunk = max(1, (self.settings.sample_memory_mb << 20) // (4 * self.embed_dim * (stop - start)))
            for lo in range(0, num_voxels, chunk):
                hi = min(lo + chunk, num_voxels)
                sampled = F.grid_sample(
                    maps, grid[:, None, lo:hi], mode="bilinear", padding_mode="zeros", align_corners=False
                )[:, :, 0]  # (B, D, n_chunk)
                if weights is None:
                    total[:, lo:hi] += sampled.sum(0)
                else:
                    unweighted[:, lo:hi] += sampled.sum(0)
                    total[:, lo:hi] += (sampled * weights[:, None, lo:hi]).sum(0)
            start = stop
        unseen = None
        if seen is None:
            mean = total / num_views  # (D, N)
        else:  # a voxel no view sees (enclosed, or hidden by the tolerance) takes the all-view mean
            unseen = seen == 0
            mean = torch.where(unseen, unweighted / num_views, total / seen.clamp(min=1))
        mean = mean.T.contiguous()  # (N, D)
        return _DeviceResult(
            mean=_to_host(mean),
            patchtokens=_to_host(mean.half()),  # the cast here: a CPU cast of 20k x 1024 takes ~0.1 s
            views_seen=None if seen is None else _to_host(seen.int()),
            unseen=None if unseen is None else _to_host(unseen.sum()),
            done=_recorded_event(self.device),
        )

    def _collect(self, asset: _PreparedAsset, result: "_DeviceResult") -> AssetFeatures:
        """Wait for the asset's copies and build its features (the float16 cast on the CPU)."""
        if result.done is not None:
            result.done.synchronize()
        mean = result.mean.numpy()
        if result.unseen is not None and int(result.unseen):
            logger.info("asset %s: %d of %d voxels seen by no view; they take the all-view mean",
                        asset.job.sha256, int(result.unseen), len(mean))
        return AssetFeatures(
            indices=voxel_indices(asset.positions, self.settings.voxel_resolution).astype(np.uint8),
            patchtokens=result.patchtokens.numpy(),
            mean=mean,
            num_views=len(asset.views),
            views_seen=None if result.views_seen is None else result.views_seen.numpy(),
            random_weights=self.loaded.random_weights,
        )

    def _extract_prepared(self, asset: _PreparedAsset) -> AssetFeatures:
        return self._collect(asset, self._enqueue(asset, self._stage_views(asset)))

    def _stack_views(self, views: list[np.ndarray]) -> np.ndarray:
        """uint8 (B, H, H, 4); views of another size than the first are resized by PIL here."""
        from PIL import Image

        side = views[0].shape[0]
        if any(view.shape[0] != side for view in views):
            size = self.settings.image_size
            views = [np.asarray(Image.fromarray(v, "RGBA").resize((size, size), Image.Resampling.LANCZOS))
                     for v in views]
        return np.stack(views)

    # -- many assets, streamed ------------------------------------------------------------------

    def _prepare(self, job: FeatureJob, decoder: ThreadPoolExecutor) -> _PreparedAsset:
        views = read_view_frames(job.sha256, job.render_dir)
        positions = load_voxels(job.sha256, job.voxels_path, self.settings.voxel_resolution)
        mesh = load_mesh(job.sha256, Path(job.render_dir) / "mesh.ply") if self.settings.visibility else None
        size = None if self.resize_on_device else self.settings.image_size
        images = [decoder.submit(decode_view, job.sha256, view.path, size) for view in views]
        return _PreparedAsset(job, views, images, positions, projection_matrices(views), mesh)

    def run(self, jobs: Iterable[FeatureJob], keep_features: bool = False) -> list[FeatureOutcome]:
        """Extract and write the features of many assets; one bad asset fails alone.

        The next asset's views are decoded while the model runs on the current one, and
        outputs are compressed and written in background threads.

        Args:
            jobs: the assets.
            keep_features: also return each asset's `AssetFeatures` (tests, benchmarks).

        Returns:
            One outcome per job, in order.
        """
        import torch

        jobs = list(jobs)
        for folder in sorted({job.output_path.parent for job in jobs if job.output_path is not None}):
            write_json_atomic(folder / PROVENANCE_FILE, self.provenance())
        outcomes: list[FeatureOutcome | Future] = []
        with (
            ThreadPoolExecutor(self.settings.decode_workers, thread_name_prefix="decode") as decoder,
            ThreadPoolExecutor(1, thread_name_prefix="prepare") as preparer,
            ThreadPoolExecutor(4, thread_name_prefix="save") as saver,
            torch.inference_mode(),
        ):
            lookahead = 2  # assets being read ahead: one decoding, one queued behind it
            pending: deque[tuple[FeatureJob, Future]] = deque()
            queue = iter(jobs)

            def refill():
                while len(pending) < lookahead:
                    job = next(queue, None)
                    if job is None:
                        return
                    pending.append((job, preparer.submit(self._prepare, job, decoder)))

            refill()
            while pending:
                job, prepared = pending.popleft()
                started = time.perf_counter()
                asset = None
                try:
                    asset = prepared.result()
                    refill()  # start reading the next asset before this one occupies the GPU
                    features = self._extract_prepared(asset)
                except AssetError as exc:
                    if asset is not None:
                        asset.cancel()
                    refill()
                    logger.error("asset %s failed: %s", job.sha256, exc.reason)
                    outcomes.append(_failed(job, exc, started))
                    continue
                outcomes.append(saver.submit(self._finish, job, features, started, keep_features))
            results = [o.result() if isinstance(o, Future) else o for o in outcomes]
        return results

    def process(self, job: FeatureJob, keep_features: bool = False) -> FeatureOutcome:
        """Extract and write one asset; thread-safe, for a model worker serving jobs at once.

        Each calling thread decodes its asset's views (on a decode pool shared by all callers),
        waits its turn on the device, and compresses and writes its own output, so with
        requests in flight the device runs one asset while the CPUs read and write others.
        """
        import torch

        started = time.perf_counter()
        if job.output_path is not None:  # every request, as a batch run does: the folder may be new
            write_json_atomic(job.output_path.parent / PROVENANCE_FILE, self.provenance())
        asset = None
        try:
            asset = self._prepare(job, self._decode_pool())
            staged = self._stage_views(asset)
            with torch.inference_mode():
                with self._device_lock:
                    result = self._enqueue(asset, staged)
                features = self._collect(asset, result)
        except AssetError as exc:
            if asset is not None:
                asset.cancel()
            logger.error("asset %s failed: %s", job.sha256, exc.reason)
            return _failed(job, exc, started)
        return self._finish(job, features, started, keep_features)

    def _decode_pool(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._decoder is None:
                self._decoder = ThreadPoolExecutor(self.settings.decode_workers, thread_name_prefix="decode")
            return self._decoder

    def provenance(self) -> dict:
        """What the features were made with, for `features/<name>/provenance.json`."""
        return {
            **self.settings.output_settings(),
            "model": self.settings.model,
            "weights": self.loaded.source,
            "random_weights": self.loaded.random_weights,
            "compute_dtype": str(self.compute_dtype).removeprefix("torch."),
        }

    def _finish(self, job: FeatureJob, features: AssetFeatures, started: float, keep: bool) -> FeatureOutcome:
        if job.output_path is not None:
            try:
                write_features(job.output_path, features, self.settings.visibility, self.settings.deflate_level)
            except OSError as exc:
                error = AssetError(job.sha256, f"cannot write {job.output_path}: {exc}", STAGE)
                return _failed(job, error, started)
        seconds = time.perf_counter() - started
        logger.info("asset %s: %d voxels x %d views -> %s (%.2f s)", job.sha256, len(features.indices),
                    features.num_views, job.output_path, seconds)
        return FeatureOutcome(
            job.sha256, output_path=job.output_path, seconds=seconds, features=features if keep else None
        )


# the TRELLIS contract's arrays, checked on the written file before it is renamed into place
FEATURE_CONTRACT = {"indices": ("uint8", (None, 3)), "patchtokens": ("float16", (None, None))}


def write_features(
    path: str | os.PathLike, features: AssetFeatures, visibility: bool = False, deflate_level: int | None = None
) -> None:
    """Write the contract's npz (`indices`, `patchtokens`) plus provenance flags.

    `random_weights` and `visibility` are extra 0-d bool arrays; TRELLIS reads its two keys
    by name, so they do not disturb it.
    """
    arrays = {
        "indices": features.indices,
        "patchtokens": features.patchtokens,
        "random_weights": np.bool_(features.random_weights),
        "visibility": np.bool_(visibility),
    }
    if features.views_seen is not None:
        arrays["views_seen"] = features.views_seen
    save_npz_atomic(path, contract=FEATURE_CONTRACT, compresslevel=deflate_level, **arrays)


def worker_service(settings: dict) -> Callable[[dict], None]:
    """A model worker's handler (slatflow.worker): the model loaded once, then one asset per
    request `{"sha256", "render_dir", "voxels", "output"}`.

    Args:
        settings: `FeatureSettings` fields.
    """
    return request_handler(FeatureExtractor(FeatureSettings(**settings)))


def request_handler(extractor: FeatureExtractor) -> Callable[[dict], None]:
    """The worker's handler around a loaded extractor (thread-safe: `concurrency` at once)."""

    def handle(request: dict) -> None:
        if extractor.loaded.random_weights:  # loaded once, but every asset's log must say it
            warn_random_weights(logger, extractor.settings.model)
        outcome = extractor.process(FeatureJob.from_request(request))
        if outcome.error is not None:
            raise outcome.error

    handle.concurrency = WORKER_REQUESTS_AT_ONCE
    return handle
