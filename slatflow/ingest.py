"""Ingest: the manifest of assets from a source (a local folder, a TRELLIS-style CSV, or
TRELLIS-500K subsets).

The manifest (`OUT/manifest.csv`) has one row per asset, keyed by the sha256 of its
source file's bytes, with TRELLIS's source columns (`sha256`, `file_identifier`,
`aesthetic_score`, `captions`) and `local_path` (relative to OUT), plus `size` and
`mtime_ns` so that the next ingest reuses the hashes of unchanged files, and for
TRELLIS-500K the `subset` and `source_ref` the download stage fetches it by.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import pandas as pd

from slatflow.errors import ConfigError
from slatflow.io import sha256_of_file
from slatflow.manifest import MANIFEST_COLUMNS, SOURCE_COLUMNS, captions_json  # noqa: F401 - the stage's public names
from slatflow.quarantine import clear_failure, record_failure
from slatflow.stages import INGEST

logger = logging.getLogger(__name__)

STAGE = INGEST.name

# Formats the render stage imports; every other file is a companion (textures, .bin, .mtl)
# or not part of any asset.
ASSET_EXTENSIONS = frozenset(
    {".glb", ".gltf", ".obj", ".fbx", ".ply", ".stl", ".blend", ".usd", ".usda", ".usdc", ".usdz", ".abc", ".dae"}
)
COMPANION_EXTENSIONS = frozenset(
    {".bin", ".mtl", ".png", ".jpg", ".jpeg", ".tga", ".bmp", ".tif", ".tiff", ".exr", ".hdr", ".webp", ".ktx2", ".dds"}
)


@dataclass(frozen=True)
class SourceConfig:
    """The `source:` section of the config (validated by the schema before it gets here)."""

    type: Literal["local", "csv", "trellis500k"]
    path: str = ""  # trellis500k: an optional folder holding the subset CSVs
    path_column: str = "local_path"
    min_aesthetic_score: float | None = None
    instances: tuple[str, ...] | None = None
    verify_sha256: bool = True
    subsets: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, section: dict) -> "SourceConfig":
        instances = section.get("instances")
        return cls(
            type=section["type"],
            path=section.get("path", ""),
            path_column=section.get("path_column", "local_path"),
            min_aesthetic_score=section.get("min_aesthetic_score"),
            instances=tuple(_read_instances(instances)) if instances is not None else None,
            verify_sha256=section.get("verify_sha256", True),
            subsets=tuple(section.get("subsets", ())),
        )


def _read_instances(instances: str | list[str]) -> list[str]:
    """The `instances` filter: a list of sha256s/file identifiers, or a file of them one per line."""
    if isinstance(instances, str):
        path = Path(instances)
        if not path.is_file():
            raise ConfigError(f"source.instances: {instances!r} is not a file (give a list or a file path)")
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return list(instances)


def source_fingerprint(source: SourceConfig) -> str:
    """A cheap digest of the source's state (names, sizes, mtimes): a change re-runs ingest.

    Entries the scan leaves out (broken links, loops) are left out here too, silently: ingest
    reports them.
    """
    digest = hashlib.sha256(repr(source).encode())
    path = Path(source.path)
    if source.type == "local":
        if path.is_dir():
            for file, st in sorted(walk_source_files(path, problems=[])):
                digest.update(f"{file}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    elif source.type == "csv" and path.is_file():
        st = path.stat()
        digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def walk_source_files(root: Path, problems: list[str]) -> Iterator[tuple[Path, os.stat_result]]:
    """The regular files under `root` (hidden names left out), with their stat.

    Links are followed, each real folder is scanned once, and a link to a folder that holds
    `root` (`.`, `..`, `/`) is not followed (os.walk would go round it until ELOOP, or for
    ever). What cannot be used is left out and described in `problems`, one line each: a
    dangling link, a loop of file links, a folder reached again through another link, a
    FIFO or device (reading one would block), an unreadable folder.

    Args:
        root: the source folder.
        problems: appended to, one line per entry left out.
    """
    real_root = os.path.realpath(root)
    scanned = {real_root}

    def unreadable_folder(exc: OSError) -> None:
        problems.append(f"{exc.filename}: unreadable folder ({exc.strerror or exc})")

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=unreadable_folder):
        kept = []
        # real folders before links, so a folder is scanned under its own path when it can be
        for name in sorted(dirnames, key=lambda d: (os.path.islink(os.path.join(dirpath, d)), d)):
            if name.startswith("."):
                continue
            folder = os.path.join(dirpath, name)
            real = os.path.realpath(folder)
            if real == real_root or real_root.startswith(real.rstrip(os.sep) + os.sep):
                problems.append(f"{folder}: a link to {real}, which holds the source folder (a loop), not followed")
            elif real in scanned:
                problems.append(f"{folder}: a link to {real}, already scanned through another path, not followed")
            else:
                scanned.add(real)
                kept.append(name)
        dirnames[:] = kept
        for name in filenames:
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            try:
                st = path.stat()
            except OSError as exc:  # a dangling link (ENOENT) or a loop of links (ELOOP)
                target = os.readlink(path) if path.is_symlink() else ""
                kind = f"a link to {target!r} that cannot be followed" if target else "cannot be read"
                problems.append(f"{path}: {kind} ({exc.strerror or exc})")
                continue
            if not stat.S_ISREG(st.st_mode):
                problems.append(f"{path}: not a regular file (a FIFO, socket or device)")
                continue
            yield path, st


def _previous_hashes(previous_manifest: str | os.PathLike | None, out_dir: Path) -> dict[tuple, str]:
    """(absolute path, size, mtime_ns) -> sha256 from the last manifest, to skip re-hashing."""
    if previous_manifest is None or not Path(previous_manifest).is_file():
        return {}
    try:
        previous = pd.read_csv(previous_manifest, usecols=["sha256", "local_path", "size", "mtime_ns"])
    except (ValueError, pd.errors.ParserError) as exc:
        logger.warning("ignoring unreadable previous manifest %s: %s", previous_manifest, exc)
        return {}
    return {
        (os.path.normpath(out_dir / p), int(s), int(m)): h
        for h, p, s, m in previous.itertuples(index=False)
    }


def _hash_with_cache(path: Path, cache: dict[tuple, str]) -> tuple[str, int, int]:
    st = path.stat()
    key = (os.path.normpath(path.absolute()), st.st_size, st.st_mtime_ns)
    sha = cache.get(key) or sha256_of_file(path)
    return sha, st.st_size, st.st_mtime_ns


def scan_local_folder(
    folder: str | os.PathLike, out_dir: str | os.PathLike, previous_manifest: str | os.PathLike | None = None
) -> pd.DataFrame:
    """One row per asset file under `folder` (recursive), companions left where they are.

    Args:
        folder: the source folder.
        out_dir: the output root; `local_path` is written relative to it.
        previous_manifest: the last manifest, whose hashes are reused for unchanged files.

    Returns:
        A frame with MANIFEST_COLUMNS; `aesthetic_score` is empty (a local folder has none)
        and `captions` is `[]`.

    Raises:
        ConfigError: the folder is missing, unreadable or holds no asset file.
    """
    folder = Path(folder)
    out_dir = Path(out_dir).absolute()
    if not folder.exists():
        raise ConfigError(f"source.path {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise ConfigError(f"source.path {str(folder)!r} is not a folder (source.type is 'local')")
    if not os.access(folder, os.R_OK | os.X_OK):
        raise ConfigError(f"source.path {str(folder)!r} is not readable")

    cache = _previous_hashes(previous_manifest, out_dir)
    rows, other_extensions, unreadable, left_out = [], Counter(), [], []
    for path, _ in sorted(walk_source_files(folder, left_out)):
        ext = path.suffix.lower()
        if ext not in ASSET_EXTENSIONS:
            if ext not in COMPANION_EXTENSIONS:
                other_extensions[ext or "(none)"] += 1
            continue
        try:
            sha, size, mtime_ns = _hash_with_cache(path, cache)
        except OSError as exc:
            unreadable.append(f"{path}: {exc.strerror or exc}")
            continue
        rows.append(
            {
                "sha256": sha,
                "file_identifier": path.relative_to(folder).as_posix(),
                "aesthetic_score": float("nan"),
                "captions": "[]",
                "local_path": Path(os.path.relpath(path.absolute(), out_dir)).as_posix(),
                "size": size,
                "mtime_ns": mtime_ns,
                "subset": "",
                "source_ref": "",
            }
        )
    if other_extensions:
        listed = ", ".join(f"{ext} x{n}" for ext, n in sorted(other_extensions.items()))
        logger.warning("ignored files that are not 3D assets or their companions: %s", listed)
    for line in left_out:
        logger.warning("source entry left out: %s", line)
    for line in unreadable:
        logger.error("unreadable source file, left out: %s", line)
    if not rows:
        raise ConfigError(
            f"source.path {str(folder)!r} holds no asset files "
            f"(looked for {', '.join(sorted(ASSET_EXTENSIONS))}; {len(unreadable)} unreadable)"
        )
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS)


def read_csv_source(
    csv_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    path_column: str = "local_path",
    verify_sha256: bool = True,
    previous_manifest: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """Rows of a TRELLIS-500K-style CSV whose files exist, with their sha256 checked.

    Args:
        csv_path: columns `sha256`, `file_identifier`, `path_column`; `aesthetic_score` and
            `captions` are kept when present. Relative paths in `path_column` are relative to
            the CSV's folder.
        out_dir: the output root; `local_path` is rewritten relative to it.
        path_column: the column holding each asset's file path.
        verify_sha256: hash each file and quarantine a row whose hash differs.
        previous_manifest: the last manifest, whose hashes are reused for unchanged files.

    Returns:
        A frame with MANIFEST_COLUMNS, including rows whose file is missing or wrong (they are
        quarantined by `build_manifest`); the `problem` column says what is wrong, or is empty.
    """
    csv_path = Path(csv_path)
    out_dir = Path(out_dir).absolute()
    if not csv_path.is_file():
        raise ConfigError(f"source.path {str(csv_path)!r} is not a file (source.type is 'csv')")
    try:
        table = pd.read_csv(csv_path, dtype={"sha256": str, "file_identifier": str, path_column: str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ConfigError(f"source.path {str(csv_path)!r} is not a readable CSV: {exc}") from None
    missing = [c for c in ("sha256", "file_identifier", path_column) if c not in table.columns]
    if missing:
        raise ConfigError(
            f"{csv_path}: missing required column(s) {', '.join(missing)} "
            f"(has {', '.join(map(str, table.columns))}; the path column is set by source.path_column)"
        )
    table["sha256"] = table["sha256"].str.strip().str.lower()
    bad_keys = ~table["sha256"].str.fullmatch(r"[0-9a-f]{64}", na=False)
    if bad_keys.any():
        first = table.loc[bad_keys].index[0] + 2  # 1-based, after the header line
        raise ConfigError(f"{csv_path}: {int(bad_keys.sum())} row(s) without a valid sha256, first on line {first}")
    if "aesthetic_score" not in table.columns:
        table["aesthetic_score"] = float("nan")
    if "captions" not in table.columns:
        table["captions"] = "[]"
    table["captions"] = table["captions"].fillna("[]")

    cache = _previous_hashes(previous_manifest, out_dir) if verify_sha256 else {}
    rows = []
    for record in table.to_dict("records"):
        raw_path = record[path_column]
        path = Path(raw_path) if isinstance(raw_path, str) else None
        if path is not None and not path.is_absolute():
            path = csv_path.parent / path
        size = mtime_ns = -1
        problem = ""
        if path is None:
            problem = f"no file path in column {path_column!r}"
        elif not path.is_file():
            problem = f"source file {str(path)!r} does not exist"
        else:
            try:
                if verify_sha256:
                    actual, size, mtime_ns = _hash_with_cache(path, cache)
                    if actual != record["sha256"]:
                        problem = f"sha256 of {str(path)!r} is {actual}, not the listed one"
                else:
                    st = path.stat()
                    size, mtime_ns = st.st_size, st.st_mtime_ns
            except OSError as exc:
                problem = f"source file {str(path)!r} is unreadable: {exc.strerror or exc}"
            if not problem and path.suffix.lower() not in ASSET_EXTENSIONS:
                problem = f"unsupported file type {path.suffix!r} ({path.name})"
        local_path = "" if path is None else Path(os.path.relpath(path.absolute(), out_dir)).as_posix()
        rows.append(
            {
                "sha256": record["sha256"],
                "file_identifier": record["file_identifier"],
                "aesthetic_score": record["aesthetic_score"],
                "captions": captions_json(record["captions"]),
                "local_path": local_path,
                "size": size,
                "mtime_ns": mtime_ns,
                "subset": "",
                "source_ref": "",
                "problem": problem,
            }
        )
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS + ["problem"])


def filter_assets(manifest: pd.DataFrame, source: SourceConfig) -> pd.DataFrame:
    """Apply the `min_aesthetic_score` and `instances` filters; drop repeated sha256s."""
    n = len(manifest)
    manifest = manifest.drop_duplicates("sha256", keep="first")
    if len(manifest) < n:
        logger.info("%d file(s) repeat another file's bytes and were merged into one asset", n - len(manifest))
    if source.min_aesthetic_score is not None:
        keep = manifest["aesthetic_score"] >= source.min_aesthetic_score
        logger.info(
            "min_aesthetic_score %.2f keeps %d of %d assets (an empty score never passes)",
            source.min_aesthetic_score,
            int(keep.sum()),
            len(manifest),
        )
        manifest = manifest[keep]
    if source.instances is not None:
        wanted = set(source.instances)
        keep = manifest["sha256"].isin(wanted) | manifest["file_identifier"].isin(wanted)
        logger.info("instances list keeps %d of %d assets", int(keep.sum()), len(manifest))
        manifest = manifest[keep]
    return manifest


def build_manifest(
    source: SourceConfig,
    out_dir: str | os.PathLike,
    manifest_path: str | os.PathLike,
    log_path: str = "",
    subset_csvs: dict[str, str] | None = None,
    object_paths: str | None = None,
    download: dict | None = None,
) -> pd.DataFrame:
    """Scan the source, filter it, quarantine unusable rows, and write the manifest atomically.

    Args:
        subset_csvs, object_paths: trellis500k only; each subset's CSV (subset -> path) and
            allenai/objaverse's object-paths.json.gz, as the download rules fetched them.
        download: trellis500k only; the config's `download:` section.

    Returns:
        The manifest as written (assets with a problem included, so metadata shows them).
    """
    from slatflow.io import atomic_path

    previous = manifest_path if Path(manifest_path).is_file() else None
    if source.type == "local":
        manifest = scan_local_folder(source.path, out_dir, previous)
        manifest["problem"] = ""
    elif source.type == "csv":
        manifest = read_csv_source(source.path, out_dir, source.path_column, source.verify_sha256, previous)
    else:
        from slatflow import trellis500k

        manifest = trellis500k.trellis500k_manifest(subset_csvs or {}, out_dir, object_paths)
    manifest = filter_assets(manifest, source)
    if manifest.empty:
        raise ConfigError(f"no assets left from {source.path or ', '.join(source.subsets)!r} after the filters")
    if source.type == "trellis500k":
        settings = trellis500k.DownloadSettings.from_config(download or {})
        trellis500k.check_user_archives(set(manifest["subset"]), settings, out_dir)
        trellis500k.check_hssd_token(manifest, out_dir)
    for sha, problem in manifest[["sha256", "problem"]].itertuples(index=False):
        if problem:
            record_failure(out_dir, STAGE, sha, problem, log_path)
            logger.error("asset %s: %s", sha, problem)
        else:
            clear_failure(out_dir, STAGE, sha)
    manifest = manifest[MANIFEST_COLUMNS].sort_values("sha256")
    with atomic_path(manifest_path) as tmp:
        manifest.to_csv(tmp, index=False)
    logger.info("manifest: %d assets from %s source %s", len(manifest), source.type, source.path or source.subsets)
    return manifest


def in_shard(sha256: str, index: int, count: int) -> bool:
    """Stable hash partition: the sha256 is already uniform, so its leading bits decide."""
    return int(sha256[:15], 16) % count == index


def parse_shard(shard: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n."""
    try:
        index, count = (int(x) for x in shard.split("/"))
    except ValueError:
        raise ConfigError(f"shard {shard!r} is not of the form i/n (e.g. 0/4)") from None
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"shard {shard!r}: need 0 <= i < n")
    return index, count


def select_assets(
    manifest_path: str | os.PathLike, out_dir: str | os.PathLike, shard: str = "0/1", retry_failed: bool = False
) -> list[str]:
    """The sha256s one invocation works on: its shard, less the quarantined assets.

    Assets quarantined by ingest itself (missing or wrong source files) stay out even with
    `retry_failed`: ingest re-checks them on every run that sees a changed source.
    """
    from slatflow.quarantine import quarantined_sha256s

    index, count = parse_shard(shard)
    sha256s = pd.read_csv(manifest_path, usecols=["sha256"], dtype=str)["sha256"]
    selected = [sha for sha in sha256s if in_shard(sha, index, count)]
    excluded = quarantined_sha256s(out_dir, only=[STAGE] if retry_failed else None)
    return [sha for sha in selected if sha not in excluded]


def source_paths(manifest_path: str | os.PathLike) -> dict[str, str]:
    """sha256 -> local_path (relative to OUT) for every asset of the manifest."""
    table = pd.read_csv(manifest_path, usecols=["sha256", "local_path"], dtype=str)
    return dict(zip(table["sha256"], table["local_path"]))
