"""Tests of slatflow.geometry: the NeuS recipe, oriented marching cubes, SDF queries."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slatflow import geometry
from slatflow.errors import AssetError
from slatflow.geometry import MeshSDF, TriangleMesh, VoxelSDF


def neus_extract_fields(bound_min, bound_max, resolution, query_fn, chunk=64):
    """The NeuS loop as a naive reference: per-block meshgrid ('ij'), query, copy to numpy."""
    axes = [torch.linspace(bound_min[a], bound_max[a], resolution).split(chunk) for a in range(3)]
    field = np.zeros((resolution,) * 3, dtype=np.float32)
    for xi, xs in enumerate(axes[0]):
        for yi, ys in enumerate(axes[1]):
            for zi, zs in enumerate(axes[2]):
                xx, yy, zz = torch.meshgrid(xs, ys, zs, indexing="ij")
                points = torch.stack([xx.reshape(-1), yy.reshape(-1), zz.reshape(-1)], dim=-1)
                values = query_fn(points).reshape(len(xs), len(ys), len(zs)).numpy()
                field[
                    xi * chunk : xi * chunk + len(xs),
                    yi * chunk : yi * chunk + len(ys),
                    zi * chunk : zi * chunk + len(zs),
                ] = values
    return field


def lopsided(points):
    """A field that tells the axes apart: x + 10 y + 100 z (numpy or torch)."""
    return points[:, 0] + 10 * points[:, 1] + 100 * points[:, 2]


def sphere_sdf(points, radius=0.3, centre=(0.05, -0.02, 0.01)):
    centre = np.asarray(centre, dtype=np.float32)
    if isinstance(points, torch.Tensor):
        return torch.linalg.norm(points - torch.as_tensor(centre, device=points.device), dim=-1) - radius
    return np.linalg.norm(points - centre, axis=-1) - radius


@pytest.mark.parametrize("device", [None, "cpu"])
def test_extract_fields_matches_the_neus_loop_and_ij_order(device):
    lo, hi, resolution = [-0.5, -0.4, -0.3], [0.5, 0.6, 0.2], 37  # 37 = 2 chunks of 16 + a ragged 5
    field = geometry.extract_fields(lo, hi, resolution, lopsided, chunk=16, device=device)
    reference = neus_extract_fields(lo, hi, resolution, lopsided, chunk=16)
    assert field.dtype == np.float32 and field.shape == (resolution,) * 3
    np.testing.assert_allclose(field, reference, rtol=0, atol=1e-4)
    xs = np.linspace(lo[0], hi[0], resolution)
    zs = np.linspace(lo[2], hi[2], resolution)
    assert field[3, 0, 0] == pytest.approx(xs[3] + 10 * lo[1] + 100 * lo[2], abs=1e-4)
    assert field[0, 0, 7] == pytest.approx(lo[0] + 10 * lo[1] + 100 * zs[7], abs=1e-4)


def test_extract_fields_accepts_torch_bounds_and_column_outputs():
    field = geometry.extract_fields(
        torch.tensor([-1.0, -1.0, -1.0]),
        torch.tensor([1.0, 1.0, 1.0]),
        9,
        lambda p: lopsided(p)[:, None],
        chunk=4,
    )
    assert field[8, 8, 8] == pytest.approx(111.0)


def test_extract_fields_rejects_bad_bounds():
    with pytest.raises(ValueError, match="bound_max > bound_min"):
        geometry.extract_fields([0, 0, 0], [1, 0, 1], 8, lopsided)


def face_normals(mesh: TriangleMesh) -> np.ndarray:
    tri = mesh.vertices.astype(np.float64)[mesh.faces]  # (F, 3, 3)
    return np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # (F, 3), unnormalized


@pytest.mark.parametrize("method", ["skimage", "pymcubes"])
@pytest.mark.parametrize("inside", ["below", "above"])
def test_triangles_face_outward_with_either_library_and_sign(method, inside):
    centre = np.array([0.05, -0.02, 0.01])
    query = sphere_sdf if inside == "below" else (lambda p: -sphere_sdf(p))  # NeuS queries -sdf
    lo, hi = np.array([-0.5, -0.45, -0.4]), np.array([0.5, 0.45, 0.4])  # anisotropic spacing
    mesh = geometry.extract_geometry(lo, hi, 48, 0.0, query, inside=inside, method=method)
    assert mesh.faces.dtype == np.int64 and len(mesh.faces) > 1000
    assert geometry.signed_volume(mesh) == pytest.approx(4 / 3 * np.pi * 0.3**3, rel=0.01)
    centroids = mesh.vertices[mesh.faces].mean(axis=1)  # (F, 3)
    outward = np.einsum("fi,fi->f", face_normals(mesh), centroids - centre)
    assert np.all(outward > 0)
    # vertices are rescaled from grid indices to the bounds: they lie on the sphere
    radii = np.linalg.norm(mesh.vertices - centre, axis=1)
    assert np.abs(radii - 0.3).max() < 2e-3


def test_marching_cubes_libraries_agree_on_the_surface():
    field = geometry.extract_fields([-0.5] * 3, [0.5] * 3, 32, sphere_sdf)
    a = geometry.marching_cubes(field, 0.0, method="skimage")
    b = geometry.marching_cubes(field, 0.0, method="pymcubes")
    assert geometry.signed_volume(a) == pytest.approx(geometry.signed_volume(b), rel=1e-4)


def test_marching_cubes_without_a_crossing_is_empty():
    mesh = geometry.marching_cubes(np.ones((8, 8, 8), np.float32), 0.0)
    assert mesh.vertices.shape == (0, 3) and mesh.faces.shape == (0, 3)


def icosphere(radius=0.35, subdivisions=4) -> TriangleMesh:
    import trimesh

    sphere = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    return TriangleMesh(np.asarray(sphere.vertices), np.asarray(sphere.faces))


def box_mesh(extents=(0.6, 0.5, 0.4), drop_top=False) -> TriangleMesh:
    import trimesh

    box = trimesh.creation.box(extents=extents)
    faces = np.asarray(box.faces)
    if drop_top:  # an open box: the two +z triangles removed
        faces = faces[box.triangles_center[:, 2] < extents[2] / 2 - 1e-9]
    return TriangleMesh(np.asarray(box.vertices), faces)


def test_mesh_sdf_matches_the_analytic_sphere():
    sphere = icosphere()
    points = np.random.default_rng(0).uniform(-0.5, 0.5, (3000, 3))
    values = MeshSDF(*sphere)(points)
    expected = np.linalg.norm(points, axis=1) - 0.35
    assert values.dtype == np.float32
    assert np.abs(values - expected).max() < 2e-3  # faceting of a 5k-triangle sphere


def test_mesh_sdf_sign_is_robust_to_holes_and_inverted_faces():
    open_box = box_mesh(drop_top=True)
    inverted = TriangleMesh(open_box.vertices, open_box.faces[:, ::-1])
    centre, far = np.array([[0.0, 0.0, 0.0]]), np.array([[0.45, 0.0, 0.0]])
    for mesh in (open_box, inverted):
        sdf = MeshSDF(*mesh)
        assert sdf(centre)[0] == pytest.approx(-0.2, abs=1e-6)  # nearest wall: the floor at z = -0.2
        assert sdf(far)[0] == pytest.approx(0.15, abs=1e-6)


def test_truncated_mesh_sdf_is_exact_inside_the_band():
    mesh = TriangleMesh(*_two_triangle_sheet_and_sphere())
    points = np.random.default_rng(1).uniform(-0.5, 0.5, (20000, 3))
    exact = MeshSDF(*mesh)(points)
    truncation = 0.02
    truncated = MeshSDF(*mesh, truncation=truncation)(points)
    near = np.abs(exact) < truncation
    assert near.sum() > 500
    np.testing.assert_allclose(truncated[near], exact[near], atol=1e-6)
    np.testing.assert_allclose(np.abs(truncated[~near]), truncation, atol=1e-6)
    assert np.array_equal(np.sign(truncated), np.sign(exact))


@pytest.mark.parametrize("mesh", ["open_box", "sheet_and_sphere"])
def test_truncated_mesh_sdf_signs_match_the_exact_winding_number_on_a_grid(mesh):
    """The coarse sign grid (exact winding numbers near the surface and the inside/outside
    boundary only) gives every grid point the sign of its own winding number."""
    mesh = box_mesh(drop_top=True) if mesh == "open_box" else TriangleMesh(*_two_triangle_sheet_and_sphere())
    lo, hi = geometry.padded_unit_cube_grid(64, 2)
    spacing = (hi[0] - lo[0]) / 63
    sdf = MeshSDF(*mesh, truncation=2 * spacing)
    field = geometry.extract_fields(lo, hi, 64, sdf)
    exact_inside = geometry.extract_fields(lo, hi, 64, lambda p: np.abs(sdf.winding_number(p)) > 0.5)
    assert exact_inside.sum() > 1000
    np.testing.assert_array_equal(field < 0, exact_inside > 0.5)


def _two_triangle_sheet_and_sphere():
    """A sphere plus one large triangle pair (the band must cover big triangles too)."""
    sphere = icosphere(radius=0.2, subdivisions=3)
    sheet_v = np.array([[-0.45, -0.45, 0.3], [0.45, -0.45, 0.3], [0.45, 0.45, 0.33], [-0.45, 0.45, 0.33]])
    sheet_f = np.array([[0, 1, 2], [0, 2, 3]]) + len(sphere.vertices)
    return np.concatenate([sphere.vertices, sheet_v]), np.concatenate([sphere.faces, sheet_f])


def brute_force_voxel_sdf(indices, points, resolution, occupied):
    """Exact signed distance to the union of cubes: min over every occupied/empty cube."""
    size = 1.0 / resolution
    all_cells = np.argwhere(np.ones((resolution + 2,) * 3, bool)) - 1  # grid + one empty ring
    inside_grid = np.all((all_cells >= 0) & (all_cells < resolution), axis=1)
    full = np.zeros(len(all_cells), bool)
    full[inside_grid] = occupied[tuple(all_cells[inside_grid].T)]
    lows = all_cells * size - 0.5  # (C, 3)
    gap = np.maximum(np.maximum(lows[None] - points[:, None], points[:, None] - lows[None] - size), 0)
    dist = np.linalg.norm(gap, axis=-1)  # (P, C)
    to_full = np.where(full[None], dist, np.inf).min(axis=1)
    to_empty = np.where(~full[None], dist, np.inf).min(axis=1)
    return np.where(to_full > 0, to_full, -to_empty)


@pytest.mark.parametrize("fill", [True, False])
def test_voxel_sdf_matches_brute_force(fill):
    resolution = 8
    shell = np.zeros((resolution,) * 3, bool)
    shell[2:7, 2:7, 2:7] = True
    shell[3:6, 3:6, 3:6] = False  # a hollow shell: its cavity fills only with fill_interior
    shell[0, 0, 7] = True  # a lone voxel at the grid's edge
    indices = np.argwhere(shell)
    sdf = VoxelSDF(indices, resolution, fill_interior=fill, truncation=0.4)
    points = np.random.default_rng(2).uniform(-0.6, 0.6, (4000, 3))
    expected = np.clip(brute_force_voxel_sdf(indices, points, resolution, sdf.occupied), -0.4, 0.4)
    np.testing.assert_allclose(sdf(points), expected, atol=1e-6)
    assert (sdf(np.zeros((1, 3)))[0] < 0) == fill  # the cavity's centre


def test_default_voxel_sdf_is_exact_within_one_voxel():
    resolution = 8
    indices = np.argwhere(np.random.default_rng(3).random((resolution,) * 3) < 0.3)
    sdf = VoxelSDF(indices, resolution, fill_interior=False)
    points = np.random.default_rng(4).uniform(-0.55, 0.55, (4000, 3))
    exact = brute_force_voxel_sdf(indices, points, resolution, sdf.occupied)
    values = sdf(points)
    near = np.abs(exact) < 1 / resolution
    np.testing.assert_allclose(values[near], exact[near], atol=1e-6)
    np.testing.assert_allclose(np.abs(values[~near]), 1 / resolution, atol=1e-6)


def test_voxel_mesh_of_a_block_is_the_block():
    indices = np.argwhere(np.ones((10, 10, 10), bool)) + 20
    mesh = geometry.voxel_mesh(indices)  # the block shrunk by 0.45 voxel
    assert geometry.signed_volume(mesh) == pytest.approx((9.1 / 64) ** 3, rel=0.01)
    np.testing.assert_allclose(mesh.vertices.min(axis=0), 20.45 / 64 - 0.5, atol=1e-6)
    np.testing.assert_allclose(mesh.vertices.max(axis=0), 29.55 / 64 - 0.5, atol=1e-6)


def test_voxel_mesh_of_a_one_voxel_sheet_is_a_thin_closed_shell():
    import trimesh

    indices = np.argwhere(np.ones((20, 20, 1), bool)) + [10, 10, 32]  # an open surface's voxels
    mesh = geometry.voxel_mesh(indices)
    assert trimesh.Trimesh(mesh.vertices, mesh.faces, process=False).is_watertight
    np.testing.assert_allclose(np.median(mesh.vertices[:, 2]), 32.5 / 64 - 0.5, atol=0.1 / 64)
    assert np.ptp(mesh.vertices[:, 2]) <= 0.11 / 64


@pytest.mark.parametrize("method", ["skimage", "pymcubes"])
def test_watertight_mesh_closes_an_open_box(method):
    import trimesh

    for source in (box_mesh(), box_mesh(drop_top=True)):
        mesh = geometry.watertight_mesh(*source, resolution=64, method=method)
        surface = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
        assert surface.is_watertight
        assert geometry.signed_volume(mesh) == pytest.approx(0.6 * 0.5 * 0.4, rel=0.03)
        np.testing.assert_allclose(mesh.vertices.max(axis=0), [0.3, 0.25, 0.2], atol=0.01)


def test_watertight_mesh_reaching_the_unit_cube_is_closed():
    import trimesh

    mesh = geometry.watertight_mesh(*box_mesh(extents=(1.0, 1.0, 1.0)), resolution=48)
    assert trimesh.Trimesh(mesh.vertices, mesh.faces, process=False).is_watertight
    assert geometry.signed_volume(mesh) == pytest.approx(1.0, rel=0.03)


def test_sample_sdf_is_the_sphere_distance_and_reproducible(tmp_path):
    sphere = icosphere(radius=0.3, subdivisions=5)
    mesh_path = tmp_path / "sphere.ply"
    geometry.write_mesh_ply(mesh_path, sphere)
    out = tmp_path / "sdf" / "a.npz"
    samples = geometry.sample_sdf_asset(
        "ab" * 32, mesh_path, out, num_near=3000, num_uniform=1000, near_std=(0.005, 0.02), uniform_bound=0.55
    )
    assert samples.points.shape == (4000, 3) and samples.sdf.shape == (4000,)
    expected = np.linalg.norm(samples.points, axis=1) - 0.3
    assert np.abs(samples.sdf - expected).max() < 1e-3
    near = np.abs(np.linalg.norm(samples.points[:3000], axis=1) - 0.3)
    assert np.median(near) < 0.02 and np.all(np.abs(samples.points[3000:]) <= 0.55)
    with np.load(out) as data:
        np.testing.assert_array_equal(data["points"], samples.points)
        np.testing.assert_array_equal(data["sdf"], samples.sdf)
    again = geometry.sample_sdf_asset(
        "ab" * 32,
        mesh_path,
        tmp_path / "b.npz",
        num_near=3000,
        num_uniform=1000,
        near_std=(0.005, 0.02),
        uniform_bound=0.55,
    )
    np.testing.assert_array_equal(again.points, samples.points)


def test_extract_mesh_asset_writes_a_readable_watertight_ply(tmp_path):
    import trimesh

    from slatflow.io import read_mesh_ply

    source = tmp_path / "mesh.ply"
    trimesh.Trimesh(*box_mesh()).export(source)
    out = tmp_path / "meshes" / "x.ply"
    geometry.extract_mesh_asset("cd" * 32, source, out, resolution=40)
    vertices, faces = read_mesh_ply("cd" * 32, out, "meshes")
    assert trimesh.Trimesh(vertices, faces, process=False).is_watertight
    assert not list(out.parent.glob(".*tmp*"))  # no temporary file left behind


def test_extract_mesh_asset_names_the_asset_on_bad_input(tmp_path):
    bad = tmp_path / "mesh.ply"
    bad.write_text("not a ply")
    with pytest.raises(AssetError, match="ef" * 32):
        geometry.extract_mesh_asset("ef" * 32, bad, tmp_path / "out.ply", resolution=16)
    flat = tmp_path / "flat.ply"
    geometry.write_mesh_ply(
        flat, TriangleMesh(np.array([[0, 0, 0], [0.1, 0, 0], [0, 0.1, 0]], np.float32), np.array([[0, 1, 2]]))
    )
    with pytest.raises(AssetError, match="encloses no volume"):
        geometry.extract_mesh_asset("ef" * 32, flat, tmp_path / "out.ply", resolution=16)


@pytest.mark.gpu
def test_extract_fields_on_cuda_matches_cpu():
    field_gpu = geometry.extract_fields([-0.5] * 3, [0.5] * 3, 150, sphere_sdf, chunk=64, device="cuda")
    field_cpu = geometry.extract_fields([-0.5] * 3, [0.5] * 3, 150, sphere_sdf, chunk=64)
    np.testing.assert_allclose(field_gpu, field_cpu, atol=1e-6)
