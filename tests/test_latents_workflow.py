"""End-to-end: the latent rules in the real workflow, on voxels and features written here.

The upstream stages (render, voxelize, features) are tested by their own files; their
outputs are written directly so that this test exercises the latent rules, their
quarantine and the statistics, in tens of seconds.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from conftest import make_small_assets, run_workflow
from latents_fixtures import random_patchtokens, surface_voxels, voxel_centres

from slatflow.feature_settings import FeatureSettings
from slatflow.io import save_npz_atomic, write_points_ply
from slatflow.latents import LatentSettings

FEATURES = {"model": "dinov2_vits14_reg", "weights": "random", "image_size": 224}
LATENTS = {
    "ss_encoder": "random",
    "slat_encoder": "random",
    "random_ss_args": {"channels": [8, 16, 32], "num_res_blocks": 1, "num_res_blocks_middle": 1},
    "random_slat_args": {"in_channels": 384, "model_channels": 64, "num_blocks": 2, "num_heads": 4},
    "threads": 1,
}


def test_latent_rules_encode_quarantine_and_write_stats(tmp_path):
    out = tmp_path / "out"
    config = {
        "output_dir": str(out),
        "source": {"type": "local", "path": str(tmp_path / "assets")},
        "features": FEATURES,
        "latents": LATENTS,
    }
    make_small_assets(tmp_path / "assets")
    ingest = run_workflow(config, ["metadata"], "--cores", "2", config_dir=tmp_path)
    assert ingest.returncode == 0, ingest.stderr
    sha256s = sorted(pd.read_csv(out / "manifest.csv")["sha256"])
    feature_dir = out / "features" / FeatureSettings.from_config(FEATURES).feature_name
    bad = sha256s[0]
    for i, sha in enumerate(sha256s):
        indices = surface_voxels(800 + 300 * i, seed=i)
        write_points_ply(out / "voxels" / f"{sha}.ply", voxel_centres(indices))
        width = 100 if sha == bad else 384  # a feature file of the wrong width
        save_npz_atomic(feature_dir / f"{sha}.npz", indices=indices, patchtokens=random_patchtokens(len(indices), width))

    first = run_workflow(config, ["ss_latents", "latents", "latent_stats"], "--cores", "2", config_dir=tmp_path)
    assert first.returncode != 0  # one asset failed; keep-going finished the others
    settings = LatentSettings.from_config(LATENTS)
    ss_dir = out / "ss_latents" / settings.name("ss")
    slat_dir = out / "latents" / f"{feature_dir.name}_{settings.name('slat')}"
    assert sorted(p.stem for p in ss_dir.glob("*.npz")) == sha256s
    assert sorted(p.stem for p in slat_dir.glob("*.npz")) == sha256s[1:]
    record = json.loads((out / "failed" / "slat_latent" / f"{bad}.json").read_text())
    assert "patchtokens have shape" in record["reason"] and "expected" in record["reason"]
    assert "RANDOM WEIGHTS" in (out / "logs" / "encode_ss_latent" / f"{sha256s[1]}.log").read_text()

    second = run_workflow(config, ["latents", "latent_stats"], "--cores", "2", config_dir=tmp_path)
    assert second.returncode == 0, second.stderr  # the quarantined asset is left out
    stats = json.loads((slat_dir / "stats.json").read_text())
    assert stats["num_assets"] == len(sha256s) - 1 and stats["random_weights"] is True
    assert len(stats["mean"]) == len(stats["std"]) == 8 and all(s > 0 for s in stats["std"])
    with np.load(slat_dir / f"{sha256s[1]}.npz") as latent:
        assert latent["feats"].shape == (1100, 8) and latent["coords"].dtype == np.uint8
    metadata = pd.read_csv(out / "metadata.csv", index_col="sha256")
    assert metadata[f"ss_latent_{ss_dir.name}"].all()
    assert metadata[f"latent_{slat_dir.name}"].sum() == len(sha256s) - 1
