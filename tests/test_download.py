"""slatflow.download per asset: which failures quarantine an asset and which stop the run."""

from __future__ import annotations

import pytest

from download_fixtures import fixture_server  # noqa: F401 - a fixture
from slatflow.download import fetch_asset
from slatflow.errors import AssetError, ConfigError
from slatflow.trellis500k import AssetSource, DownloadSettings
from trellis500k_fixtures import sha256_hex, write_zip

FAST = {"timeout_s": 1, "attempts": 2, "backoff_s": 0.01}


def test_gated_hssd_stops_the_run_with_what_to_do(tmp_path, fixture_server, monkeypatch):  # noqa: F811
    body = b"glb bytes"
    fixture_server.add("/datasets/hssd/hssd-models/resolve/main/objects/a.glb", body, token="hf_right")
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    source = AssetSource(sha256_hex(body), "HSSD", "objects/a.glb")
    settings = DownloadSettings(hf_endpoint=fixture_server.url, **FAST)
    with pytest.raises(ConfigError, match=r"accept its terms at https://huggingface.co/datasets/hssd/hssd-models"):
        fetch_asset(source, tmp_path / "a.glb", settings, tmp_path)
    assert not (tmp_path / "a.glb").exists()


def test_future_instance_without_its_key_image_is_an_asset_error(tmp_path):
    archive = write_zip(tmp_path / "f.zip", {"3D-FUTURE-model/i1/raw_model.obj": b"v 0 0 0\n"})
    settings = DownloadSettings(future_archive=str(archive))
    source = AssetSource("ab" * 32, "3D-FUTURE", "3D-FUTURE-model/i1")
    dest = tmp_path / "out" / "raw_model.obj"
    with pytest.raises(AssetError, match=r"has no image\.jpg"):
        fetch_asset(source, dest, settings, tmp_path / "out")
    assert not dest.exists() and not (dest.parent / ".extracting").exists()


def test_toys4k_wrong_hash_leaves_nothing(tmp_path):
    archive = write_zip(tmp_path / "t.zip", {"toys4k_blend_files/c/c0/c0.blend": b"blend"})
    settings = DownloadSettings(toys4k_archive=str(archive))
    dest = tmp_path / "out" / "c0.blend"
    with pytest.raises(AssetError, match="sha256"):
        fetch_asset(AssetSource("cd" * 32, "Toys4k", "c/c0/c0.blend"), dest, settings, tmp_path / "out")
    assert not any(dest.parent.rglob("*.blend"))
    fetch_asset(AssetSource(sha256_hex(b"blend"), "Toys4k", "c/c0/c0.blend"), dest, settings, tmp_path / "out")
    assert dest.read_bytes() == b"blend"
