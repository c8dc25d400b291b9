"""Surfaces from fields: the NeuS recipe (chunked field, marching cubes, rescale) for datasets.

NeuS validates a reconstruction by evaluating its SDF on a grid in 64^3 chunks
(`extract_fields`), running marching cubes on it and mapping the vertices from grid
indices back to the bounds (`extract_geometry`). slatflow runs the same recipe on any
field: the signed distance to a mesh (`MeshSDF`), to a voxel set (`VoxelSDF`), or a user
callable such as a neural SDF, on numpy or torch, CPU or GPU.

Conventions (every function here):
- A grid of `resolution` R spans the bounds inclusively, `linspace(bound_min[a],
  bound_max[a], R)` per axis, and `field[i, j, k]` is the value at (x_i, y_j, z_k)
  ('ij' indexing, as NeuS's `torch.meshgrid`).
- Signed distances are negative inside. `extract_geometry` takes `inside="below"` for such
  fields and `inside="above"` for NeuS's negated SDF, occupancies or densities.
- Output triangles face outward (counter-clockwise seen from outside, positive signed
  volume) whichever marching-cubes library runs: scikit-image's and PyMCubes' windings are
  opposite for the same field, and each is flipped as needed.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Callable, Iterator, Literal, NamedTuple, Sequence

import numpy as np

from slatflow.grid import TRELLIS_RESOLUTION, outside_grid, voxel_indices
from slatflow.stages import MESHES, QUALITY, SDF

logger = logging.getLogger(__name__)

# Which side of the threshold is the object: "below" for signed distances (negative inside),
# "above" for NeuS's -sdf, occupancies and densities.
Inside = Literal["below", "above"]
# The marching-cubes implementation; both are maintained and give the same surface.
MarchingCubesMethod = Literal["skimage", "pymcubes"]

NEUS_CHUNK = 64  # NeuS's block edge: 64^3 points per query call


class TriangleMesh(NamedTuple):
    """A triangle mesh.

    vertices: float32 (V, 3), in the frame of the bounds it was extracted in.
    faces: int64 (F, 3), counter-clockwise seen from outside.
    """

    vertices: np.ndarray
    faces: np.ndarray


def _to_numpy_bounds(bound_min: Any, bound_max: Any) -> tuple[np.ndarray, np.ndarray]:
    """Coerce bounds given as sequences, numpy arrays or torch tensors to float64 (3,)."""

    def coerce(bound: Any) -> np.ndarray:
        if hasattr(bound, "detach"):  # a torch tensor, possibly on a GPU
            bound = bound.detach().cpu().numpy()
        return np.asarray(bound, dtype=np.float64).reshape(3)

    lo, hi = coerce(bound_min), coerce(bound_max)
    if not np.all(hi > lo):
        raise ValueError(f"bounds must satisfy bound_max > bound_min per axis, got {lo} and {hi}")
    return lo, hi


def grid_axes(bound_min: Any, bound_max: Any, resolution: int) -> np.ndarray:
    """float32 (3, R): the sample coordinates of each axis, bounds included."""
    if resolution < 2:
        raise ValueError(f"resolution must be >= 2, got {resolution}")
    lo, hi = _to_numpy_bounds(bound_min, bound_max)
    return np.stack([np.linspace(lo[a], hi[a], resolution) for a in range(3)]).astype(np.float32)


def _chunk_starts(resolution: int, chunk: int) -> range:
    return range(0, resolution, chunk)


def extract_fields(
    bound_min: Any,
    bound_max: Any,
    resolution: int,
    query_fn: Callable[[Any], Any],
    chunk: int = NEUS_CHUNK,
    device: Any = None,
) -> np.ndarray:
    """Evaluate `query_fn` on a grid, one block of chunk^3 points at a time.

    NeuS's recipe with the per-block work trimmed: the points of a block are written into
    one reused buffer (no meshgrid and concatenation per block), values go straight into
    the field on the CPU, and on a GPU the values of a whole slab of blocks stay on the
    device and come back in one copy. Memory beyond the returned field: O(chunk^3) points
    and the query's temporaries, plus, on a GPU, one slab of chunk x R x R values.

    Args:
        bound_min, bound_max: (3,) grid corners (sequence, numpy or torch).
        resolution: R, samples per axis, bounds included.
        query_fn: maps points (P, 3) float32 to values (P,) or (P, 1). With `device=None`
            it receives a numpy array; otherwise a torch tensor on `device` (run under
            `torch.no_grad()`). It may return numpy or torch.
        chunk: block edge; NeuS uses 64.
        device: None for numpy, or a torch device ("cpu", "cuda", ...).

    Returns:
        float32 (R, R, R): field[i, j, k] = query_fn at (x_i, y_j, z_k).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    axes = grid_axes(bound_min, bound_max, resolution)  # (3, R)
    field = np.zeros((resolution,) * 3, dtype=np.float32)  # calloc: pages are touched once, by the writes
    if device is None:
        _extract_fields_numpy(axes, query_fn, chunk, field)
    else:
        _extract_fields_torch(axes, query_fn, chunk, device, field)
    return field


def _extract_fields_numpy(axes: np.ndarray, query_fn: Callable, chunk: int, field: np.ndarray) -> None:
    resolution = axes.shape[1]
    buffer = np.zeros((min(chunk, resolution) ** 3, 3), dtype=np.float32)
    for i0 in _chunk_starts(resolution, chunk):
        xs = axes[0, i0 : i0 + chunk]
        for j0 in _chunk_starts(resolution, chunk):
            ys = axes[1, j0 : j0 + chunk]
            for k0 in _chunk_starts(resolution, chunk):
                zs = axes[2, k0 : k0 + chunk]
                shape = (len(xs), len(ys), len(zs))
                points = buffer[: math.prod(shape)]
                grid = points.reshape(*shape, 3)  # a view: writing it fills `points`
                grid[..., 0] = xs[:, None, None]
                grid[..., 1] = ys[None, :, None]
                grid[..., 2] = zs[None, None, :]
                values = query_fn(points)
                if hasattr(values, "detach"):
                    values = values.detach().cpu().numpy()
                field[i0 : i0 + shape[0], j0 : j0 + shape[1], k0 : k0 + shape[2]] = np.asarray(
                    values, dtype=np.float32
                ).reshape(shape)


def _extract_fields_torch(
    axes: np.ndarray, query_fn: Callable, chunk: int, device: Any, field: np.ndarray
) -> None:
    import torch

    resolution = axes.shape[1]
    device = torch.device(device)
    axes_t = torch.from_numpy(axes).to(device)  # (3, R)
    buffer = torch.zeros((min(chunk, resolution) ** 3, 3), dtype=torch.float32, device=device)
    on_host = device.type == "cpu"
    if not on_host:
        slab = torch.zeros(
            (min(chunk, resolution), resolution, resolution), dtype=torch.float32, device=device
        )
    with torch.no_grad():
        for i0 in _chunk_starts(resolution, chunk):
            if on_host:  # write straight into the numpy field through a shared-memory view
                slab = torch.from_numpy(field[i0 : i0 + chunk])
            xs = axes_t[0, i0 : i0 + chunk]
            for j0 in _chunk_starts(resolution, chunk):
                ys = axes_t[1, j0 : j0 + chunk]
                for k0 in _chunk_starts(resolution, chunk):
                    zs = axes_t[2, k0 : k0 + chunk]
                    shape = (len(xs), len(ys), len(zs))
                    points = buffer[: math.prod(shape)]
                    grid = points.view(*shape, 3)
                    grid[..., 0] = xs[:, None, None]
                    grid[..., 1] = ys[None, :, None]
                    grid[..., 2] = zs[None, None, :]
                    values = torch.as_tensor(query_fn(points), device=device, dtype=torch.float32)
                    slab[: shape[0], j0 : j0 + shape[1], k0 : k0 + shape[2]] = values.reshape(shape)
            if not on_host:  # one device->host copy per slab, straight into the numpy field
                torch.from_numpy(field[i0 : i0 + len(xs)]).copy_(slab[: len(xs)])


def marching_cubes(
    field: np.ndarray,
    threshold: float = 0.0,
    inside: Inside = "below",
    method: MarchingCubesMethod = "skimage",
) -> TriangleMesh:
    """The level set {field = threshold} in grid-index coordinates, triangles facing outward.

    Args:
        field: float (R0, R1, R2).
        threshold: the iso-value.
        inside: "below" if the object is where field < threshold (signed distances),
            "above" for NeuS's -sdf, occupancies and densities.
        method: "skimage" (Lewiner) or "pymcubes" (NeuS's `mcubes.marching_cubes`).

    Returns:
        vertices float32 (V, 3) in index units (0 .. R-1 per axis); faces int64 (F, 3).
        Empty arrays if the level is not crossed.
    """
    field = np.asarray(field, dtype=np.float32)
    if not (field.min() < threshold < field.max()):
        return TriangleMesh(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64))
    if method == "skimage":
        from skimage.measure import marching_cubes as skimage_marching_cubes

        vertices, faces, _, _ = skimage_marching_cubes(field, level=threshold)
        # skimage winds triangles counter-clockwise seen from the side of lower values
        flip = inside == "above"
    elif method == "pymcubes":
        import mcubes  # the PyPI package PyMCubes

        vertices, faces = mcubes.marching_cubes(field, threshold)
        # PyMCubes winds them counter-clockwise seen from the side of higher values
        flip = inside == "below"
    else:
        raise ValueError(f"unknown marching-cubes method {method!r}, expected 'skimage' or 'pymcubes'")
    faces = np.asarray(faces, dtype=np.int64)
    if flip:
        faces = faces[:, ::-1].copy()
    return TriangleMesh(np.asarray(vertices, dtype=np.float32), faces)


def extract_geometry(
    bound_min: Any,
    bound_max: Any,
    resolution: int,
    threshold: float,
    query_fn: Callable[[Any], Any],
    inside: Inside = "below",
    method: MarchingCubesMethod = "skimage",
    chunk: int = NEUS_CHUNK,
    device: Any = None,
) -> TriangleMesh:
    """Extract the surface {query_fn = threshold} inside the bounds (NeuS's `extract_geometry`).

    Args:
        bound_min, bound_max, resolution, query_fn, chunk, device: as `extract_fields`.
        threshold, inside, method: as `marching_cubes`.

    Returns:
        vertices float32 (V, 3) in the frame of the bounds
        (index / (R - 1) * (max - min) + min); faces int64 (F, 3), facing outward.
    """
    lo, hi = _to_numpy_bounds(bound_min, bound_max)
    field = extract_fields(lo, hi, resolution, query_fn, chunk=chunk, device=device)
    mesh = marching_cubes(field, threshold, inside=inside, method=method)
    vertices = mesh.vertices.astype(np.float64) / (resolution - 1) * (hi - lo) + lo  # (V, 3)
    return TriangleMesh(vertices.astype(np.float32), mesh.faces)


# ---------------------------------------------------------------------------------------
# Query functions


class MeshSDF:
    """Signed distance to a triangle mesh, negative inside; callable on numpy points (P, 3).

    The sign comes from the generalized winding number (libigl's fast winding number):
    a point is inside where |w| > 1/2, so open meshes, several overlapping parts and a
    globally inverted orientation all get a sensible inside. Distances are exact
    (libigl's AABB tree).

    With `truncation`, only points that may lie within it of the surface get an exact
    distance, the others get +-truncation (a truncated SDF, all that marching cubes
    needs). Which points may be near is decided, without false negatives, from a cell
    mask of dense surface samples dilated by the truncation: exact distances of far
    points are by far the slowest part of an AABB query. The winding number, the other
    cost, is then evaluated exactly only near the surface or the inside/outside boundary:
    elsewhere it comes from a coarse grid of exact values (see `_CoarseSign`).

    Args:
        vertices: float (V, 3).
        faces: int (F, 3).
        truncation: None for exact distances everywhere, else the band half-width
            (same units as the vertices).
    """

    def __init__(self, vertices: np.ndarray, faces: np.ndarray, truncation: float | None = None):
        import igl

        self.vertices = np.ascontiguousarray(vertices, dtype=np.float64).reshape(-1, 3)
        self.faces = np.ascontiguousarray(faces, dtype=np.int64).reshape(-1, 3)
        if len(self.faces) == 0:
            raise ValueError("MeshSDF needs at least one triangle")
        self.truncation = truncation
        self._tree = igl.AABB()
        self._tree.init(self.vertices, self.faces)
        self._band = self._coarse = None
        if truncation is not None:
            self._band = _NearSurfaceCells(self.vertices, self.faces, truncation)
            self._coarse = _CoarseSign(self, self._band)

    def winding_number(self, points: np.ndarray) -> np.ndarray:
        """float64 (P,): generalized winding number of each point (about 1 inside, 0 outside)."""
        import igl

        points = np.ascontiguousarray(points, dtype=np.float64).reshape(-1, 3)
        return igl.fast_winding_number(self.vertices, self.faces, points)

    def unsigned_distance(self, points: np.ndarray) -> np.ndarray:
        """float64 (P,): exact distance of each point to the surface."""
        points = np.ascontiguousarray(points, dtype=np.float64).reshape(-1, 3)
        if len(points) == 0:
            return np.zeros(0)
        squared, _, _ = self._tree.squared_distance(self.vertices, self.faces, points)
        return np.sqrt(squared)

    def __call__(self, points: np.ndarray) -> np.ndarray:
        """float32 (P,): signed distance of `points` (float (P, 3)), negative inside."""
        points = np.ascontiguousarray(points, dtype=np.float64).reshape(-1, 3)
        if self._band is None:
            inside = np.abs(self.winding_number(points)) > 0.5  # (P,)
            distance = self.unsigned_distance(points)
            return np.where(inside, -distance, distance).astype(np.float32)
        inside, unsure = self._coarse.lookup(points)  # (P,), (P,)
        unsure = np.flatnonzero(unsure)
        inside[unsure] = np.abs(self.winding_number(points[unsure])) > 0.5
        near = unsure[self._band.contains(points[unsure])]  # far from unsure cells is far from the surface
        distance = np.full(len(points), self.truncation)
        distance[near] = np.minimum(self.unsigned_distance(points[near]), self.truncation)
        return np.where(inside, -distance, distance).astype(np.float32)


class _NearSurfaceCells:
    """A conservative test "is this point within `distance` of the mesh surface?".

    Samples every triangle on a barycentric lattice so that each surface point lies within
    `spacing` of a sample, marks the cells (edge `cell`) holding samples and dilates that
    mask by enough cells that every point within `distance` of the surface lies in a
    marked cell. Points outside the mask are certainly farther than `distance`.
    """

    def __init__(self, vertices: np.ndarray, faces: np.ndarray, distance: float, cell: float | None = None):
        from scipy.ndimage import binary_dilation

        self.distance = float(distance)
        self.cell = float(cell if cell is not None else distance / 2)
        spacing = self.cell / 2
        # |q - sample| < distance + spacing for a point q within `distance` of the surface
        radius = int(math.floor((distance + spacing) / self.cell)) + 1
        self.origin = vertices.min(axis=0) - (radius + 1) * self.cell
        shape = (
            np.ceil((vertices.max(axis=0) + (radius + 1) * self.cell - self.origin) / self.cell).astype(int)
            + 1
        )
        mask = np.zeros(tuple(shape), dtype=bool)
        for samples in _lattice_surface_samples(vertices, faces, spacing):  # (S, 3) blocks
            idx = np.floor((samples - self.origin) / self.cell).astype(np.int64)  # (S, 3)
            mask[idx[:, 0], idx[:, 1], idx[:, 2]] = True
        self.mask = binary_dilation(mask, structure=np.ones((3, 3, 3), bool), iterations=radius)

    def contains(self, points: np.ndarray) -> np.ndarray:
        """bool (P,): True where a point may be within `distance` of the surface."""
        idx = np.floor((points - self.origin) / self.cell).astype(np.int64)  # (P, 3)
        valid = np.all((idx >= 0) & (idx < np.array(self.mask.shape)), axis=1)
        near = np.zeros(len(points), dtype=bool)
        near[valid] = self.mask[idx[valid, 0], idx[valid, 1], idx[valid, 2]]
        return near


class _CoarseSign:
    """Inside/outside of most points from a coarse grid of exact winding numbers.

    Away from the surface the winding number is harmonic, so it varies smoothly: a coarse
    cell that holds no near-surface cell (of `_NearSurfaceCells`) and whose 8 corners are
    on the same side of 1/2 gives that side to every point in it. The other cells are
    "unsure" and their points get the exact winding number. For a closed mesh the winding
    number is 0 or 1 off the surface and this is exact; for an open one the inside/outside
    boundary across a hole is located to within a coarse cell, then exactly inside it.
    Outside the mesh's bounding box every point is outside: a plane separates it from the
    mesh, so |w| <= 1/2.
    """

    def __init__(self, sdf: MeshSDF, band: _NearSurfaceCells, cells_per_coarse: int = 4):
        self.cell = band.cell * cells_per_coarse
        margin = band.distance + self.cell
        self.origin = sdf.vertices.min(axis=0) - margin
        nodes = np.ceil((sdf.vertices.max(axis=0) + margin - self.origin) / self.cell).astype(int) + 1  # (3,)
        axes = [self.origin[a] + self.cell * np.arange(nodes[a]) for a in range(3)]
        grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)  # (N0 * N1 * N2, 3)
        node_inside = (np.abs(sdf.winding_number(grid)) > 0.5).reshape(tuple(nodes))
        corners = [
            node_inside[i : nodes[0] - 1 + i, j : nodes[1] - 1 + j, k : nodes[2] - 1 + k]
            for i in (0, 1)
            for j in (0, 1)
            for k in (0, 1)
        ]  # 8 x (C0, C1, C2)
        agree = np.all([c == corners[0] for c in corners[1:]], axis=0)
        # coarse cells overlapped by a near-surface cell (each overlaps at most 2 per axis)
        near_cells = np.argwhere(band.mask)  # (M, 3)
        touched = np.zeros(tuple(nodes - 1), dtype=bool)
        for corner in (0, 1):
            edge = band.origin + (near_cells + corner) * band.cell  # (M, 3) low or high corner
            idx = np.clip(np.floor((edge - self.origin) / self.cell).astype(np.int64), 0, nodes - 2)
            touched[idx[:, 0], idx[:, 1], idx[:, 2]] = True
        # low and high corners span the cells between them only if a near cell straddles
        # two coarse cells along several axes at once: mark those mixed corners too
        for mix in ((0, 0, 1), (0, 1, 0), (1, 0, 0), (0, 1, 1), (1, 0, 1), (1, 1, 0)):
            edge = band.origin + (near_cells + np.array(mix)) * band.cell
            idx = np.clip(np.floor((edge - self.origin) / self.cell).astype(np.int64), 0, nodes - 2)
            touched[idx[:, 0], idx[:, 1], idx[:, 2]] = True
        self.unsure = ~agree | touched  # (C0, C1, C2)
        self.inside = corners[0]  # (C0, C1, C2), the side of a sure cell

    def lookup(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """bool (P,) inside where sure, and bool (P,) unsure."""
        idx = np.floor((points - self.origin) / self.cell).astype(np.int64)  # (P, 3)
        valid = np.all((idx >= 0) & (idx < np.array(self.unsure.shape)), axis=1)
        inside = np.zeros(len(points), dtype=bool)
        unsure = np.zeros(len(points), dtype=bool)
        cells = idx[valid]
        inside[valid] = self.inside[cells[:, 0], cells[:, 1], cells[:, 2]]
        unsure[valid] = self.unsure[cells[:, 0], cells[:, 1], cells[:, 2]]
        return inside, unsure


def _lattice_surface_samples(
    vertices: np.ndarray, faces: np.ndarray, spacing: float, max_points: int = 2**20
) -> Iterator[np.ndarray]:
    """Points on every triangle such that each surface point is within `spacing` of one
    (a barycentric lattice of n steps, n from the longest edge), as float64 (S, 3) blocks
    of at most about `max_points` (one lattice of a huge triangle may exceed it)."""
    tri = vertices[faces]  # (F, 3, 3)
    longest = np.max(np.linalg.norm(tri - np.roll(tri, 1, axis=1), axis=-1), axis=1)  # (F,)
    steps = np.maximum(np.ceil(longest / spacing), 1).astype(np.int64)  # (F,)
    for n in np.unique(steps):
        i, j = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
        keep = i + j <= n
        bary = np.stack([i[keep], j[keep], n - i[keep] - j[keep]], axis=1) / n  # (L, 3)
        group = tri[steps == n]  # (G, 3, 3)
        per_block = max(1, max_points // len(bary))
        for start in range(0, len(group), per_block):
            block = group[start : start + per_block]
            yield np.einsum("lk,gkd->gld", bary, block).reshape(-1, 3)  # (B * L, 3)


class VoxelSDF:
    """Truncated signed distance to the union of voxel cubes, negative inside; callable on
    numpy points (P, 3).

    Voxel (i, j, k) of a `resolution`^3 grid is the cube [-0.5 + i/R, -0.5 + (i+1)/R] per
    axis (TRELLIS's `voxels/<sha>.ply` stores its centre). Distances are exact up to the
    truncation and clipped to it: to the nearest occupied cube outside, to the nearest empty
    cube (the grid's outside counts as empty) inside. The nearest cube within `truncation`
    lies at most ceil(truncation * R) cells away per axis, so only those offsets are tested.

    Args:
        indices: int (N, 3), voxel indices in [0, resolution).
        resolution: voxels per axis (64 in TRELLIS).
        fill_interior: also count as occupied the empty voxels enclosed by the voxel shell,
            so a closed surface-voxel shell becomes a solid with one outer surface.
        truncation: in the normalized frame; defaults to one voxel (all that marching cubes
            on a grid finer than the voxels needs). Cost grows as (2 ceil(truncation R) + 1)^3.
    """

    def __init__(
        self,
        indices: np.ndarray,
        resolution: int = TRELLIS_RESOLUTION,
        fill_interior: bool = True,
        truncation: float | None = None,
    ):
        from scipy.ndimage import binary_dilation, binary_erosion, binary_fill_holes

        indices = np.asarray(indices, dtype=np.int64).reshape(-1, 3)
        if len(indices) == 0:
            raise ValueError("VoxelSDF needs at least one voxel")
        if indices.min() < 0 or indices.max() >= resolution:
            raise ValueError(
                f"voxel indices must lie in [0, {resolution}), got [{indices.min()}, {indices.max()}]"
            )
        self.resolution = resolution
        self.truncation = 1.0 / resolution if truncation is None else float(truncation)
        self.reach = max(1, math.ceil(self.truncation * resolution))  # cells per axis to search
        occupied = np.zeros((resolution,) * 3, dtype=bool)
        occupied[indices[:, 0], indices[:, 1], indices[:, 2]] = True
        if fill_interior:
            occupied = binary_fill_holes(occupied)
        self.occupied = occupied
        # an empty margin wide enough that a cell clipped into it sees only empty neighbours
        self._pad = 2 * self.reach + 1
        padded = np.pad(occupied, self._pad)
        self._padded = padded.ravel()
        self._shape = np.array(padded.shape)
        self._strides = np.array([padded.shape[1] * padded.shape[2], padded.shape[2], 1])
        # cells whose neighbourhood is all occupied or all empty are farther than the
        # truncation from the boundary: they skip the search
        structure = np.ones((3, 3, 3), dtype=bool)
        grown = binary_dilation(padded, structure, iterations=self.reach)
        shrunk = binary_erosion(padded, structure, iterations=self.reach, border_value=0)
        self._near = (grown & ~shrunk).ravel()
        span = np.arange(-self.reach, self.reach + 1)
        self._offsets = np.stack(np.meshgrid(span, span, span, indexing="ij"), -1).reshape(-1, 3)

    def __call__(self, points: np.ndarray) -> np.ndarray:
        """float32 (P,): signed distance of `points` (float (P, 3)), clipped to +-truncation."""
        points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        u = (points + 0.5) * self.resolution + self._pad  # (P, 3) continuous index in the padded grid
        cell = np.clip(np.floor(u), self.reach, self._shape - 1 - self.reach).astype(np.int64)  # (P, 3)
        flat = cell @ self._strides  # (P,)
        inside = self._padded[flat]  # (P,)
        distance = np.full(len(points), self.truncation)
        near = np.flatnonzero(self._near[flat])
        if len(near):
            frac = u[near] - cell[near]  # (N, 3), outside [0, 1) only for clipped far points
            flat, side = flat[near], inside[near]
            best = np.full(len(near), np.inf)  # squared distance in cell units
            for offset in self._offsets:
                other = self._padded[flat + offset @ self._strides] != side  # (N,)
                gap = np.maximum(np.maximum(offset - frac, frac - offset - 1), 0)  # (N, 3)
                best = np.where(other, np.minimum(best, np.einsum("ni,ni->n", gap, gap)), best)
            distance[near] = np.minimum(np.sqrt(best) / self.resolution, self.truncation)
        return np.where(inside, -distance, distance).astype(np.float32)


# ---------------------------------------------------------------------------------------
# Meshes for the dataset


def padded_unit_cube_grid(resolution: int, pad_cells: float) -> tuple[np.ndarray, np.ndarray]:
    """Bounds of a grid of `resolution` that covers [-0.5, 0.5]^3 with `pad_cells` spacings
    to spare on each side, so a surface touching the unit cube still closes.

    Returns:
        bound_min, bound_max: float64 (3,).
    """
    spacing = 1.0 / (resolution - 1 - 2 * pad_cells)
    half = 0.5 + pad_cells * spacing
    return np.full(3, -half), np.full(3, half)


def watertight_mesh(
    vertices: np.ndarray,
    faces: np.ndarray,
    resolution: int = 256,
    pad_cells: int = 2,
    truncation_cells: float = 2.0,
    method: MarchingCubesMethod = "skimage",
    chunk: int = 128,
) -> TriangleMesh:
    """A watertight mesh of a mesh's winding-number inside, by marching cubes on its SDF.

    Args:
        vertices: float (V, 3) in the normalized [-0.5, 0.5]^3 frame.
        faces: int (F, 3).
        resolution: grid samples per axis over the padded unit cube.
        pad_cells: grid spacings of margin beyond the unit cube on each side.
        truncation_cells: half-width of the band of exact distances, in grid spacings;
            marching cubes only reads values next to a sign change (at most one spacing
            from the surface).
        method: marching-cubes library.
        chunk: block edge of the field evaluation; larger blocks amortise the winding
            number's per-call tree build.

    Returns:
        vertices float32 (V, 3) in the same frame; faces int64 (F, 3), facing outward.
    """
    bound_min, bound_max = padded_unit_cube_grid(resolution, pad_cells)
    spacing = (bound_max[0] - bound_min[0]) / (resolution - 1)
    sdf = MeshSDF(vertices, faces, truncation=truncation_cells * spacing)
    return extract_geometry(
        bound_min, bound_max, resolution, 0.0, sdf, inside="below", method=method, chunk=chunk
    )


def voxel_mesh(
    indices: np.ndarray,
    resolution: int = TRELLIS_RESOLUTION,
    level_voxels: float = -0.45,
    samples_per_voxel: int = 2,
    fill_interior: bool = True,
    method: MarchingCubesMethod = "skimage",
) -> TriangleMesh:
    """A surface rebuilt from voxels: marching cubes on `VoxelSDF` at `level_voxels` voxels.

    Surface voxels straddle the surface they came from, so the union of their cubes lies up
    to one voxel outside it. The default level, 0.45 voxel inside that union, passes near the
    centres of the outer voxel layer (for a filled solid) and turns a one-voxel-thick sheet
    (an open surface) into a thin closed shell around its mid-plane.

    Args:
        indices: int (N, 3) voxel indices in [0, resolution).
        resolution: voxels per axis.
        level_voxels: iso-level of the voxel SDF, in voxels (negative: inside the union).
        samples_per_voxel: grid spacings per voxel edge; the grid holds every voxel
            centre and face, and two spacings of margin beyond the unit cube.
        fill_interior, method: as `VoxelSDF` and `marching_cubes`.

    Returns:
        vertices float32 (V, 3) in the normalized [-0.5, 0.5]^3 frame; faces int64 (F, 3).
    """
    spacing = 1.0 / (resolution * samples_per_voxel)
    pad = 2  # spacings of margin: the surface closes even where voxels touch the cube
    half = 0.5 + pad * spacing
    grid_resolution = resolution * samples_per_voxel + 2 * pad + 1
    # marching cubes reads values up to one grid spacing past the level
    truncation = (abs(level_voxels) + 1 / samples_per_voxel) / resolution
    sdf = VoxelSDF(indices, resolution, fill_interior=fill_interior, truncation=truncation)
    level = level_voxels / resolution
    return extract_geometry(np.full(3, -half), np.full(3, half), grid_resolution, level, sdf, method=method)


def signed_volume(mesh: TriangleMesh) -> float:
    """The signed volume enclosed by a closed mesh: positive when its triangles face outward."""
    tri = mesh.vertices.astype(np.float64)[mesh.faces]  # (F, 3, 3)
    return float(np.einsum("fi,fi->f", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6.0)


# ---------------------------------------------------------------------------------------
# Stage functions: one asset at a time, errors as AssetError


def write_mesh_ply(path: str | os.PathLike, mesh: TriangleMesh) -> None:
    """Write a binary little-endian triangle PLY (float32 x, y, z; int32 index lists), atomically,
    read back and checked before the rename.

    Raises:
        OutputCheckError: no faces, or the file does not read back as written.
    """
    import errno

    from plyfile import PlyData, PlyElement

    from slatflow.errors import AssetError
    from slatflow.io import OutputCheckError, atomic_path
    from slatflow.io import read_mesh_ply

    vertex = np.zeros(len(mesh.vertices), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4")])
    vertex["x"], vertex["y"], vertex["z"] = np.asarray(mesh.vertices, dtype=np.float32).T
    face = np.zeros(len(mesh.faces), dtype=[("vertex_indices", "<i4", (3,))])
    face["vertex_indices"] = mesh.faces
    ply = PlyData([PlyElement.describe(vertex, "vertex"), PlyElement.describe(face, "face")], byte_order="<")
    if len(mesh.faces) == 0:
        raise OutputCheckError(f"{path}: no faces to write")
    with atomic_path(path) as tmp:
        ply.write(str(tmp))
        try:
            vertices, faces = read_mesh_ply("", tmp, MESHES.name)  # the read-back of the writer
        except AssetError as exc:
            raise OutputCheckError(errno.EIO, f"{path} does not read back (Input/output error): {exc.reason}") from exc
        if len(vertices) != len(mesh.vertices) or not np.array_equal(faces, mesh.faces):
            raise OutputCheckError(errno.EIO, f"{path} reads back unlike what was written (Input/output error)")


def extract_mesh_asset(
    sha256: str,
    mesh_path: str | os.PathLike,
    out_path: str | os.PathLike,
    resolution: int = 256,
    method: MarchingCubesMethod = "skimage",
) -> TriangleMesh:
    """`meshes/<sha>.ply`: the watertight mesh of one asset's `renders/<sha>/mesh.ply`.

    Raises:
        AssetError: the source mesh cannot be read, or encloses nothing at this resolution.
    """
    from slatflow.errors import AssetError
    from slatflow.io import read_mesh_ply

    vertices, faces = read_mesh_ply(sha256, mesh_path, MESHES.name)
    if not np.isfinite(vertices).all():
        raise AssetError(sha256, f"mesh {mesh_path} has non-finite vertices", MESHES.name)
    mesh = watertight_mesh(vertices, faces, resolution=resolution, method=method)
    if len(mesh.faces) == 0:
        raise AssetError(
            sha256,
            f"mesh {mesh_path} encloses no volume at {resolution}^3 (flat or open everywhere?)",
            MESHES.name,
        )
    write_mesh_ply(out_path, mesh)
    logger.info(
        "asset %s: watertight mesh %d vertices, %d faces at %d^3",
        sha256,
        len(mesh.vertices),
        len(mesh.faces),
        resolution,
    )
    return mesh


class SDFSamples(NamedTuple):
    """Training samples of a signed distance field.

    points: float32 (N, 3), normalized frame; near-surface samples first, then uniform ones.
    sdf: float32 (N,), signed distance to the watertight mesh, negative inside.
    """

    points: np.ndarray
    sdf: np.ndarray


def sample_sdf(
    mesh: TriangleMesh,
    num_near: int,
    num_uniform: int,
    near_std: Sequence[float],
    uniform_bound: float,
    rng: np.random.Generator,
) -> SDFSamples:
    """SDF samples of a closed mesh, DeepSDF-style.

    Args:
        mesh: a watertight mesh, normalized frame.
        num_near: points on the surface (area-weighted) moved by Gaussian noise; split
            evenly over the standard deviations of `near_std`.
        num_uniform: points uniform in [-uniform_bound, uniform_bound]^3.
        near_std: noise standard deviations, normalized units.
        uniform_bound: half-edge of the uniform cube.
        rng: the generator.
    """
    import trimesh

    surface = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
    shares = np.diff(np.linspace(0, num_near, len(near_std) + 1).round().astype(int))  # per std
    near = []
    for std, count in zip(near_std, shares):
        points, _ = trimesh.sample.sample_surface(surface, int(count), seed=rng)
        near.append(points + rng.normal(scale=std, size=points.shape))  # (count, 3)
    uniform = rng.uniform(-uniform_bound, uniform_bound, size=(num_uniform, 3))  # (U, 3)
    points = np.concatenate(near + [uniform]).astype(np.float32)  # (N, 3)
    return SDFSamples(points, MeshSDF(mesh.vertices, mesh.faces)(points))


def sample_sdf_asset(
    sha256: str,
    mesh_path: str | os.PathLike,
    out_path: str | os.PathLike,
    num_near: int = 250_000,
    num_uniform: int = 25_000,
    near_std: Sequence[float] = (0.0025, 0.01),
    uniform_bound: float = 0.55,
    seed: int = 0,
) -> SDFSamples:
    """`sdf/<sha>.npz` (`points`, `sdf`) from the watertight `meshes/<sha>.ply`; the
    generator is seeded from `seed` and the sha256, so a rerun writes the same samples."""
    from slatflow.io import save_npz_atomic
    from slatflow.io import read_mesh_ply

    mesh = TriangleMesh(*read_mesh_ply(sha256, mesh_path, SDF.name))
    import hashlib

    rng = np.random.default_rng([seed, int(hashlib.sha256(sha256.encode()).hexdigest()[:16], 16)])
    samples = sample_sdf(mesh, num_near, num_uniform, near_std, uniform_bound, rng)
    save_npz_atomic(out_path, points=samples.points, sdf=samples.sdf)
    return samples


def check_quality_asset(
    sha256: str,
    source_mesh: str | os.PathLike,
    out_path: str | os.PathLike,
    watertight_mesh: str | os.PathLike | None = None,
    voxels: str | os.PathLike | None = None,
    render_dir: str | os.PathLike | None = None,
    settings: Any = None,
    voxel_resolution: int = TRELLIS_RESOLUTION,
) -> dict:
    """Run the quality checks of one asset (slatflow.quality's metrics on this module's
    meshes) and write its record to `out_path` (JSON, atomically).

    Args:
        sha256: the asset.
        source_mesh: `renders/<sha>/mesh.ply`, the reference.
        out_path: `quality/<sha>.json`.
        watertight_mesh: `meshes/<sha>.ply`, or None to skip that check.
        voxels: `voxels/<sha>.ply` (voxel centres), or None.
        render_dir: `renders/<sha>/`, or None.
        settings: a `quality.QualitySettings` (sample count, threshold, seed, flags);
            None for the defaults.
        voxel_resolution: the grid of `voxels` (`voxelize.resolution`).

    Returns:
        The record: `mesh` and `voxels` (SurfaceMetrics fields or None), `masks`
        (MaskCoverage fields or None), `num_voxels`, `seconds` per check, `suspicious`
        (list of reasons), and the `convention`.

    Raises:
        AssetError: an input cannot be read or has no surface.
    """
    from slatflow.errors import AssetError
    from slatflow.io import read_ply_points, write_json_atomic, written_by
    from slatflow.quality import QualitySettings, render_mask_coverage, suspicious_reasons, surface_metrics
    from slatflow.io import read_mesh_ply

    settings = QualitySettings() if settings is None else settings
    seconds: dict[str, float] = {}
    record: dict = {"sha256": sha256, "mesh": None, "voxels": None, "masks": None, "num_voxels": None}
    reference = TriangleMesh(*read_mesh_ply(sha256, source_mesh, QUALITY.name))

    def compare(name: str, checked: TriangleMesh) -> dict:
        start = time.perf_counter()
        rng = np.random.default_rng(settings.seed)
        try:
            metrics = surface_metrics(
                checked, reference, settings.num_samples, settings.fscore_threshold, rng
            )
        except ValueError as exc:
            raise AssetError(sha256, f"{name}: {exc}", QUALITY.name) from exc
        seconds[name] = time.perf_counter() - start
        return metrics._asdict()

    if watertight_mesh is not None:
        record["mesh"] = compare("mesh", TriangleMesh(*read_mesh_ply(sha256, watertight_mesh, QUALITY.name)))
    if voxels is not None:
        try:
            centres = read_ply_points(voxels)  # (N, 3) float32 voxel centres
        except Exception as exc:  # noqa: BLE001 - plyfile raises many types for a bad file
            raise AssetError(sha256, f"cannot read voxels {written_by(voxels)}: {type(exc).__name__}: {exc}", QUALITY.name) from exc
        indices = voxel_indices(centres, voxel_resolution)  # (N, 3)
        if len(indices) == 0 or outside_grid(indices, voxel_resolution).any():
            raise AssetError(
                sha256,
                f"voxels {voxels}: {len(indices)} centres, expected >= 1 inside [-0.5, 0.5]^3",
                QUALITY.name,
            )
        record["num_voxels"] = int(len(indices))
        start = time.perf_counter()
        rebuilt = voxel_mesh(indices, voxel_resolution, samples_per_voxel=settings.voxel_samples_per_voxel)
        seconds["voxel_mesh"] = time.perf_counter() - start
        record["voxels"] = compare("voxels", rebuilt)
    if render_dir is not None:
        start = time.perf_counter()
        record["masks"] = render_mask_coverage(render_dir)._asdict()
        seconds["masks"] = time.perf_counter() - start
    record["seconds"] = seconds
    record["suspicious"] = suspicious_reasons(record, settings.thresholds)
    record["convention"] = (
        f"Chamfer-L1 = mean of the two directed mean distances from {settings.num_samples} area-weighted "
        f"samples to the other surface; F-score at {settings.fscore_threshold}; unit-cube frame of mesh.ply"
    )
    write_json_atomic(out_path, record)
    if record["suspicious"]:
        logger.warning("asset %s is suspicious: %s", sha256, "; ".join(record["suspicious"]))
    return record
