"""The geometry rules end to end (real Snakemake runs) on the small assets.

mesh.ply, transforms.json and two view PNGs per asset are written here, as the render stage
would, and the render rule is left out with --allowed-rules, so this tests the geometry
stage alone: watertight meshes, SDF samples, quality records, metadata columns, the report,
quarantine of a bad mesh.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
from conftest import run_workflow
from geometry_fixtures import write_view
from voxelize_fixtures import normalize_vertices, write_mesh_ply

from slatflow.io import read_mesh_ply

GEOMETRY_RULES = (
    "--allowed-rules",
    "ingest_manifest",
    "metadata_aggregate",
    "voxelize_mesh",
    "extract_mesh",
    "sample_sdf",
    "quality_check",
    "quality_report",
    "meshes",
    "sdf",
    "quality",
    "report",
)


def write_renders(out_dir, bad_sha256: str) -> list[str]:
    """A normalized mesh.ply, transforms.json and two views per asset (quads for the bad one)."""
    import trimesh

    manifest = pd.read_csv(out_dir / "manifest.csv")
    for sha256, local_path in zip(manifest["sha256"], manifest["local_path"]):
        mesh = trimesh.load(out_dir / local_path, force="mesh")
        faces = mesh.faces.tolist()
        if sha256 == bad_sha256:
            faces[0] = [*faces[0], faces[1][0]]
        render_dir = out_dir / "renders" / sha256
        write_mesh_ply(render_dir / "mesh.ply", normalize_vertices(mesh.vertices), faces)
        alpha = np.zeros((32, 32), np.uint8)
        alpha[8:24, 8:24] = 255
        write_view(render_dir / "000.png", alpha)
        write_view(render_dir / "001.png", alpha)
        (render_dir / "transforms.json").write_text(json.dumps({"frames": []}))
    return list(manifest["sha256"])


def test_geometry_targets_make_meshes_sdf_quality_and_report(small_assets, tmp_path):
    import trimesh

    out_dir = tmp_path / "out"
    config = {
        "output_dir": str(out_dir),
        "source": {"type": "local", "path": str(tmp_path / "assets")},
        "meshes": {"resolution": 48, "sdf": {"num_near": 2000, "num_uniform": 500}},
        "quality": {"num_samples": 5000, "num_previews": 2},
    }
    assert run_workflow(config, ["metadata"], config_dir=tmp_path).returncode == 0
    manifest = pd.read_csv(out_dir / "manifest.csv")
    bad = manifest["sha256"][0]
    shas = write_renders(out_dir, bad)

    first = run_workflow(config, ["meshes", "sdf", "quality"], *GEOMETRY_RULES, config_dir=tmp_path)
    assert first.returncode != 0, "the bad mesh fails its jobs"
    record = json.loads((out_dir / "failed" / "meshes" / f"{bad}.json").read_text())
    assert "non-triangular" in record["reason"] and bad in record["reason"]
    good = [sha for sha in shas if sha != bad]
    for sha256 in good:
        vertices, faces = read_mesh_ply(sha256, out_dir / "meshes" / f"{sha256}.ply", "meshes")
        assert trimesh.Trimesh(vertices, faces, process=False).is_watertight
        with np.load(out_dir / "sdf" / f"{sha256}.npz") as samples:
            assert samples["points"].shape == (2500, 3) and samples["sdf"].dtype == np.float32
        quality = json.loads((out_dir / "quality" / f"{sha256}.json").read_text())
        assert quality["mesh"]["fscore"] > 0.9 and quality["masks"]["num_views"] == 2
        assert (out_dir / "benchmarks" / "extract_mesh" / f"{sha256}.tsv").is_file()

    # The quarantined asset is left out: the targets complete; the report and metadata follow.
    second = run_workflow(config, ["quality", "report"], *GEOMETRY_RULES, config_dir=tmp_path)
    assert second.returncode == 0, second.stderr
    table = pd.read_csv(out_dir / "metadata.csv", dtype={"sha256": str}, keep_default_na=False).set_index(
        "sha256"
    )
    for sha256 in good:
        assert float(table.loc[sha256, "mesh_fscore"]) > 0.9
        assert 0 < float(table.loc[sha256, "voxel_chamfer_l1"]) < 0.02
    assert table.loc[bad, "failed_stage"] in {"meshes", "voxelize"}  # both stages read the bad mesh
    page = (out_dir / "report" / "quality_report.html").read_text()
    ids = set()

    class Ids(HTMLParser):
        def handle_starttag(self, tag, attrs):
            ids.update(v for k, v in attrs if k == "id")

    Ids().feed(page)
    assert {"summary", "failures", "histograms", "timings", "previews"} <= ids
    assert "non-triangular" in page and "extract_mesh" in page

    # A different mesh resolution re-runs the meshes and what depends on them, only those.
    third = run_workflow(
        {**config, "meshes": {**config["meshes"], "resolution": 40}},
        ["quality"],
        *GEOMETRY_RULES,
        "-n",
        config_dir=tmp_path,
    )
    assert third.returncode == 0, third.stderr
    summary = " ".join((third.stdout + third.stderr).split())
    assert f"extract_mesh {len(good)}" in summary and f"quality_check {len(good)}" in summary
    assert re.search(r"\bvoxelize_mesh \d", summary) is None  # no voxelize job in the table
