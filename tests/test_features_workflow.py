"""End to end: the `features` target of the real workflow, on synthetic renders and voxels.

The renders and voxels are written beside the source files (newer than them, and with no
Snakemake record), so no Blender job runs: the test exercises the extract_features rule,
its quarantine of a bad asset and its outputs, with the sample's small random model.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
from conftest import run_workflow
from features_fixtures import sphere_mesh, write_synthetic_asset

FEATURE_SECTION = {
    "model": "dinov2_vits14_reg",
    "weights": "random",
    "image_size": 112,  # 8 x 8 patches: seconds per job on 2 cores
    "batch_size": 4,
    "threads": 1,
}
FEATURE_NAME = "dinov2_vits14_reg_112px_random"


@pytest.fixture
def rendered(small_assets, tmp_path):
    """OUT with renders (mesh.ply, then PNGs + transforms.json) and voxels for every asset."""
    import trimesh

    out = tmp_path / "out"
    shas = {}
    for name, path in small_assets.items():
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        render_dir = out / "renders" / sha
        render_dir.mkdir(parents=True)
        trimesh.Trimesh(*sphere_mesh(0.3, rings=8, segments=16), process=False).export(render_dir / "mesh.ply")
        write_synthetic_asset(out, sha, num_views=4, resolution=32, radius=0.3)
        shas[name] = sha
    return out, shas


def test_features_target_writes_features_and_quarantines_a_bad_asset(small_assets, rendered, tmp_path):
    out, shas = rendered
    bad = shas["cone.stl"]
    (out / "renders" / bad / "002.png").unlink()
    config = {
        "output_dir": str(out),
        "source": {"type": "local", "path": str(small_assets["box.obj"].parent)},
        "features": FEATURE_SECTION,
    }
    result = run_workflow(config, ["features"], config_dir=tmp_path)
    assert "rule render_views" not in result.stdout + result.stderr  # the synthetic renders count
    for name, sha in shas.items():
        npz = out / "features" / FEATURE_NAME / f"{sha}.npz"
        if sha == bad:
            assert not npz.exists()
            record = json.loads((out / "failed" / "features" / f"{sha}.json").read_text())
            assert record["stage"] == "features"
            assert "1 of 4 view PNGs" in record["reason"] and "002.png" in record["reason"]
            assert (out / "logs" / "extract_features" / FEATURE_NAME / f"{sha}.log").is_file()
            continue
        with np.load(npz) as data:
            assert data["indices"].dtype == np.uint8 and data["indices"].shape[1] == 3
            assert data["patchtokens"].dtype == np.float16 and data["patchtokens"].shape[1] == 384
            assert len(data["indices"]) == len(data["patchtokens"]) > 1000
            assert bool(data["random_weights"])
        log = (out / "logs" / "extract_features" / FEATURE_NAME / f"{sha}.log").read_text()
        assert "RANDOM WEIGHTS" in log
    provenance = json.loads((out / "features" / FEATURE_NAME / "provenance.json").read_text())
    assert provenance["random_weights"] is True and provenance["image_size"] == 112
    assert result.returncode != 0  # one asset failed (keep-going finished the others)

    # the next run leaves the quarantined asset out: nothing to extract, metadata.csv is built
    again = run_workflow(config, ["features"], config_dir=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "rule extract_features" not in again.stdout + again.stderr
    metadata = pd.read_csv(out / "metadata.csv", index_col="sha256")
    good = [sha for sha in shas.values() if sha != bad]
    assert metadata.loc[good, f"feature_{FEATURE_NAME}"].all() and not metadata.at[bad, f"feature_{FEATURE_NAME}"]
    assert metadata.loc[good, f"feature_{FEATURE_NAME}_random_weights"].all()
    assert metadata.at[bad, "failed_stage"] == "features"
