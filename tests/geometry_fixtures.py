"""Shared fixtures of the geometry, quality and report tests: meshes and a small OUT tree."""

from __future__ import annotations

import numpy as np

from slatflow.geometry import TriangleMesh, write_mesh_ply


def sphere(radius: float, subdivisions: int = 5) -> TriangleMesh:
    import trimesh

    mesh = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    return TriangleMesh(np.asarray(mesh.vertices), np.asarray(mesh.faces))


def cube(shift: float = 0.0, side: float = 1.0) -> TriangleMesh:
    import trimesh

    mesh = trimesh.creation.box(extents=(side,) * 3)
    return TriangleMesh(np.asarray(mesh.vertices) + [shift, 0, 0], np.asarray(mesh.faces))


def write_view(path, alpha: np.ndarray) -> None:
    from PIL import Image

    rgba = np.zeros((*alpha.shape, 4), np.uint8)
    rgba[..., 3] = alpha
    Image.fromarray(rgba, "RGBA").save(path)


def make_asset(out_dir, sha256: str, source: TriangleMesh, shifted_voxels: bool = False) -> None:
    """OUT/renders/<sha>/{mesh.ply, 000.png}, voxels/<sha>.ply and meshes/<sha>.ply."""
    from slatflow.geometry import extract_mesh_asset
    from slatflow.io import write_points_ply
    from slatflow.voxelize import voxel_centres, voxelize_mesh

    render_dir = out_dir / "renders" / sha256
    render_dir.mkdir(parents=True)
    write_mesh_ply(render_dir / "mesh.ply", source)
    alpha = np.zeros((16, 16), np.uint8)
    alpha[4:12, 4:12] = 200
    write_view(render_dir / "000.png", alpha)
    indices = voxelize_mesh(np.asarray(source.vertices, np.float64), np.asarray(source.faces), 64)
    if shifted_voxels:  # a broken voxelizer: everything two voxels off along x
        indices = np.clip(indices + [2, 0, 0], 0, 63)
    write_points_ply(out_dir / "voxels" / f"{sha256}.ply", voxel_centres(indices))
    extract_mesh_asset(sha256, render_dir / "mesh.ply", out_dir / "meshes" / f"{sha256}.ply", resolution=64)


def check_asset_quality(out_dir, sha256: str, settings) -> dict:
    """The quality_check rule's call for one asset of OUT (its inputs where the rule has them)."""
    from slatflow.geometry import check_quality_asset

    return check_quality_asset(
        sha256,
        out_dir / "renders" / sha256 / "mesh.ply",
        out_dir / "quality" / f"{sha256}.json",
        watertight_mesh=out_dir / "meshes" / f"{sha256}.ply",
        voxels=out_dir / "voxels" / f"{sha256}.ply",
        render_dir=out_dir / "renders" / sha256,
        settings=settings,
    )
