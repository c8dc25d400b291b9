"""TRELLIS-500K subset CSVs -> manifest rows: local paths, lookups, filters, clear errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pandas as pd
import pytest

from slatflow.errors import ConfigError
from slatflow.ingest import MANIFEST_COLUMNS, SourceConfig, build_manifest
from slatflow.quarantine import load_failures
from slatflow.trellis500k import (
    DownloadSettings,
    asset_sources,
    check_hssd_token,
    check_user_archives,
    local_path,
    read_subset_csv,
    sketchfab_uid,
    trellis500k_manifest,
)

SHA = "ab" * 32
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def write_csv(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_local_paths_per_subset():
    assert sketchfab_uid("https://sketchfab.com/3d-models/8d1f2c") == "8d1f2c"
    assert sketchfab_uid("https://sketchfab.com/3d-models/old-chair-8d1f2c") == "8d1f2c"
    assert local_path("ObjaverseXL_sketchfab", SHA, "https://sketchfab.com/3d-models/u1", "glbs/000-012/u1.glb") == f"raw/ObjaverseXL_sketchfab/{SHA}/u1.glb"
    # GitHub keeps the repo layout (its companions sit at their relative paths)
    assert local_path("ObjaverseXL_github", SHA, f"https://github.com/o/r/blob/{COMMIT}/a/b%20c/m.obj") == f"raw/ObjaverseXL_github/{SHA}/a/b c/m.obj"
    assert local_path("ABO", SHA, "0/B01.glb") == f"raw/ABO/{SHA}/B01.glb"
    assert local_path("3D-FUTURE", SHA, "3D-FUTURE-model/0a1b") == f"raw/3D-FUTURE/{SHA}/raw_model.obj"
    assert local_path("HSSD", SHA, "objects/5/5abc.glb") == f"raw/HSSD/{SHA}/5abc.glb"
    assert local_path("Toys4k", SHA, "cat/cat_000/cat_000.blend") == f"raw/Toys4k/{SHA}/cat_000.blend"


def test_manifest_rows_lookups_and_problems(tmp_path):
    sketchfab = write_csv(
        tmp_path / "ObjaverseXL_sketchfab.csv",
        [
            {"sha256": SHA, "file_identifier": "https://sketchfab.com/3d-models/u1", "aesthetic_score": 6.1, "captions": '["a chair"]'},
            {"sha256": "cd" * 32, "file_identifier": "https://sketchfab.com/3d-models/gone", "aesthetic_score": 6.0, "captions": ""},
        ],
    )
    github = write_csv(
        tmp_path / "ObjaverseXL_github.csv",
        [{"sha256": "ef" * 32, "file_identifier": "https://example.com/not-github", "aesthetic_score": 7.0, "captions": "[]"}],
    )
    paths = tmp_path / "object-paths.json.gz"
    paths.write_bytes(gzip.compress(json.dumps({"u1": "glbs/000-012/u1.glb"}).encode()))
    manifest = trellis500k_manifest({"ObjaverseXL_sketchfab": sketchfab, "ObjaverseXL_github": github}, tmp_path / "out", paths)
    assert list(manifest.columns) == MANIFEST_COLUMNS + ["problem"]
    good, gone, bad_id = manifest.to_dict("records")
    assert good["source_ref"] == "glbs/000-012/u1.glb" and good["problem"] == "" and good["size"] == -1
    assert json.loads(good["captions"]) == ["a chair"]
    assert "gone" in gone["problem"] and "object-paths" in gone["problem"]
    assert bad_id["problem"] and "github" in bad_id["problem"].lower()


def test_sketchfab_without_object_paths_is_a_config_error(tmp_path):
    csv = write_csv(tmp_path / "s.csv", [{"sha256": SHA, "file_identifier": "https://sketchfab.com/3d-models/u1"}])
    with pytest.raises(ConfigError, match="object-paths"):
        trellis500k_manifest({"ObjaverseXL_sketchfab": csv}, tmp_path)


def test_csv_without_columns_names_the_subset(tmp_path):
    csv = write_csv(tmp_path / "ABO.csv", [{"sha": SHA}])
    with pytest.raises(ConfigError, match=r"ABO: .*lacks column\(s\) sha256, file_identifier"):
        read_subset_csv(csv, "ABO")


def test_build_manifest_filters_quarantines_and_lists_sources(tmp_path):
    out = tmp_path / "out"
    csv = write_csv(
        tmp_path / "HSSD.csv",
        [
            {"sha256": SHA, "file_identifier": "objects/a.glb", "aesthetic_score": 5.0},
            {"sha256": "cd" * 32, "file_identifier": "objects/b.glb", "aesthetic_score": 4.0},
        ],
    )
    abo = write_csv(tmp_path / "ABO.csv", [{"sha256": "ef" * 32, "file_identifier": "../../etc/passwd", "aesthetic_score": 9.0}])
    source = SourceConfig(type="trellis500k", subsets=("HSSD", "ABO"), min_aesthetic_score=4.5)
    (out / "raw/HSSD" / SHA).mkdir(parents=True)
    (out / "raw/HSSD" / SHA / "a.glb").write_bytes(b"already here")  # no token needed then
    manifest = build_manifest(source, out, out / "manifest.csv", subset_csvs={"HSSD": str(csv), "ABO": str(abo)}, download={})
    assert set(manifest["sha256"]) == {SHA, "ef" * 32}  # the 4.0 score is filtered out
    sources = asset_sources(out / "manifest.csv")
    assert sources[SHA].subset == "HSSD" and sources[SHA].file_identifier == "objects/a.glb"
    assert manifest.set_index("sha256").at[SHA, "size"] == len(b"already here")
    # ABO's name is the member's base name: a path in the CSV can never leave raw/ABO/<sha>/
    assert manifest.set_index("sha256").at["ef" * 32, "local_path"] == f"raw/ABO/{'ef' * 32}/passwd"
    assert not load_failures(out)


def test_user_archives_missing_say_where_to_get_them(tmp_path):
    with pytest.raises(ConfigError, match=r"3D-FUTURE-model\.zip from https://tianchi.*download\.future_archive"):
        check_user_archives({"3D-FUTURE"}, DownloadSettings(), tmp_path)
    with pytest.raises(ConfigError, match=r"toys4k_blend_files\.zip.*download\.toys4k_archive"):
        check_user_archives({"Toys4k", "ABO"}, DownloadSettings(), tmp_path)
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw/toys4k_blend_files.zip").write_bytes(b"PK")
    check_user_archives({"Toys4k", "ABO"}, DownloadSettings(), tmp_path)  # TRELLIS's place is found


def test_hssd_without_token_stops_only_when_something_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no stored token either
    monkeypatch.delenv("HF_TOKEN", raising=False)
    manifest = pd.DataFrame({"subset": ["HSSD"], "local_path": [f"raw/HSSD/{SHA}/a.glb"]})
    with pytest.raises(ConfigError, match="HF_TOKEN.*hssd-models|hssd-models.*HF_TOKEN"):
        check_hssd_token(manifest, tmp_path)
    (tmp_path / "raw/HSSD" / SHA).mkdir(parents=True)
    (tmp_path / "raw/HSSD" / SHA / "a.glb").write_bytes(b"x")
    check_hssd_token(manifest, tmp_path)
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    (tmp_path / "raw/HSSD" / SHA / "a.glb").unlink()
    check_hssd_token(manifest, tmp_path)


def test_hf_endpoint_from_config_or_environment(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.example")
    assert DownloadSettings.from_config({}).csv_url("ABO") == "http://mirror.example/datasets/JeffreyXiang/TRELLIS-500K/resolve/main/ABO.csv"
    settings = DownloadSettings.from_config({"hf_endpoint": "http://127.0.0.1:9", "csv_revision": "abc123"})
    assert settings.csv_url("3D-FUTURE") == "http://127.0.0.1:9/datasets/JeffreyXiang/TRELLIS-500K/resolve/abc123/3D-FUTURE.csv"
