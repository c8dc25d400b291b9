"""Meshes for the voxelizer's tests and benchmark, and Open3D as the reference voxelizer.

Every mesh is (vertices float64 (V, 3), faces int64 (F, 3)) in the normalized
[-0.5, 0.5]^3 frame unless its name says it leaves it. Randomness is seeded.
Imports of trimesh and open3d are inside the functions that need them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

Mesh = tuple[np.ndarray, np.ndarray]  # vertices float64 (V, 3), faces int64 (F, 3)


def normalize_vertices(vertices: np.ndarray) -> np.ndarray:
    """The contract's normalization: AABB centred at the origin, longest side 1."""
    vertices = np.asarray(vertices, dtype=np.float64)
    lo, hi = vertices.min(axis=0), vertices.max(axis=0)
    return (vertices - (lo + hi) / 2) / (hi - lo).max()


def bumpy_torus(num_triangles: int) -> Mesh:
    """A closed, wavy torus with about `num_triangles` triangles (a scan-like surface).

    A (rows x 2 rows) grid of quads in (u, v), two triangles each.
    """
    rows = max(3, int(round(np.sqrt(num_triangles / 4))))
    cols = 2 * rows
    u = np.linspace(0, 2 * np.pi, cols, endpoint=False)  # (C,) around the ring
    v = np.linspace(0, 2 * np.pi, rows, endpoint=False)  # (R,) around the tube
    uu, vv = np.meshgrid(u, v, indexing="ij")  # (C, R)
    tube = 0.3 + 0.03 * np.sin(7 * uu) * np.cos(5 * vv)  # (C, R)
    ring = 1.0 + tube * np.cos(vv)
    vertices = np.stack([ring * np.cos(uu), ring * np.sin(uu), 0.8 * tube * np.sin(vv)], axis=-1)
    vertices = normalize_vertices(vertices.reshape(-1, 3))  # (C * R, 3)
    ci, ri = np.meshgrid(np.arange(cols), np.arange(rows), indexing="ij")  # (C, R)
    a = ci * rows + ri
    b = ((ci + 1) % cols) * rows + ri
    c = ((ci + 1) % cols) * rows + (ri + 1) % rows
    d = ci * rows + (ri + 1) % rows
    faces = np.concatenate([np.stack([a, b, c], -1), np.stack([a, c, d], -1)]).reshape(-1, 3)
    return vertices, faces.astype(np.int64)


def triangle_soup(num_triangles: int, size: float, rng: np.random.Generator, extent: float = 0.5) -> Mesh:
    """Independent triangles: a random corner in [-extent, extent]^3, edges up to `size`."""
    corner = rng.uniform(-extent, extent, (num_triangles, 1, 3))  # (T, 1, 3)
    vertices = corner + rng.uniform(-size, size, (num_triangles, 3, 3))  # (T, 3, 3)
    if extent <= 0.5:
        vertices = np.clip(vertices, -0.5, 0.5)
    return vertices.reshape(-1, 3), np.arange(3 * num_triangles, dtype=np.int64).reshape(-1, 3)


def huge_triangle_soup(num_triangles: int, rng: np.random.Generator) -> Mesh:
    """Triangles with corners anywhere in the cube: each crosses a large part of the grid."""
    vertices = rng.uniform(-0.5, 0.5, (3 * num_triangles, 3))
    return vertices, np.arange(3 * num_triangles, dtype=np.int64).reshape(-1, 3)


def lattice_soup(num_triangles: int, spacing: float, rng: np.random.Generator, offset: float = 0.0) -> Mesh:
    """Triangles with corners on a lattice of `spacing` (grid planes, edges, nodes: ties)."""
    steps = int(round(1 / spacing))
    vertices = rng.integers(0, steps + 1, (3 * num_triangles, 3)) * spacing - 0.5 + offset
    # Short triangles too: half of them are a lattice point plus small lattice steps.
    half = num_triangles // 2 * 3
    base = np.repeat(vertices[:half:3], 3, axis=0)  # (half, 3)
    vertices[:half] = np.clip(base + rng.integers(-2, 3, (half, 3)) * spacing, -0.5, 0.5)
    return vertices, np.arange(3 * num_triangles, dtype=np.int64).reshape(-1, 3)


def grid_plane_quads(resolution: int) -> Mesh:
    """Axis-aligned squares lying exactly on grid planes (both neighbouring voxels touch)."""
    k = np.array([3, 17, resolution // 2, resolution - 5])  # plane indices
    quads = []
    for axis in range(3):
        for plane in k:
            lo, hi = 2 / resolution - 0.5, (resolution - 9) / resolution - 0.5
            square = np.array([[lo, lo], [hi, lo], [hi, hi], [lo, hi]])  # (4, 2)
            corners = np.insert(square, axis, plane / resolution - 0.5, axis=1)  # (4, 3)
            quads.append(corners)
    vertices = np.concatenate(quads)  # (4 Q, 3)
    start = 4 * np.arange(len(quads))[:, None]
    faces = np.concatenate([start + [0, 1, 2], start + [0, 2, 3]])
    return vertices, faces.astype(np.int64)


def grid_aligned_box(resolution: int) -> Mesh:
    """A box whose faces lie on grid planes (trimesh box of 24 x 10 x 6 voxels)."""
    import trimesh

    box = trimesh.creation.box(extents=np.array([24, 10, 6]) / resolution)
    vertices = box.vertices + np.array([1, 0, -3]) / resolution
    return np.asarray(vertices, dtype=np.float64), np.asarray(box.faces, dtype=np.int64)


def degenerate_triangles(resolution: int, rng: np.random.Generator) -> Mesh:
    """Points, segments and repeated-vertex triangles, many on grid nodes and lines."""
    step = 1 / resolution
    nodes = rng.integers(1, resolution, (40, 3)) * step - 0.5  # (40, 3) grid nodes
    points = np.repeat(nodes, 3, axis=0)  # every corner equal: zero-size triangles
    direction = np.eye(3)[rng.integers(0, 3, 40)] * step * rng.integers(1, 6, (40, 1))
    along_lines = np.stack([nodes, nodes + direction, nodes + 2 * direction], axis=1)  # (40, 3, 3)
    free = rng.uniform(-0.45, 0.45, (40, 3))
    collinear = np.stack([free, free + 0.1 * (free[::-1] - free), free + 0.37 * (free[::-1] - free)], 1)
    repeated = np.stack([free, free, free[::-1]], axis=1)  # two equal corners
    vertices = np.concatenate([points, along_lines.reshape(-1, 3), collinear.reshape(-1, 3),
                               repeated.reshape(-1, 3)])
    vertices = np.clip(vertices, -0.5, 0.5)
    return vertices, np.arange(len(vertices), dtype=np.int64).reshape(-1, 3)


def slivers(rng: np.random.Generator) -> Mesh:
    """Long triangles of tiny width (1e-9 to 1e-15): badly conditioned normals."""
    start = rng.uniform(-0.5, 0.5, (60, 3))
    end = rng.uniform(-0.5, 0.5, (60, 3))
    width = 10.0 ** -rng.integers(9, 16, (60, 1))
    third = (start + end) / 2 + width * rng.normal(size=(60, 3))
    vertices = np.clip(np.stack([start, end, third], axis=1), -0.5, 0.5).reshape(-1, 3)
    return vertices, np.arange(len(vertices), dtype=np.int64).reshape(-1, 3)


def beyond_grid_triangles(rng: np.random.Generator) -> Mesh:
    """A few triangles larger than the grid, corners up to 1.5 outside it."""
    vertices = rng.uniform(-2.0, 2.0, (6 * 3, 3))
    return vertices, np.arange(len(vertices), dtype=np.int64).reshape(-1, 3)


def trimesh_primitive(name: str) -> Mesh:
    """A trimesh primitive, normalized to [-0.5, 0.5]^3 and turned by a fixed rotation."""
    import trimesh

    rng = np.random.default_rng(len(name))
    makers: dict[str, Callable[[], trimesh.Trimesh]] = {
        "icosphere": lambda: trimesh.creation.icosphere(subdivisions=4),
        "box": lambda: trimesh.creation.box(),
        "cylinder": lambda: trimesh.creation.cylinder(radius=0.3, height=1.0, sections=48),
        "cone": lambda: trimesh.creation.cone(radius=0.5, height=1.0, sections=40),
        "capsule": lambda: trimesh.creation.capsule(height=1.0, radius=0.2),
        "torus": lambda: trimesh.creation.torus(major_radius=1.0, minor_radius=0.25),
        "annulus": lambda: trimesh.creation.annulus(r_min=0.2, r_max=0.5, height=0.3),
    }
    mesh = makers[name]()
    rotation = trimesh.transformations.random_rotation_matrix(rng.random(3))
    mesh.apply_transform(rotation)
    return normalize_vertices(mesh.vertices), np.asarray(mesh.faces, dtype=np.int64)


PRIMITIVES = ("icosphere", "box", "cylinder", "cone", "capsule", "torus", "annulus")
TRIMESH_FORMATS = (".glb", ".gltf", ".obj", ".ply", ".stl")  # what trimesh loads itself


def sample_asset_meshes(folder: Path) -> dict[str, Mesh]:
    """The sample assets trimesh can load, as one normalized mesh each (scene flattened)."""
    import trimesh

    meshes = {}
    for path in sorted(Path(folder).rglob("*")):
        if path.suffix.lower() not in TRIMESH_FORMATS:
            continue
        loaded = trimesh.load(path, force="mesh", process=False)
        if len(loaded.faces) == 0:
            continue
        meshes[path.name] = (normalize_vertices(loaded.vertices), np.asarray(loaded.faces, dtype=np.int64))
    return meshes


def open3d_voxels(vertices: np.ndarray, faces: np.ndarray, resolution: int) -> np.ndarray:
    """Open3D's voxel indices, int64 (N, 3) in Open3D's order (may leave [0, resolution))."""
    import open3d as o3d

    mesh = open3d_mesh(vertices, faces)
    grid = o3d.geometry.VoxelGrid.create_from_triangle_mesh_within_bounds(
        mesh, 1 / resolution, (-0.5, -0.5, -0.5), (0.5, 0.5, 0.5)
    )
    return np.array([voxel.grid_index for voxel in grid.get_voxels()], dtype=np.int64).reshape(-1, 3)


def open3d_mesh(vertices: np.ndarray, faces: np.ndarray):
    import open3d as o3d

    return o3d.geometry.TriangleMesh(
        o3d.utility.Vector3dVector(np.asarray(vertices, dtype=np.float64)),
        o3d.utility.Vector3iVector(np.asarray(faces, dtype=np.int32)),
    )


def in_grid(indices: np.ndarray, resolution: int) -> np.ndarray:
    """The rows of int (N, 3) `indices` inside [0, resolution)^3, sorted and unique."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1, 3)
    inside = ((indices >= 0) & (indices < resolution)).all(axis=1)  # (N,)
    return np.unique(indices[inside], axis=0)


def write_mesh_ply(path: Path, vertices: np.ndarray, faces, text: bool = False) -> Path:
    """A mesh PLY as Blender's exporter writes it: float32 xyz, normals, uv, colours, face lists.

    Args:
        faces: int (F, 3) triangles, or a list of index lists (polygons allowed).
    """
    from plyfile import PlyData, PlyElement

    vertices = np.asarray(vertices, dtype=np.float64).reshape(-1, 3)
    vertex = np.zeros(
        len(vertices),
        dtype=[(n, "<f4") for n in ("x", "y", "z", "nx", "ny", "nz", "s", "t")]
        + [(n, "u1") for n in ("red", "green", "blue", "alpha")],
    )
    for axis, name in enumerate("xyz"):
        vertex[name] = vertices[:, axis]
    vertex["nz"] = 1.0
    vertex["red"] = 200
    triangles = isinstance(faces, np.ndarray) and faces.ndim == 2 and faces.shape[1] == 3
    if triangles or (len(faces) and all(len(f) == 3 for f in faces)):  # fixed-length lists: fast
        face = np.zeros(len(faces), dtype=[("vertex_indices", "<u4", (3,))])
        face["vertex_indices"] = np.asarray(faces, dtype=np.uint32).reshape(-1, 3)
    else:
        face = np.zeros(len(faces), dtype=[("vertex_indices", "O")])
        face["vertex_indices"] = [np.asarray(f, dtype=np.uint32) for f in faces]
    elements = [
        PlyElement.describe(vertex, "vertex"),
        PlyElement.describe(face, "face", len_types={"vertex_indices": "u1"}),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    PlyData(elements, text=text, byte_order="<").write(str(path))
    return path


def trellis_voxelize_file(mesh_path: Path, resolution: int = 64) -> np.ndarray:
    """TRELLIS's voxelize step with Open3D: read, clamp, voxelize, voxel centres.

    Returns:
        float64 (N, 3) voxel centres in Open3D's order.
    """
    import open3d as o3d

    mesh = o3d.io.read_triangle_mesh(str(mesh_path))
    vertices = np.clip(np.asarray(mesh.vertices), -0.5 + 1e-6, 0.5 - 1e-6)
    mesh.vertices = o3d.utility.Vector3dVector(vertices)
    grid = o3d.geometry.VoxelGrid.create_from_triangle_mesh_within_bounds(
        mesh, 1 / resolution, (-0.5, -0.5, -0.5), (0.5, 0.5, 0.5)
    )
    indices = np.array([voxel.grid_index for voxel in grid.get_voxels()], dtype=np.int64).reshape(-1, 3)
    assert ((indices >= 0) & (indices < resolution)).all(), "Open3D left the grid"
    return (indices + 0.5) / resolution - 0.5

