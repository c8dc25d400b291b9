"""Ingest: local folder and CSV sources, filters, dedup, sharding, quarantine of bad rows."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pandas as pd
import pytest

from slatflow.errors import ConfigError
from slatflow.ingest import (
    MANIFEST_COLUMNS,
    SourceConfig,
    build_manifest,
    in_shard,
    parse_shard,
    read_csv_source,
    scan_local_folder,
    select_assets,
    source_fingerprint,
)
from slatflow.quarantine import failure_path, record_failure


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_local_scan_hashes_bytes_and_keeps_relative_paths(small_assets, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    manifest = scan_local_folder(tmp_path / "assets", out)
    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert sorted(manifest["file_identifier"]) == ["box.obj", "cone.stl", "nested/ball.glb"]
    for row in manifest.itertuples():
        source = small_assets[row.file_identifier]
        assert row.sha256 == sha(source)
        # local_path is relative to the output root and resolves to the source file
        assert os.path.samefile(out / row.local_path, source)
        assert json.loads(row.captions) == []


def test_local_scan_merges_identical_files_and_keeps_companions(tmp_path):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "m.obj").write_text("mtllib m.mtl\nv 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    (src / "a" / "m.mtl").write_text("newmtl x\nmap_Kd tex.png\n")
    (src / "a" / "tex.png").write_bytes(b"\x89PNG fake")
    (src / "b.obj").write_bytes((src / "a" / "m.obj").read_bytes())
    source = SourceConfig(type="local", path=str(src))
    out = tmp_path / "out"
    manifest = build_manifest(source, out, out / "manifest.csv")
    assert len(manifest) == 1, "two files with the same bytes are one asset"
    local = out / manifest["local_path"].iloc[0]
    assert (local.parent / "m.mtl").exists() or (local.parent / "a" / "m.mtl").exists()
    # the companions are neither assets nor reported as foreign files
    assert set(pd.read_csv(out / "manifest.csv")["file_identifier"]) <= {"a/m.obj", "b.obj"}


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "holds no asset files"),
        (lambda p: (p.mkdir(), (p / "notes.txt").write_text("x")), "holds no asset files"),
        (lambda p: p.write_text("x"), "is not a folder"),
    ],
)
def test_local_source_errors_are_one_line(tmp_path, setup, message):
    folder = tmp_path / "src"
    setup(folder)
    with pytest.raises(ConfigError, match=message) as info:
        scan_local_folder(folder, tmp_path / "out")
    assert "\n" not in str(info.value)


def test_unchanged_files_are_not_rehashed(small_assets, tmp_path, monkeypatch):
    out = tmp_path / "out"
    source = SourceConfig(type="local", path=str(tmp_path / "assets"))
    build_manifest(source, out, out / "manifest.csv")
    calls = []
    import slatflow.ingest as ingest

    real = ingest.sha256_of_file
    monkeypatch.setattr(ingest, "sha256_of_file", lambda p: calls.append(p) or real(p))
    (tmp_path / "assets" / "cone.stl").write_bytes((tmp_path / "assets" / "cone.stl").read_bytes() + b"\0")
    build_manifest(source, out, out / "manifest.csv")
    assert [Path(p).name for p in calls] == ["cone.stl"]


def test_fingerprint_changes_when_a_file_is_added(small_assets, tmp_path):
    source = SourceConfig(type="local", path=str(tmp_path / "assets"))
    before = source_fingerprint(source)
    assert source_fingerprint(source) == before
    (tmp_path / "assets" / "extra.stl").write_bytes(small_assets["cone.stl"].read_bytes() + b"x")
    assert source_fingerprint(source) != before


def write_trellis_csv(tmp_path: Path, small_assets: dict[str, Path], **extra_rows) -> Path:
    rows = [
        {
            "sha256": sha(path),
            "file_identifier": f"https://example.org/{name}",
            "aesthetic_score": score,
            "captions": json.dumps([f"a {name}"]),
            "local_path": os.path.relpath(path, tmp_path),
        }
        for (name, path), score in zip(sorted(small_assets.items()), (3.0, 5.5, 6.0))
    ]
    csv = tmp_path / "subset.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


def test_csv_source_filters_and_verifies(small_assets, tmp_path):
    csv = write_trellis_csv(tmp_path, small_assets)
    out = tmp_path / "out"
    source = SourceConfig(type="csv", path=str(csv), min_aesthetic_score=5.0)
    manifest = build_manifest(source, out, out / "manifest.csv")
    assert sorted(manifest["aesthetic_score"]) == [5.5, 6.0]
    assert all(json.loads(c)[0].startswith("a ") for c in manifest["captions"])
    wanted = manifest["sha256"].iloc[0]
    only = build_manifest(SourceConfig(type="csv", path=str(csv), instances=(wanted,)), out, out / "m2.csv")
    assert list(only["sha256"]) == [wanted]


def test_csv_rows_with_missing_or_wrong_files_are_quarantined(small_assets, tmp_path):
    csv = write_trellis_csv(tmp_path, small_assets)
    table = pd.read_csv(csv)
    table.loc[0, "local_path"] = "gone.glb"
    table.loc[1, "sha256"] = "0" * 64
    table.to_csv(csv, index=False)
    out = tmp_path / "out"
    manifest = build_manifest(SourceConfig(type="csv", path=str(csv)), out, out / "manifest.csv")
    assert len(manifest) == 3, "bad rows stay in the manifest so metadata shows them"
    missing = json.loads(failure_path(out, "ingest", table.loc[0, "sha256"]).read_text())
    assert "does not exist" in missing["reason"]
    wrong = json.loads(failure_path(out, "ingest", "0" * 64).read_text())
    assert "sha256 of" in wrong["reason"]
    selected = select_assets(out / "manifest.csv", out, retry_failed=True)
    assert len(selected) == 1, "ingest failures stay out even with retry_failed"


def test_csv_without_required_columns_is_a_clear_error(tmp_path):
    csv = tmp_path / "bad.csv"
    pd.DataFrame({"sha256": ["a" * 64], "captions": ["[]"]}).to_csv(csv, index=False)
    with pytest.raises(ConfigError, match="missing required column.*file_identifier.*local_path"):
        read_csv_source(csv, tmp_path)


def test_shards_partition_the_assets():
    shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(1000)]
    parts = [{s for s in shas if in_shard(s, i, 4)} for i in range(4)]
    assert set().union(*parts) == set(shas)
    assert sum(len(p) for p in parts) == len(shas)
    assert all(200 < len(p) < 300 for p in parts), [len(p) for p in parts]
    assert parse_shard("3/4") == (3, 4)
    for bad in ("4/4", "1", "a/b", "0/0"):
        with pytest.raises(ConfigError):
            parse_shard(bad)


def test_select_assets_leaves_out_quarantined_unless_retrying(small_assets, tmp_path):
    out = tmp_path / "out"
    manifest = build_manifest(SourceConfig(type="local", path=str(tmp_path / "assets")), out, out / "manifest.csv")
    bad = manifest["sha256"].iloc[0]
    record_failure(out, "render", bad, "corrupt file")
    assert bad not in select_assets(out / "manifest.csv", out)
    assert bad in select_assets(out / "manifest.csv", out, retry_failed=True)
    both = select_assets(out / "manifest.csv", out, "0/2") + select_assets(out / "manifest.csv", out, "1/2")
    assert sorted(both) == sorted(set(manifest["sha256"]) - {bad})


def test_broken_links_and_folder_loops_are_left_out_with_one_line_each(small_assets, tmp_path, caplog):
    """Each bad entry is one warning and left out; loops are not followed; nothing hangs."""
    import logging
    import time

    assets = tmp_path / "assets"
    (assets / "gone.obj").symlink_to(assets / "missing.obj")  # dangling
    (assets / "loop_a.glb").symlink_to(assets / "loop_b.glb")  # a loop of file links: ELOOP
    (assets / "loop_b.glb").symlink_to(assets / "loop_a.glb")
    (assets / "here").symlink_to(".")  # a folder link to the folder itself
    (assets / "nested" / "up").symlink_to("..")  # and to a folder above
    (assets / "again").symlink_to(assets / "nested")  # the same real folder twice
    os.mkfifo(assets / "pipe.stl")  # reading it would block for ever
    out = tmp_path / "out"
    out.mkdir()
    started = time.monotonic()
    source = SourceConfig(type="local", path=str(assets))
    assert source_fingerprint(source) == source_fingerprint(source)
    with caplog.at_level(logging.WARNING, logger="slatflow.ingest"):
        manifest = scan_local_folder(assets, out)
    assert time.monotonic() - started < 10
    assert sorted(manifest["file_identifier"]) == ["box.obj", "cone.stl", "nested/ball.glb"]
    left_out = [r.getMessage() for r in caplog.records if r.getMessage().startswith("source entry left out")]
    assert len(left_out) == 7, left_out
    for name, cause in [
        ("gone.obj", "No such file or directory"),
        ("loop_a.glb", "Too many levels of symbolic links"),
        ("loop_b.glb", "Too many levels of symbolic links"),
        ("here", "which holds the source folder (a loop)"),
        ("nested/up", "which holds the source folder (a loop)"),
        ("again", "already scanned through another path"),
        ("pipe.stl", "not a regular file"),
    ]:
        assert sum(f"{assets / name}:" in line and cause in line for line in left_out) == 1, (name, left_out)
    assert all("\n" not in line for line in left_out)
