"""The voxelizer against Open3D (the reference TRELLIS uses), its semantics, its I/O and errors."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from plyfile import PlyData, PlyElement
from voxelize_fixtures import (
    PRIMITIVES,
    beyond_grid_triangles,
    bumpy_torus,
    degenerate_triangles,
    grid_aligned_box,
    grid_plane_quads,
    huge_triangle_soup,
    in_grid,
    lattice_soup,
    open3d_voxels,
    sample_asset_meshes,
    slivers,
    triangle_soup,
    trellis_voxelize_file,
    trimesh_primitive,
    write_mesh_ply,
)

from slatflow.errors import AssetError
from slatflow.voxelize import clamp_vertices, voxel_centres, voxelize_asset, voxelize_mesh

REPO = Path(__file__).resolve().parents[1]
SAMPLE_ASSETS = REPO / "sample" / "assets"


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def clamped(mesh: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return clamp_vertices(mesh[0]), mesh[1]


# (name, mesh builder, resolution). Builders run inside the test, so collection stays fast.
COMPARISON_CASES: list[tuple[str, Callable[[], tuple[np.ndarray, np.ndarray]], int]] = [
    *[(f"primitive-{name}", lambda name=name: trimesh_primitive(name), 64) for name in PRIMITIVES],
    ("primitive-icosphere-128", lambda: trimesh_primitive("icosphere"), 128),
    ("primitive-torus-256", lambda: trimesh_primitive("torus"), 256),
    ("bumpy-torus-10k", lambda: bumpy_torus(10_000), 64),
    ("bumpy-torus-100k-128", lambda: bumpy_torus(100_000), 128),
    ("bumpy-torus-1M", lambda: bumpy_torus(1_000_000), 64),
    ("grid-plane-quads-64", lambda: grid_plane_quads(64), 64),
    ("grid-plane-quads-128", lambda: grid_plane_quads(128), 128),
    ("grid-plane-quads-256", lambda: grid_plane_quads(256), 256),
    ("grid-aligned-box-64", lambda: grid_aligned_box(64), 64),
    ("grid-aligned-box-128", lambda: grid_aligned_box(128), 128),
    ("lattice-1/64", lambda: lattice_soup(400, 1 / 64, rng(1)), 64),
    ("lattice-1/128", lambda: lattice_soup(400, 1 / 128, rng(2)), 64),
    ("lattice-1/128-at-128", lambda: lattice_soup(300, 1 / 128, rng(3)), 128),
    ("lattice-1/256-at-256", lambda: lattice_soup(60, 1 / 256, rng(4)), 256),
    ("lattice-half-voxel-offset", lambda: lattice_soup(400, 1 / 64, rng(5), offset=1 / 128), 64),
    ("lattice-1/100-at-100", lambda: lattice_soup(300, 1 / 100, rng(6)), 100),  # inexact voxel size
    ("degenerate-64", lambda: degenerate_triangles(64, rng(7)), 64),
    ("degenerate-128", lambda: degenerate_triangles(128, rng(8)), 128),
    ("slivers", lambda: slivers(rng(9)), 64),
    ("tiny-triangles", lambda: triangle_soup(3000, 1e-7, rng(10)), 64),
    ("soup-small", lambda: triangle_soup(2000, 0.01, rng(11)), 64),
    ("soup-medium-128", lambda: triangle_soup(300, 0.1, rng(12)), 128),
    ("soup-large", lambda: triangle_soup(100, 0.5, rng(13)), 64),
    ("huge-triangles", lambda: huge_triangle_soup(200, rng(14)), 64),
    ("huge-triangles-256", lambda: huge_triangle_soup(8, rng(15)), 256),
    ("beyond-grid", lambda: beyond_grid_triangles(rng(16)), 64),
    ("clamped-to-bounds", lambda: clamped(triangle_soup(500, 0.2, rng(17), extent=0.6)), 64),
]


@pytest.mark.parametrize(
    "build, resolution", [case[1:] for case in COMPARISON_CASES], ids=[case[0] for case in COMPARISON_CASES]
)
def test_same_voxels_as_open3d(build, resolution):
    vertices, faces = build()
    ours = voxelize_mesh(vertices, faces, resolution)
    reference = in_grid(open3d_voxels(vertices, faces, resolution), resolution)
    assert len(reference) > 0
    np.testing.assert_array_equal(ours, reference)


def test_enough_comparison_meshes():
    sample_count = len(sample_asset_meshes(SAMPLE_ASSETS))
    assert len(COMPARISON_CASES) + sample_count >= 30


def test_same_voxels_as_open3d_on_sample_assets():
    meshes = sample_asset_meshes(SAMPLE_ASSETS)
    assert len(meshes) >= 4, f"expected the trimesh-loadable sample assets in {SAMPLE_ASSETS}"
    for name, (vertices, faces) in meshes.items():
        vertices = clamp_vertices(vertices)
        reference = open3d_voxels(vertices, faces, 64)
        assert ((reference >= 0) & (reference < 64)).all(), name
        np.testing.assert_array_equal(voxelize_mesh(vertices, faces), in_grid(reference, 64), err_msg=name)


def test_clamp_keeps_open3d_inside_the_grid():
    """Unclamped vertices on the bounds give Open3D voxels at index 64; the clamp prevents it."""
    vertices, faces = lattice_soup(200, 1 / 64, rng(20))
    assert (open3d_voxels(vertices, faces, 64) == 64).any()
    clamped = clamp_vertices(vertices)
    reference = open3d_voxels(clamped, faces, 64)
    assert ((reference >= 0) & (reference < 64)).all()
    np.testing.assert_array_equal(voxelize_mesh(clamped, faces), in_grid(reference, 64))


def test_face_on_grid_plane_marks_only_the_voxels_above():
    """A triangle whose minimum is on a grid plane never tests the voxel below it."""
    z = 10 / 64 - 0.5  # the plane between voxel layers 9 and 10
    vertices = np.array([[-0.2, -0.2, z], [0.2, -0.2, z], [-0.2, 0.2, z]])
    voxels = voxelize_mesh(vertices, np.array([[0, 1, 2]]))
    assert set(voxels[:, 2].tolist()) == {10}
    # Lifted by one voxel it lies on the plane between 10 and 11 and moves up with it.
    lifted = voxelize_mesh(vertices + [0, 0, 1 / 64], np.array([[0, 1, 2]]))
    np.testing.assert_array_equal(lifted, voxels + [0, 0, 1])


def test_touching_counts_as_overlap():
    """A triangle whose top corner ends exactly on a grid plane also marks the voxel above."""
    top = 20 / 64 - 0.5
    vertices = np.array([[0.01, 0.01, top - 0.05], [0.02, 0.01, top - 0.05], [0.015, 0.012, top]])
    layers = set(voxelize_mesh(vertices, np.array([[0, 1, 2]]))[:, 2].tolist())
    assert 20 in layers and 19 in layers


def test_output_is_sorted_unique_int32_and_independent_of_face_order():
    vertices, faces = trimesh_primitive("torus")
    voxels = voxelize_mesh(vertices, faces)
    assert voxels.dtype == np.int32 and voxels.shape[1] == 3
    assert np.array_equal(voxels, np.unique(voxels, axis=0))
    shuffled = faces[rng(0).permutation(len(faces))][:, [1, 2, 0]]
    np.testing.assert_array_equal(voxelize_mesh(vertices, shuffled), voxels)


def test_memory_is_the_grid_and_the_output_whatever_the_triangle_sizes():
    """Triangles spanning the whole 256^3 grid allocate no candidate sets (numpy is traced)."""
    import tracemalloc

    vertices, faces = huge_triangle_soup(30, rng(30))
    voxelize_mesh(vertices[:3], faces[:1], 256)  # load the kernel outside the trace
    tracemalloc.start()
    voxels = voxelize_mesh(vertices, faces, 256)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    grid_bytes = 256**3
    output_bytes = len(voxels) * (8 + 8 + 3 * 4)  # flat int64 indices, a temporary, the int32 result
    assert len(voxels) > 100_000
    assert peak < grid_bytes + output_bytes + 2**20


def test_no_faces_gives_no_voxels():
    assert voxelize_mesh(np.zeros((3, 3)), np.zeros((0, 3), dtype=np.int64)).shape == (0, 3)


@pytest.mark.parametrize(
    "vertices, faces, resolution, match",
    [
        (np.array([[0, 0, 0], [np.nan, 0, 0], [0, 1, 0]]) * 0.1, [[0, 1, 2]], 64, "not finite"),
        (np.array([[0, 0, 0], [np.inf, 0, 0], [0, 1, 0]]), [[0, 1, 2]], 64, "not finite"),
        (np.zeros((3, 3)), [[0, 1, 3]], 64, "face indices"),
        (np.zeros((3, 3)), [[0, 1, -1]], 64, "face indices"),
        (np.zeros((4, 3)), [[0, 1, 2, 3]], 64, "triangles"),
        (np.zeros((3, 3)), [[0.0, 1.0, 2.0]], 64, "integer"),
        (np.zeros((3, 2)), [[0, 1, 2]], 64, r"\(V, 3\)"),
        (np.zeros((3, 3)), [[0, 1, 2]], 0, "resolution"),
        (np.zeros((3, 3)), [[0, 1, 2]], 64.0, "resolution"),
    ],
)
def test_bad_mesh_arrays_raise(vertices, faces, resolution, match):
    with pytest.raises(ValueError, match=match):
        voxelize_mesh(np.asarray(vertices, dtype=np.float64), np.asarray(faces), resolution)


# -------------------------------- assets: PLY in, PLY out --------------------------------


def trellis_reference_centres(mesh_path: Path, resolution: int = 64) -> np.ndarray:
    """TRELLIS's recipe with Open3D reading the same file: float64 (N, 3) centres, sorted."""
    return np.unique(trellis_voxelize_file(mesh_path, resolution), axis=0)


@pytest.mark.parametrize("text", [False, True], ids=["binary", "ascii"])
@pytest.mark.parametrize("resolution", [64, 128])
def test_voxelize_asset_matches_trellis_recipe(tmp_path, text, resolution):
    vertices, faces = trimesh_primitive("capsule")
    vertices = vertices * 1.02  # a little outside the bounds: the clamp matters
    mesh_path = write_mesh_ply(tmp_path / "renders" / "abc" / "mesh.ply", vertices, faces, text)
    out_path = tmp_path / "voxels" / "abc.ply"
    num_voxels = voxelize_asset("abc", mesh_path, out_path, resolution)

    ply = PlyData.read(str(out_path))
    assert [element.name for element in ply.elements] == ["vertex"]
    assert not ply.text and ply.byte_order == "<"
    assert [(p.name, p.val_dtype) for p in ply["vertex"].properties] == [("x", "f4"), ("y", "f4"), ("z", "f4")]
    centres = np.stack([ply["vertex"][n] for n in "xyz"], axis=-1)  # (N, 3) float32
    assert num_voxels == len(centres)
    np.testing.assert_array_equal(centres, trellis_reference_centres(mesh_path, resolution).astype(np.float32))
    assert np.array_equal(centres, np.unique(centres, axis=0))  # sorted


def test_voxel_centres_are_the_contract_formula():
    centres = voxel_centres(np.array([[0, 31, 63]]))
    np.testing.assert_array_equal(centres, np.array([[0.5 / 64 - 0.5, 31.5 / 64 - 0.5, 63.5 / 64 - 0.5]], np.float32))
    assert centres.dtype == np.float32


def write_bad_meshes(folder: Path) -> dict[str, tuple[Path, str]]:
    """Broken mesh.ply files and the phrase each one's error must contain."""
    triangle = np.array([[0, 0, 0], [0.1, 0, 0], [0, 0.1, 0]], dtype=np.float64)
    bad: dict[str, tuple[Path, str]] = {}

    def add(name: str, reason: str) -> Path:
        path = folder / name / "mesh.ply"
        bad[name] = (path, reason)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    add("missing", "does not exist")
    add("empty-file", "cannot read").write_bytes(b"")
    add("garbage", "cannot read").write_bytes(b"this is not a ply file\n" * 4)
    write_mesh_ply(add("no-vertices", "no vertices"), np.zeros((0, 3)), [])
    write_mesh_ply(add("no-faces", "no faces"), triangle, [])
    vertex = np.zeros(3, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4")])
    PlyData([PlyElement.describe(vertex, "vertex")]).write(str(add("point-cloud", "no face element")))
    write_mesh_ply(add("nan-vertex", "not finite"), triangle * [1, np.nan, 1], [[0, 1, 2]])
    write_mesh_ply(add("inf-vertex", "not finite"), triangle + [0, 0, np.inf], [[0, 1, 2]])
    square = np.array([[0, 0, 0], [0.1, 0, 0], [0.1, 0.1, 0], [0, 0.1, 0]], dtype=np.float64)
    write_mesh_ply(add("quad", "non-triangular"), square, [[0, 1, 2], [0, 1, 2, 3]])
    write_mesh_ply(add("bad-index", "face indices"), triangle, [[0, 1, 7]])
    truncated = write_mesh_ply(add("truncated", "cannot read"), *bumpy_torus(2_000))
    truncated.write_bytes(truncated.read_bytes()[:-5000])
    return bad


def test_bad_meshes_fail_with_clear_reasons(tmp_path):
    bad = write_bad_meshes(tmp_path / "renders")
    for name, (path, reason) in bad.items():
        out_path = tmp_path / "voxels" / f"{name}.ply"
        with pytest.raises(AssetError) as caught:
            voxelize_asset(name, path, out_path)
        assert caught.value.sha256 == name and caught.value.stage == "voxelize"
        assert reason in caught.value.reason, (name, caught.value.reason)
        assert "\n" not in caught.value.reason
        assert not out_path.exists()
    good = write_mesh_ply(tmp_path / "renders" / "good" / "mesh.ply", *trimesh_primitive("cone"))
    assert voxelize_asset("good", good, tmp_path / "voxels" / "good.ply") > 0
    assert (tmp_path / "voxels" / "good.ply").exists()
