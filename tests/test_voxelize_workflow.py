"""The voxelize_mesh rule end to end (real Snakemake runs) on the small assets.

The mesh.ply files are written here, as the render stage would (normalized, binary,
Blender's properties), and the render rule is left out with --allowed-rules, so this tests
the voxelize stage alone: outputs, metadata's num_voxels, quarantine, re-runs.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO, run_workflow
from test_voxelize import trellis_reference_centres
from voxelize_fixtures import normalize_vertices, write_mesh_ply

from slatflow.io import read_ply_points

VOXELIZE_RULES = ("--allowed-rules", "ingest_manifest", "voxelize_mesh", "metadata_aggregate", "voxels")


def write_meshes(out_dir, bad_sha256: str | None = None) -> list[str]:
    """A normalized mesh.ply per ingested asset (quads for `bad_sha256`); their sha256s."""
    import trimesh

    manifest = pd.read_csv(out_dir / "manifest.csv")
    for sha256, local_path in zip(manifest["sha256"], manifest["local_path"]):
        mesh = trimesh.load(out_dir / local_path, force="mesh")
        vertices = normalize_vertices(mesh.vertices)
        faces = mesh.faces.tolist()
        if sha256 == bad_sha256:
            faces[0] = [*faces[0], faces[1][0]]
        write_mesh_ply(out_dir / "renders" / sha256 / "mesh.ply", vertices, faces)
    return list(manifest["sha256"])


def test_voxels_target_writes_trellis_voxels_and_quarantines_a_bad_mesh(small_assets, tmp_path):
    out_dir = tmp_path / "out"
    config = {"output_dir": str(out_dir), "source": {"type": "local", "path": str(tmp_path / "assets")}}
    assert run_workflow(config, ["metadata"], config_dir=tmp_path).returncode == 0
    shas = write_meshes(out_dir)
    bad = shas[0]
    write_meshes(out_dir, bad_sha256=bad)

    first = run_workflow(config, ["voxels"], *VOXELIZE_RULES, config_dir=tmp_path)
    assert first.returncode != 0, "the bad mesh fails its job"
    record = json.loads((out_dir / "failed" / "voxelize" / f"{bad}.json").read_text())
    assert "non-triangular" in json.dumps(record)
    assert not (out_dir / "voxels" / f"{bad}.ply").exists()
    for sha256 in shas[1:]:
        centres = read_ply_points(out_dir / "voxels" / f"{sha256}.ply")
        reference = trellis_reference_centres(out_dir / "renders" / sha256 / "mesh.ply")
        np.testing.assert_array_equal(centres, reference.astype(np.float32))
        assert (out_dir / "logs" / "voxelize_mesh" / f"{sha256}.log").read_text().count("voxels at 64^3") == 1

    # The quarantined asset is left out: the target completes and metadata says so.
    second = run_workflow(config, ["voxels"], *VOXELIZE_RULES, config_dir=tmp_path)
    assert second.returncode == 0, second.stderr
    table = pd.read_csv(out_dir / "metadata.csv").set_index("sha256")
    for sha256 in shas[1:]:
        assert table.loc[sha256, "voxelized"]
        assert table.loc[sha256, "num_voxels"] == len(read_ply_points(out_dir / "voxels" / f"{sha256}.ply"))
    assert not table.loc[bad, "voxelized"]

    # A different resolution re-runs the voxels (params), and only them.
    third = run_workflow(
        {**config, "voxelize": {"resolution": 32}}, ["voxels"], *VOXELIZE_RULES, "-n", config_dir=tmp_path
    )
    assert third.returncode == 0, third.stderr
    assert f"voxelize_mesh {len(shas) - 1}" in " ".join((third.stdout + third.stderr).split())


@pytest.mark.blender
@pytest.mark.slow
def test_voxels_of_blender_meshes_equal_trellis_open3d_recipe(tmp_path):
    """The real chain on two sample assets: Blender's mesh.ply -> voxels, as TRELLIS gets them."""
    config = yaml.safe_load((REPO / "config" / "sample.yaml").read_text())
    config["output_dir"] = str(tmp_path / "out")
    config["source"] = {"type": "local", "path": str(REPO / "sample" / "assets"),
                        "instances": ["chair.stl", "torus.glb"]}
    result = run_workflow(config, ["voxels"], config_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    voxel_files = sorted((tmp_path / "out" / "voxels").glob("*.ply"))
    assert len(voxel_files) == 2
    for voxel_file in voxel_files:
        mesh_path = tmp_path / "out" / "renders" / voxel_file.stem / "mesh.ply"
        reference = trellis_reference_centres(mesh_path).astype(np.float32)
        np.testing.assert_array_equal(read_ply_points(voxel_file), reference)
