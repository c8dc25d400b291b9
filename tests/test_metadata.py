"""metadata.csv derived from disk: TRELLIS's columns, voxel counts, failures, statistics."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from slatflow.ingest import SourceConfig, build_manifest
from slatflow.io import save_npz_atomic, write_points_ply
from slatflow.metadata import ModelNames, ply_vertex_count, write_metadata
from slatflow.quarantine import record_failure

MODELS = ModelNames(features=("dinov2_vitl14_reg",), ss_latents=("ss_enc",), latents=("dinov2_vitl14_reg_slat",))
TRELLIS_COLUMNS = [
    "sha256",
    "file_identifier",
    "aesthetic_score",
    "captions",
    "local_path",
    "rendered",
    "voxelized",
    "num_voxels",
    "cond_rendered",
    "feature_dinov2_vitl14_reg",
    "ss_latent_ss_enc",
    "latent_dinov2_vitl14_reg_slat",
]


def test_metadata_reflects_the_files_on_disk(small_assets, tmp_path):
    out = tmp_path / "out"
    manifest = build_manifest(SourceConfig(type="local", path=str(tmp_path / "assets")), out, out / "manifest.csv")
    done, failed, untouched = manifest["sha256"]
    (out / "renders" / done).mkdir(parents=True)
    (out / "renders" / done / "transforms.json").write_text("{}")
    (out / "renders" / failed).mkdir(parents=True)  # a render folder without transforms.json
    write_points_ply(out / "voxels" / f"{done}.ply", np.random.default_rng(0).random((37, 3)) - 0.5)
    save_npz_atomic(out / "features" / "dinov2_vitl14_reg" / f"{done}.npz", a=np.zeros(1))
    record_failure(out, "render", failed, "Blender timed out after 600 s", "logs/x.log")

    metadata = write_metadata(out, out / "manifest.csv", out / "metadata.csv", out / "statistics.txt", MODELS)
    table = pd.read_csv(out / "metadata.csv")
    assert list(table.columns) == TRELLIS_COLUMNS + ["failed_stage", "failed_reason", "failed_log"]
    table = table.set_index("sha256")
    assert table.loc[done, "rendered"] and not table.loc[failed, "rendered"]
    assert table.loc[done, "voxelized"] and table.loc[done, "num_voxels"] == 37
    assert pd.isna(table.loc[untouched, "num_voxels"])
    assert table.loc[done, "feature_dinov2_vitl14_reg"] and not table.loc[untouched, "feature_dinov2_vitl14_reg"]
    assert table.loc[failed, "failed_stage"] == "render"
    assert "timed out" in table.loc[failed, "failed_reason"]
    assert metadata.shape[0] == 3
    stats = (out / "statistics.txt").read_text()
    assert "assets: 3" in stats and "rendered: 1" in stats and "render: 1" in stats
    assert "num_voxels: min 37" in stats


def test_a_new_model_folder_adds_its_column(small_assets, tmp_path):
    out = tmp_path / "out"
    manifest = build_manifest(SourceConfig(type="local", path=str(tmp_path / "assets")), out, out / "manifest.csv")
    save_npz_atomic(out / "features" / "other_model" / f"{manifest['sha256'].iloc[0]}.npz", a=np.zeros(1))
    metadata = write_metadata(out, out / "manifest.csv", out / "metadata.csv", out / "statistics.txt", MODELS)
    assert metadata["feature_other_model"].sum() == 1


def test_ply_vertex_count_reads_the_header_only(tmp_path):
    write_points_ply(tmp_path / "v.ply", np.zeros((5, 3)))
    assert ply_vertex_count(tmp_path / "v.ply") == 5


def test_model_names_from_config():
    names = ModelNames.from_config(
        {
            "features": {"model": "dinov2_vitl14_reg"},
            "latents": {"ss_encoder": "/ckpts/ss", "slat_encoder": "org/repo/ckpts/slat"},
        }
    )
    assert names == ModelNames(("dinov2_vitl14_reg",), ("ss",), ("dinov2_vitl14_reg_slat",))
    assert ModelNames.from_config({}) == ModelNames()
    json.dumps(names.__dict__)


def test_the_earliest_stage_of_several_failures_is_shown(small_assets, tmp_path):
    out = tmp_path / "out"
    manifest = build_manifest(SourceConfig(type="local", path=str(tmp_path / "assets")), out, out / "manifest.csv")
    sha = manifest["sha256"].iloc[0]
    record_failure(out, "meshes", sha, "no faces (meshes)")
    record_failure(out, "voxelize", sha, "no faces (voxelize)")
    metadata = write_metadata(out, out / "manifest.csv", out / "metadata.csv", out / "statistics.txt", MODELS)
    assert metadata.loc[sha, "failed_stage"] == "voxelize"


def test_a_voxel_file_without_a_readable_header_is_not_voxelized(small_assets, tmp_path):
    out = tmp_path / "out"
    manifest = build_manifest(SourceConfig(type="local", path=str(tmp_path / "assets")), out, out / "manifest.csv")
    good, bad, _ = manifest["sha256"]
    write_points_ply(out / "voxels" / f"{good}.ply", np.zeros((5, 3)))
    (out / "voxels" / f"{bad}.ply").write_bytes(b"ply\nformat binary_lit")  # cut inside the header
    metadata = write_metadata(out, out / "manifest.csv", out / "metadata.csv", out / "statistics.txt", MODELS)
    assert metadata.loc[good, "voxelized"] and not metadata.loc[bad, "voxelized"]
