"""The trellis500k source end to end: every subset downloaded through the real rules, offline.

A loopback server plays the HF hub and S3, a bare repository GitHub, zips on disk the
hand-downloaded archives (tests/trellis500k_fixtures.py). Bad assets are quarantined with
their reason while the others land; a killed run resumes its transfers.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO, SNAKEMAKE, run_workflow, write_config
from download_fixtures import fixture_server  # noqa: F401 - a fixture
from slatflow.ingest import sha256_of_file
from slatflow.quarantine import load_failures
from trellis500k_fixtures import HF_TOKEN, build_world, mesh_bytes, sha256_hex, tar_bytes

pytestmark = pytest.mark.usefixtures("hf_token")


@pytest.fixture
def hf_token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)


def test_every_subset_downloads_verified_and_bad_assets_are_quarantined(tmp_path, fixture_server):  # noqa: F811
    world = build_world(tmp_path / "world", fixture_server)
    out = Path(world.config["output_dir"])

    first = run_workflow(world.config, ["downloads"], config_dir=tmp_path)
    assert first.returncode != 0, "bad assets fail their jobs in the first run"
    for asset in world.assets:
        if asset.fault:
            continue
        path = out / asset.local_path
        assert path.is_file(), f"{asset.subset} {asset.file_identifier}: {first.stderr[-3000:]}"
        key = path.parent / "image.jpg" if asset.subset == "3D-FUTURE" else path
        assert sha256_of_file(key) == asset.sha256
        for companion in asset.companions:
            assert (out / companion).is_file(), companion
        assert not list(path.parent.rglob("*.part")), "no partial file is left beside a download"

    failures = {f.sha256: f for f in load_failures(out)}
    expected = {"hash": ("download", "sha256"), "404": ("download", "404"), "absent": ("download", "no member"), "unknown": ("ingest", "object-paths")}
    for fault, (stage, words) in expected.items():
        for asset in world.by_fault(fault):
            assert asset.sha256 in failures, f"{fault}: {asset.file_identifier} not quarantined"
            assert failures[asset.sha256].stage == stage
            assert words in failures[asset.sha256].reason, failures[asset.sha256].reason
    assert not (out / world.by_fault("hash")[0].local_path).exists(), "a file with the wrong hash never lands"

    # the flaky glb was retried and resumed; the ABO tar was streamed once, resumed after its truncation
    flaky = "/datasets/allenai/objaverse/resolve/main/glbs/000-001/bbb222.glb"
    assert any(r.headers.get("range", "").startswith("bytes=") for r in fixture_server.hits(flaky))
    abo_gets = [r for r in fixture_server.hits("/archives/abo-3dmodels.tar") if r.method == "GET"]
    assert len(abo_gets) == 2 and "range" in abo_gets[1].headers
    hssd = fixture_server.hits("/datasets/hssd/hssd-models/resolve/main/objects/5/5abc.glb")
    assert hssd and all(r.headers.get("authorization") == f"Bearer {HF_TOKEN}" for r in hssd)

    second = run_workflow(world.config, ["downloads"], config_dir=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    metadata = pd.read_csv(out / "metadata.csv", index_col="sha256")
    for asset in world.assets:
        if asset.fault == "":
            assert metadata.at[asset.sha256, "local_path"] == asset.local_path
            assert pd.isna(metadata.at[asset.sha256, "failed_stage"])
        else:
            assert pd.isna(metadata.at[asset.sha256, "local_path"]), "local_path only for files that are there"
            assert metadata.at[asset.sha256, "failed_stage"] in ("download", "ingest")
    assert len(metadata) == len(world.assets), "the low aesthetic score is filtered out"

    requests_before = len(fixture_server.requests)
    dry = run_workflow(world.config, ["renders"], "-n", config_dir=tmp_path)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "download_asset" not in dry.stdout, "downloaded assets are not fetched again"
    good = [a for a in world.assets if not a.fault]
    planned = re.search(r"^render_views\s+(\d+)$", dry.stdout, re.MULTILINE)
    assert planned and int(planned.group(1)) == len(good), dry.stdout[-2000:]
    assert len(fixture_server.requests) == requests_before, "a planned run does not touch the network"


def test_a_killed_download_run_resumes_where_it_stopped(tmp_path, fixture_server):  # noqa: F811
    world = build_world(tmp_path / "world", fixture_server, slow_glb=(3_000_000, 400_000))
    config = dict(world.config, source=dict(world.config["source"], subsets=["ObjaverseXL_sketchfab"]))
    config["source"]["instances"] = ["https://sketchfab.com/3d-models/aaa111"]
    out = Path(config["output_dir"])
    asset = world.assets[0]
    target = out / asset.local_path
    part = target.with_name(target.name + ".part")

    configfile = write_config(tmp_path / "config.yaml", config)
    env = dict(os.environ, HOME=str(tmp_path), PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    cmd = SNAKEMAKE + ["downloads", "--configfile", str(configfile)]
    process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (part.is_file() and part.stat().st_size > 300_000):
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGTERM)  # as a SLURM time limit or Ctrl-C ends a run
    try:
        process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
    assert part.is_file() and not target.exists(), "the transfer was under way when the run was killed"
    kept = part.stat().st_size

    again = run_workflow(config, ["downloads"], config_dir=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert sha256_of_file(target) == asset.sha256
    path = "/datasets/allenai/objaverse/resolve/main/" + "glbs/000-001/aaa111.glb"
    offsets = [int(r.headers["range"].split("=")[1].split("-")[0]) for r in fixture_server.hits(path) if "range" in r.headers]
    assert offsets and max(offsets) >= kept // 2, f"resumed from {offsets}; {kept} bytes were on disk"


def test_assets_added_to_a_subset_later_are_fetched_and_old_ones_kept(tmp_path):
    """A grown CSV re-ingests; the next ABO pass takes only the new member (local copies of
    the CSV and the archive: source.csv_dir, download.abo_archive)."""
    members = {f"3dmodels/original/{i}/B00{i}.glb": mesh_bytes("glb", 20 + i) for i in range(3)}
    archive = tmp_path / "abo-3dmodels.tar"
    archive.write_bytes(tar_bytes(members))
    rows = [
        {"sha256": sha256_hex(members[f"3dmodels/original/{i}/B00{i}.glb"]), "file_identifier": f"{i}/B00{i}.glb", "aesthetic_score": 6.0}
        for i in range(3)
    ]
    (tmp_path / "csv").mkdir()
    config = {
        "output_dir": str(tmp_path / "out"),
        "source": {"type": "trellis500k", "subsets": ["ABO"], "csv_dir": str(tmp_path / "csv")},
        "download": {"abo_archive": str(archive)},
    }
    out = tmp_path / "out"
    first_file = out / f"raw/ABO/{rows[0]['sha256']}/B000.glb"
    for count in (1, 3):
        pd.DataFrame(rows[:count]).to_csv(tmp_path / "csv/ABO.csv", index=False)
        result = run_workflow(config, ["downloads"], config_dir=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        if count == 1:
            first_inode = first_file.stat().st_ino
    for row in rows:
        path = out / f"raw/ABO/{row['sha256']}/{Path(row['file_identifier']).name}"
        assert sha256_of_file(path) == row["sha256"]
    assert first_file.stat().st_ino == first_inode, "the asset fetched first was not fetched again"
    assert pd.read_csv(out / "metadata.csv")["local_path"].notna().sum() == 3
