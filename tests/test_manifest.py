"""ManifestRows: rows found by a byte search equal the full table's, and odd rows fall back to it."""

from __future__ import annotations

import hashlib

import pandas as pd

from slatflow import manifest as manifest_module
from slatflow.ingest import MANIFEST_COLUMNS
from slatflow.manifest import PLANNING_COLUMNS, ManifestRows


def sha_of(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def write_manifest(path, count: int, captions=None) -> pd.DataFrame:
    """A manifest as ingest writes it (pandas, MANIFEST_COLUMNS), with quotes and commas."""
    table = pd.DataFrame(
        {
            "sha256": [sha_of(i) for i in range(count)],
            "file_identifier": [f'dir, with comma/"quoted" {i}.glb' for i in range(count)],
            "aesthetic_score": [4.5 + i % 3 if i % 2 else float("nan") for i in range(count)],
            "captions": captions or ['["a chair, wooden", "\\"quoted\\""]'] * count,
            "local_path": [f"../src/{i:04d}/model.glb" for i in range(count)],
            "size": list(range(count)),
            "mtime_ns": [10**18 + i for i in range(count)],
            "subset": ["ObjaverseXL_sketchfab" if i % 2 else "" for i in range(count)],
            "source_ref": [f"glbs/000-{i}.glb" if i % 2 else "" for i in range(count)],
        },
        columns=MANIFEST_COLUMNS,
    )
    table.to_csv(path, index=False)
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def expected_row(table: pd.DataFrame, sha: str) -> dict:
    return table.set_index("sha256", drop=False).loc[sha, list(PLANNING_COLUMNS)].to_dict()


def test_searched_rows_equal_the_full_tables(tmp_path):
    path = tmp_path / "manifest.csv"
    table = write_manifest(path, 50)
    rows = ManifestRows(path)
    for sha in table["sha256"].iloc[[0, 1, 25, 49]]:
        assert rows.get(sha) == expected_row(table, sha)
    assert rows._table is None, "a few lookups never parse the whole table"
    assert rows.get("f" * 64) is None
    assert rows.table() == {sha: expected_row(table, sha) for sha in table["sha256"]}


def test_the_whole_table_is_parsed_after_the_searched_lookups(tmp_path, monkeypatch):
    path = tmp_path / "manifest.csv"
    table = write_manifest(path, 20)
    monkeypatch.setattr(manifest_module, "SEARCHED_LOOKUPS", 3)
    rows = ManifestRows(path)
    for sha in table["sha256"].iloc[:3]:
        rows.get(sha)
    assert rows._table is None
    assert rows.get(table["sha256"].iloc[10]) == expected_row(table, table["sha256"].iloc[10])
    assert rows._table is not None and rows._data is None


def test_a_line_that_only_looks_like_a_row_falls_back_to_the_table(tmp_path):
    """A quoted field with a raw newline followed by another asset's sha256 and a comma: the
    search lands inside the field, sees no whole row, and the full table answers."""
    path = tmp_path / "manifest.csv"
    decoy = sha_of(3)
    table = write_manifest(path, 5, captions=[f'["line one\n{decoy},not a row"]'] + ["[]"] * 4)
    assert f"\n{decoy}," in path.read_text()  # the decoy comes before the real row 3
    rows = ManifestRows(path)
    assert rows.get(decoy) == expected_row(table, decoy)
