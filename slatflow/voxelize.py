"""Voxelize stage: `renders/<sha>/mesh.ply` -> surface voxels `voxels/<sha>.ply`.

TRELLIS voxelizes with Open3D's `VoxelGrid.create_from_triangle_mesh_within_bounds`,
whose result depends on the Open3D version and which crashes on some systems. This
module reproduces the voxel set of Open3D >= 0.18 exactly (same float64 operations in
the same order, so ties on grid planes resolve the same way) without Open3D:

- per triangle, the candidate voxels are Open3D's: `ini = floor((tri_min - min_bound)
  / voxel_size)`, `num = round((tri_max - tri_min) / voxel_size) + 2` per axis (C
  `round`, half away from zero), so a triangle whose minimum lies exactly on a grid plane
  never tests the voxel below it;
- a candidate is kept when Akenine-Moller's triangle/box test says they overlap (nine
  edge-cross-axis tests, the AABB test, the plane test; touching counts), on the box
  centred at `(min_bound + voxel_size/2) + index * voxel_size` with half size
  `voxel_size/2`.

Two things make it faster than Open3D with the same answer: a voxel already marked is
not tested again, and for triangles with many candidates only the voxels within a voxel
of the triangle's plane are tested (a conservative bound; the exact test decides). The
grid is a dense `uint8 (R, R, R)` array, so memory is `resolution**3` bytes whatever the
triangle sizes (no candidate sets are ever materialised).

Hand-written (numba) because no maintained library reproduces Open3D's voxel set:
trimesh's voxelizers sample the surface, and Open3D itself is what we replace.
"""

from __future__ import annotations

import logging
import math
import os
import time

import numba
import numpy as np

from slatflow.errors import AssetError
from slatflow.grid import TRELLIS_RESOLUTION, voxel_centres
from slatflow.io import read_mesh_ply
from slatflow.stages import VOXELIZE

logger = logging.getLogger(__name__)

STAGE = VOXELIZE.name
DEFAULT_RESOLUTION = TRELLIS_RESOLUTION
# TRELLIS clamps mesh vertices this far inside [-0.5, 0.5]^3 so that no voxel index
# leaves [0, resolution); slatflow applies the same clamp to get the same voxels.
CLAMP_MARGIN = 1e-6
GRID_MIN_BOUND = -0.5  # the normalized frame is [-0.5, 0.5]^3 (see the contract)
MAX_RESOLUTION = 1024  # the dense grid takes resolution**3 bytes: 1 GiB here

# The band around a triangle's plane spans at most 6 voxels along the normal's largest
# axis (half width <= 1.5 + 1 voxels, see `_mark_surface_voxels`): only a triangle whose
# candidates are deeper than that along this axis gains from testing the band alone.
_PLANE_BAND_MAX_DEPTH = 6
# The plane band is used only when the triangle's normal is well conditioned:
# the float64 rounding of the per-box normal then moves the plane by far less than the
# one-voxel margin of the band (bound: ~1e-15 * R**3 / |n| with R the coordinate scale).
_PLANE_BAND_CONDITION = 1e-10


# --------------------------------------------------------------------------------------
# The exact kernel (numba). Every arithmetic expression below is evaluated in the same
# order as Open3D's C++ (no fused multiply-add: numba does not contract without
# fastmath, and the open3d wheels are built without FMA), so ties come out the same.
# --------------------------------------------------------------------------------------


@numba.njit(cache=True, inline="always")
def _axis_separates(pa: float, pb: float, rad: float) -> bool:
    """True when the projections `pa`, `pb` of the triangle lie outside [-rad, rad]."""
    if pa < pb:
        lo = pa
        hi = pb
    else:
        lo = pb
        hi = pa
    return lo > rad or hi < -rad


@numba.njit(cache=True, inline="always")
def _triangle_box_overlap(
    cx: float,
    cy: float,
    cz: float,
    h: float,
    ax: float,
    ay: float,
    az: float,
    bx: float,
    by: float,
    bz: float,
    qx: float,
    qy: float,
    qz: float,
) -> bool:
    """Akenine-Moller triangle/AABB overlap for a cube of half size `h` centred at c.

    Touching counts as overlap. The separating axes are tested in the reference
    implementation's arithmetic (which two vertices each axis projects, how `rad` is
    summed) because ties on grid planes depend on it.
    """
    # Triangle in box-centred coordinates.
    v0x = ax - cx
    v0y = ay - cy
    v0z = az - cz
    v1x = bx - cx
    v1y = by - cy
    v1z = bz - cz
    v2x = qx - cx
    v2y = qy - cy
    v2z = qz - cz
    # Edges.
    e0x = v1x - v0x
    e0y = v1y - v0y
    e0z = v1z - v0z
    e1x = v2x - v1x
    e1y = v2y - v1y
    e1z = v2z - v1z
    e2x = v0x - v2x
    e2y = v0y - v2y
    e2z = v0z - v2z

    # Edge 0 x {X, Y, Z}.
    fex = abs(e0x)
    fey = abs(e0y)
    fez = abs(e0z)
    if _axis_separates(e0z * v0y - e0y * v0z, e0z * v2y - e0y * v2z, fez * h + fey * h):
        return False
    if _axis_separates(-e0z * v0x + e0x * v0z, -e0z * v2x + e0x * v2z, fez * h + fex * h):
        return False
    if _axis_separates(e0y * v1x - e0x * v1y, e0y * v2x - e0x * v2y, fey * h + fex * h):
        return False
    # Edge 1.
    fex = abs(e1x)
    fey = abs(e1y)
    fez = abs(e1z)
    if _axis_separates(e1z * v0y - e1y * v0z, e1z * v2y - e1y * v2z, fez * h + fey * h):
        return False
    if _axis_separates(-e1z * v0x + e1x * v0z, -e1z * v2x + e1x * v2z, fez * h + fex * h):
        return False
    if _axis_separates(e1y * v0x - e1x * v0y, e1y * v1x - e1x * v1y, fey * h + fex * h):
        return False
    # Edge 2.
    fex = abs(e2x)
    fey = abs(e2y)
    fez = abs(e2z)
    if _axis_separates(e2z * v0y - e2y * v0z, e2z * v1y - e2y * v1z, fez * h + fey * h):
        return False
    if _axis_separates(-e2z * v0x + e2x * v0z, -e2z * v1x + e2x * v1z, fez * h + fex * h):
        return False
    if _axis_separates(e2y * v1x - e2x * v1y, e2y * v2x - e2x * v2y, fey * h + fex * h):
        return False

    # The triangle's AABB against the box.
    if min(v0x, v1x, v2x) > h or max(v0x, v1x, v2x) < -h:
        return False
    if min(v0y, v1y, v2y) > h or max(v0y, v1y, v2y) < -h:
        return False
    if min(v0z, v1z, v2z) > h or max(v0z, v1z, v2z) < -h:
        return False

    # The triangle's plane (normal = e0 x e1) against the box.
    nx = e0y * e1z - e0z * e1y
    ny = e0z * e1x - e0x * e1z
    nz = e0x * e1y - e0y * e1x
    if nx > 0.0:
        minx = -h - v0x
        maxx = h - v0x
    else:
        minx = h - v0x
        maxx = -h - v0x
    if ny > 0.0:
        miny = -h - v0y
        maxy = h - v0y
    else:
        miny = h - v0y
        maxy = -h - v0y
    if nz > 0.0:
        minz = -h - v0z
        maxz = h - v0z
    else:
        minz = h - v0z
        maxz = -h - v0z
    if nx * minx + ny * miny + nz * minz > 0.0:
        return False
    return nx * maxx + ny * maxy + nz * maxz >= 0.0


@numba.njit(cache=True, inline="always")
def _round_half_away(x: float) -> float:
    """C's `round` (half away from zero) for x >= 0; numpy and Python round half to even."""
    r = math.floor(x)
    if x - r >= 0.5:  # exact: x - floor(x) has no rounding error
        r += 1.0
    return r


@numba.njit(cache=True, nogil=True)
def _mark_surface_voxels(
    vertices: np.ndarray,
    faces: np.ndarray,
    voxel_size: float,
    min_bound: float,
    grid: np.ndarray,
) -> None:
    """Set `grid[i, j, k] = 1` for every voxel that Open3D would produce.

    Args:
        vertices: float64 (V, 3), finite.
        faces: int64 (F, 3), indices into `vertices`.
        voxel_size: the voxel edge (1 / resolution), as Open3D gets it.
        min_bound: the grid's minimum corner on every axis.
        grid: uint8 (R, R, R), updated in place; voxels outside it are dropped.
    """
    res = grid.shape[0]
    h = voxel_size / 2
    centre0 = min_bound + h  # Open3D: (min_bound + half) + index * voxel_size
    lo = np.zeros(3, dtype=np.int64)
    hi = np.zeros(3, dtype=np.int64)
    tri = np.zeros((3, 3), dtype=np.float64)
    normal = np.zeros(3, dtype=np.float64)
    ijk = np.zeros(3, dtype=np.int64)
    for f in range(faces.shape[0]):
        for corner in range(3):
            for axis in range(3):
                tri[corner, axis] = vertices[faces[f, corner], axis]
        num_candidates = 1
        scale = 1.0
        for axis in range(3):
            tmin = min(tri[0, axis], tri[1, axis], tri[2, axis])
            tmax = max(tri[0, axis], tri[1, axis], tri[2, axis])
            scale = max(scale, abs(tmin) + 1.0, abs(tmax) + 1.0)
            ini = math.floor((tmin - min_bound) / voxel_size)
            num = _round_half_away((tmax - tmin) / voxel_size) + 2.0
            # Clip Open3D's candidate range [ini, ini + num) to the grid (in float64,
            # so far-away vertices cannot overflow an integer).
            lo[axis] = np.int64(max(ini, 0.0))
            hi[axis] = np.int64(min(ini + num, float(res)))
            num_candidates *= max(hi[axis] - lo[axis], 0)
        if num_candidates == 0:
            continue

        # Pick the slicing axis d (the normal's largest component) for the plane band.
        ux = tri[1, 0] - tri[0, 0]
        uy = tri[1, 1] - tri[0, 1]
        uz = tri[1, 2] - tri[0, 2]
        wx = tri[2, 0] - tri[0, 0]
        wy = tri[2, 1] - tri[0, 1]
        wz = tri[2, 2] - tri[0, 2]
        normal[0] = uy * wz - uz * wy
        normal[1] = uz * wx - ux * wz
        normal[2] = ux * wy - uy * wx
        d = 0
        if abs(normal[1]) > abs(normal[d]):
            d = 1
        if abs(normal[2]) > abs(normal[d]):
            d = 2
        nd = normal[d]
        use_band = (
            hi[d] - lo[d] > _PLANE_BAND_MAX_DEPTH
            and abs(nd) * voxel_size > _PLANE_BAND_CONDITION * scale * scale * scale
        )
        a = (d + 1) % 3
        b = (d + 2) % 3
        half_band = 0.0
        if use_band:
            # Voxels whose centre is within h * sum|n| / |n_d| of the plane along d can
            # touch it; one voxel more covers every rounding of the exact test.
            half_band = h * (abs(normal[0]) + abs(normal[1]) + abs(normal[2])) / abs(nd) + voxel_size
        for i in range(lo[a], hi[a]):
            ijk[a] = i
            ca = centre0 + i * voxel_size
            for j in range(lo[b], hi[b]):
                ijk[b] = j
                cb = centre0 + j * voxel_size
                k_lo = lo[d]
                k_hi = hi[d]
                if use_band:
                    t = tri[0, d] - (normal[a] * (ca - tri[0, a]) + normal[b] * (cb - tri[0, b])) / nd
                    k_lo = max(k_lo, np.int64(math.ceil((t - half_band - centre0) / voxel_size)))
                    k_hi = min(k_hi, np.int64(math.floor((t + half_band - centre0) / voxel_size)) + 1)
                for k in range(k_lo, k_hi):
                    ijk[d] = k
                    if grid[ijk[0], ijk[1], ijk[2]]:
                        continue  # already a surface voxel: a set needs no second test
                    if _triangle_box_overlap(
                        centre0 + ijk[0] * voxel_size,
                        centre0 + ijk[1] * voxel_size,
                        centre0 + ijk[2] * voxel_size,
                        h,
                        tri[0, 0],
                        tri[0, 1],
                        tri[0, 2],
                        tri[1, 0],
                        tri[1, 1],
                        tri[1, 2],
                        tri[2, 0],
                        tri[2, 1],
                        tri[2, 2],
                    ):
                        grid[ijk[0], ijk[1], ijk[2]] = 1


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def voxelize_mesh(
    vertices: np.ndarray,
    faces: np.ndarray,
    resolution: int = DEFAULT_RESOLUTION,
) -> np.ndarray:
    """The surface voxels of a triangle mesh, exactly as Open3D >= 0.18 finds them.

    Equals `VoxelGrid.create_from_triangle_mesh_within_bounds(mesh, 1/resolution,
    (-0.5,)*3, (0.5,)*3)` restricted to the grid: Open3D can also return indices outside
    [0, resolution) for vertices outside [-0.5, 0.5]^3; those are dropped here (TRELLIS
    clamps the vertices so that none exist, see `clamp_vertices`).

    Args:
        vertices: float (V, 3) in the normalized [-0.5, 0.5]^3 frame; used as float64.
        faces: int (F, 3) vertex indices of triangles. Zero faces give zero voxels.
        resolution: voxels per axis (64 for TRELLIS; 128, 256 also work).

    Returns:
        int32 (N, 3) voxel indices (i, j, k) along (x, y, z), unique, sorted
        lexicographically (the C order of the grid); deterministic.

    Raises:
        ValueError: wrong shapes, non-finite vertices, face indices out of range, or a
            resolution outside [1, MAX_RESOLUTION].
    """
    vertices, faces = _checked_mesh(vertices, faces)
    if not (isinstance(resolution, (int, np.integer)) and 1 <= resolution <= MAX_RESOLUTION):
        raise ValueError(f"resolution must be an integer in [1, {MAX_RESOLUTION}], got {resolution!r}")
    resolution = int(resolution)
    grid = np.zeros((resolution, resolution, resolution), dtype=np.uint8)  # (X, Y, Z)
    if len(faces):
        # 1 / resolution as a Python float, exactly what TRELLIS passes to Open3D.
        _mark_surface_voxels(vertices, faces, 1 / resolution, GRID_MIN_BOUND, grid)
    return _grid_indices(grid)


def _grid_indices(grid: np.ndarray) -> np.ndarray:
    """The set voxels of a uint8 (R, R, R) grid as int32 (N, 3), in C (sorted) order.

    Through flat indices, so the peak beside the grid is ~28 bytes per voxel (argwhere's
    per-axis int64 arrays and their stack take 48).
    """
    resolution = grid.shape[0]
    flat = np.flatnonzero(grid)  # (N,) int64, ascending
    indices = np.zeros((len(flat), 3), dtype=np.int32)  # (N, 3)
    for axis in (2, 1):
        indices[:, axis] = flat % resolution
        flat //= resolution
    indices[:, 0] = flat
    return indices


def clamp_vertices(vertices: np.ndarray) -> np.ndarray:
    """TRELLIS's clamp: float64 (V, 3) clipped to [-0.5 + 1e-6, 0.5 - 1e-6]."""
    return np.clip(np.asarray(vertices, dtype=np.float64), -0.5 + CLAMP_MARGIN, 0.5 - CLAMP_MARGIN)


def voxelize_asset(
    sha256: str,
    mesh_path: str | os.PathLike,
    out_path: str | os.PathLike,
    resolution: int = DEFAULT_RESOLUTION,
) -> int:
    """Voxelize one `mesh.ply` into a voxel-centre PLY, TRELLIS's recipe.

    Vertices are clamped to [-0.5 + 1e-6, 0.5 - 1e-6] (so every voxel lies in the grid)
    and the voxel centres `(i + 0.5) / resolution - 0.5` are written as a vertex-only
    binary little-endian float32 PLY, in sorted index order, atomically.

    Returns:
        The number of voxels written (`num_voxels` in the metadata).

    Raises:
        AssetError: the mesh cannot be read, is empty, not triangular or not finite.
    """
    from slatflow.io import write_points_ply

    start = time.perf_counter()
    vertices, faces = read_mesh_ply(sha256, mesh_path, STAGE)
    try:
        vertices, faces = _checked_mesh(vertices, faces)  # before the clamp, which hides inf
        indices = voxelize_mesh(clamp_vertices(vertices), faces, resolution)  # (N, 3)
    except ValueError as exc:
        raise AssetError(sha256, f"mesh {mesh_path}: {exc}", STAGE) from exc
    if len(indices) == 0:  # cannot happen for a finite triangle after the clamp
        raise AssetError(sha256, f"mesh {mesh_path} gave no voxels", STAGE)
    write_points_ply(out_path, voxel_centres(indices, resolution))
    logger.info(
        "asset %s: %d triangles -> %d voxels at %d^3 in %.3f s -> %s",
        sha256, len(faces), len(indices), resolution, time.perf_counter() - start, out_path,
    )
    return len(indices)


def _checked_mesh(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coerce to float64 (V, 3) / int64 (F, 3) C arrays and check them, or ValueError."""
    vertices = np.ascontiguousarray(vertices, dtype=np.float64)
    faces = np.asarray(faces)
    if vertices.ndim != 2 or vertices.shape[1] != 3:
        raise ValueError(f"vertices must have shape (V, 3), got {vertices.shape}")
    if faces.size == 0:
        faces = faces.reshape(0, 3)
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"faces must be triangles of shape (F, 3), got {faces.shape}")
    if not np.issubdtype(faces.dtype, np.integer):
        raise ValueError(f"faces must be integer vertex indices, got dtype {faces.dtype}")
    faces = np.ascontiguousarray(faces, dtype=np.int64)
    finite = np.isfinite(vertices).all(axis=1)  # (V,)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(
            f"{len(bad)} vertices are not finite (vertex {bad[0]} = {vertices[bad[0]].tolist()}); "
            "expected finite coordinates"
        )
    if len(faces) and (faces.min() < 0 or faces.max() >= len(vertices)):
        raise ValueError(
            f"face indices span [{faces.min()}, {faces.max()}] but there are {len(vertices)} vertices"
        )
    return vertices, faces
