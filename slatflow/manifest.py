"""The manifest: its columns (ingest writes them, the TRELLIS-500K subsets fill them too,
metadata reads them) and its rows by sha256, for the workflow's input functions at planning time.

A remote job (one Snakemake process per SLURM job) plans one asset, or a group of tens, of
a manifest that can hold 500k rows: parsing every row for it takes longer than the rest of
the job's start (1.1 s at 500k rows). So the first lookups search the file's bytes for the
row's line instead, and only a process that keeps asking (a dry-run or a local run plans
every asset) parses the whole table, once. A row is one line: ingest writes the manifest
with pandas, and its only free-text column, `captions`, is JSON, whose strings hold no raw
newline; a row that is not where a line starts with its sha256 is read from the full table.
"""

from __future__ import annotations

import csv
import io
import json
import os

import pandas as pd

# Lookups answered by a byte search before the whole table is parsed: at 500k rows (100 MB)
# a search takes at most 9 ms and the full parse 1.9 s, so 32 searches stay under 0.3 s.
SEARCHED_LOOKUPS = 32

# The columns planning reads; the others (captions: most of the bytes) stay unparsed.
PLANNING_COLUMNS = ("sha256", "local_path", "subset", "file_identifier", "source_ref")

# ingest's columns: TRELLIS's source columns, then where the file is and what it was
SOURCE_COLUMNS = ["sha256", "file_identifier", "aesthetic_score", "captions"]
MANIFEST_COLUMNS = SOURCE_COLUMNS + ["local_path", "size", "mtime_ns", "subset", "source_ref"]


def captions_json(captions: object) -> str:
    """Captions as a JSON list (TRELLIS crashes without them); a plain string becomes [string]."""
    if isinstance(captions, str):
        try:
            parsed = json.loads(captions)
        except ValueError:
            return json.dumps([captions])
        return json.dumps(parsed if isinstance(parsed, list) else [parsed])
    return "[]"


class ManifestRows:
    """sha256 -> {column: value} (strings; "" where empty) of one manifest file's rows.

    Args:
        path: the manifest, read as it is when first asked (the workflow makes a new one
            when the file's mtime changes).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._data: bytes | None = None
        self._header: list[str] | None = None
        self._table: dict[str, dict[str, str]] | None = None
        self._searched = 0

    def get(self, sha256: str) -> dict[str, str] | None:
        """The row of `sha256`, or None when the manifest has none."""
        if self._table is None and self._searched < SEARCHED_LOOKUPS:
            self._searched += 1
            row = self._search(sha256)
            if row is not None:
                return row
        return self.table().get(sha256)

    def table(self) -> dict[str, dict[str, str]]:
        """Every row, parsed once (the planning columns only)."""
        if self._table is None:
            header = pd.read_csv(self.path, nrows=0).columns
            columns = [c for c in PLANNING_COLUMNS if c in header]
            frame = pd.read_csv(self.path, usecols=columns, dtype=str, keep_default_na=False)
            self._table = {row["sha256"]: row for row in frame.to_dict("records")}
            self._data = None  # the bytes were only for searches
        return self._table

    def _search(self, sha256: str) -> dict[str, str] | None:
        if self._data is None:
            with open(self.path, "rb") as f:
                self._data = f.read()
            first_line = self._data[: self._data.find(b"\n")].decode().rstrip("\r")
            self._header = next(csv.reader([first_line]), [""])
        if self._header[0] != "sha256":
            return None
        start = self._data.find(b"\n" + sha256.encode() + b",")
        if start < 0:
            return None
        end = self._data.find(b"\n", start + 1)
        line = self._data[start + 1 : end if end >= 0 else len(self._data)].decode().rstrip("\r")
        values = next(csv.reader(io.StringIO(line)), [])
        if len(values) != len(self._header) or values[0] != sha256:
            return None  # not a whole row where the line starts: the full table decides
        row = dict(zip(self._header, values))
        return {c: row[c] for c in PLANNING_COLUMNS if c in row}
