"""TRELLIS-500K: its subset CSVs as slatflow manifests, and where each asset comes from.

The dataset (HF `JeffreyXiang/TRELLIS-500K`) is one CSV per subset: `sha256`,
`file_identifier`, `aesthetic_score`, `captions`. Each subset names its assets its own way:

- ObjaverseXL_sketchfab: `https://sketchfab.com/3d-models/<uid>`; the glb is
  `allenai/objaverse` `glbs/<shard>/<uid>.glb`, the shard from its `object-paths.json.gz`.
- ObjaverseXL_github: `https://github.com/<org>/<repo>/blob/<commit>/<path>`.
- ABO: `<path>` under `3dmodels/original/` of `abo-3dmodels.tar`.
- 3D-FUTURE: `3D-FUTURE-model/<instance>` in `3D-FUTURE-model.zip`; the sha256 is that of
  the instance's `image.jpg` (as TRELLIS keys it), the asset its `raw_model.obj`.
- HSSD: `<path>` in the gated HF dataset `hssd/hssd-models`.
- Toys4k: `<path>` under `toys4k_blend_files/` of `toys4k_blend_files.zip`.

Every asset lands at `raw/<subset>/<sha256>/<name>` under the output root (`local_path`),
its companions (textures, .mtl, .bin) beside it; slatflow.download fetches it.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

import pandas as pd

from slatflow.errors import ConfigError
from slatflow.manifest import MANIFEST_COLUMNS, captions_json

logger = logging.getLogger(__name__)

SKETCHFAB = "ObjaverseXL_sketchfab"
GITHUB = "ObjaverseXL_github"
ABO = "ABO"
FUTURE = "3D-FUTURE"
HSSD = "HSSD"
TOYS4K = "Toys4k"
SUBSETS = (SKETCHFAB, GITHUB, ABO, FUTURE, HSSD, TOYS4K)
# Subsets fetched over HTTP from the HF hub, and the archive subsets the user provides.
HF_SUBSETS = (SKETCHFAB, HSSD)
USER_ARCHIVES = {
    FUTURE: ("3D-FUTURE-model.zip", "https://tianchi.aliyun.com/specials/promotion/alibaba-3d-future"),
    TOYS4K: ("toys4k_blend_files.zip", "https://github.com/rehg-lab/lowshot-shapebias/tree/main/toys4k"),
}
ABO_MEMBER_PREFIX = "3dmodels/original/"
TOYS4K_MEMBER_PREFIX = "toys4k_blend_files/"
FUTURE_ASSET_FILE = "raw_model.obj"
FUTURE_KEY_FILE = "image.jpg"
OBJECT_PATHS_FILE = "object-paths.json.gz"


@dataclass(frozen=True)
class DownloadSettings:
    """The `download:` section of the config: where each subset's files come from."""

    hf_endpoint: str = "https://huggingface.co"
    csv_repo: str = "JeffreyXiang/TRELLIS-500K"
    csv_revision: str = "main"
    objaverse_repo: str = "allenai/objaverse"
    hssd_repo: str = "hssd/hssd-models"
    github_url: str = "https://github.com"
    abo_archive: str = "https://amazon-berkeley-objects.s3.amazonaws.com/archives/abo-3dmodels.tar"
    future_archive: str = ""
    toys4k_archive: str = ""
    timeout_s: float = 60.0
    attempts: int = 6
    backoff_s: float = 1.0
    git_timeout_s: float = 600.0
    github_companions: bool = True

    @classmethod
    def from_config(cls, section: dict) -> "DownloadSettings":
        endpoint = section.get("hf_endpoint") or os.environ.get("HF_ENDPOINT") or cls.hf_endpoint
        return cls(**{**section, "hf_endpoint": endpoint})

    def hf_file_url(self, repo_id: str, filename: str, revision: str = "main") -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(repo_id, filename, repo_type="dataset", revision=revision, endpoint=self.hf_endpoint)

    def csv_url(self, subset: str) -> str:
        return self.hf_file_url(self.csv_repo, f"{subset}.csv", self.csv_revision)

    def object_paths_url(self) -> str:
        return self.hf_file_url(self.objaverse_repo, OBJECT_PATHS_FILE)

    def archive_path(self, subset: str, out_dir: str | os.PathLike) -> Path:
        """A user-provided archive: the configured path, else OUT/raw/<name> as TRELLIS puts it."""
        configured = {FUTURE: self.future_archive, TOYS4K: self.toys4k_archive}[subset]
        return Path(configured) if configured else Path(out_dir) / "raw" / USER_ARCHIVES[subset][0]


@dataclass(frozen=True)
class AssetSource:
    """Where one asset comes from: enough for slatflow.download to fetch it."""

    sha256: str
    subset: str
    file_identifier: str
    source_ref: str = ""  # sketchfab: the glb's path in allenai/objaverse

    def as_params(self) -> dict:
        return dataclasses.asdict(self)


def sketchfab_uid(file_identifier: str) -> str:
    """`https://sketchfab.com/3d-models/<uid>` (or a slug ending in -<uid>) -> uid."""
    last = urlparse(file_identifier).path.rstrip("/").rsplit("/", 1)[-1]
    return last.rsplit("-", 1)[-1]


def asset_file_name(subset: str, file_identifier: str, source_ref: str = "") -> str:
    """The asset's path below raw/<subset>/<sha256>/ (GitHub keeps the repo's layout, so that
    relative references to companions work)."""
    if subset == SKETCHFAB:
        return PurePosixPath(source_ref).name if source_ref else f"{sketchfab_uid(file_identifier)}.glb"
    if subset == GITHUB:
        from slatflow.git_fetch import parse_github_identifier

        return parse_github_identifier(file_identifier).path
    if subset == FUTURE:
        return FUTURE_ASSET_FILE
    return PurePosixPath(unquote(file_identifier)).name


def local_path(subset: str, sha256: str, file_identifier: str, source_ref: str = "") -> str:
    """The asset's file relative to the output root."""
    return f"raw/{subset}/{sha256}/{asset_file_name(subset, file_identifier, source_ref)}"


def read_subset_csv(path: str | os.PathLike, subset: str) -> pd.DataFrame:
    """One subset's CSV, with its sha256s checked; `subset` added as a column.

    Raises:
        ConfigError: the file is unreadable or lacks `sha256` / `file_identifier`.
    """
    try:
        table = pd.read_csv(path, dtype={"sha256": str, "file_identifier": str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{subset}: {path} is not a readable CSV: {exc}") from None
    missing = [c for c in ("sha256", "file_identifier") if c not in table.columns]
    if missing:
        raise ConfigError(f"{subset}: {path} lacks column(s) {', '.join(missing)} (has {', '.join(map(str, table.columns))})")
    table["sha256"] = table["sha256"].str.strip().str.lower()
    bad = ~table["sha256"].str.fullmatch(r"[0-9a-f]{64}", na=False)
    if bad.any():
        logger.warning("%s: %d row(s) of %s without a valid sha256 left out", subset, int(bad.sum()), path)
        table = table[~bad]
    if "aesthetic_score" not in table.columns:
        table["aesthetic_score"] = float("nan")
    if "captions" not in table.columns:
        table["captions"] = "[]"
    table["subset"] = subset
    return table


def load_object_paths(path: str | os.PathLike) -> dict[str, str]:
    """allenai/objaverse's object-paths.json.gz: uid -> `glbs/<shard>/<uid>.glb`."""
    try:
        with gzip.open(path, "rt") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a readable {OBJECT_PATHS_FILE}: {exc}") from None


def subset_manifest(table: pd.DataFrame, out_dir: str | os.PathLike, object_paths: dict[str, str] | None) -> pd.DataFrame:
    """Manifest rows for one subset's CSV rows: planned local_path, size of what is on disk,
    and the `problem` that keeps a row from being fetched (empty when none)."""

    out_dir = Path(out_dir)
    rows = []
    for record in table.to_dict("records"):
        subset, fid, sha = record["subset"], record["file_identifier"], record["sha256"]
        source_ref, problem = "", ""
        if subset == SKETCHFAB:
            source_ref = (object_paths or {}).get(sketchfab_uid(fid), "")
            if not source_ref:
                problem = f"sketchfab uid {sketchfab_uid(fid)!r} is not in {OBJECT_PATHS_FILE} of allenai/objaverse"
        try:
            path = local_path(subset, sha, fid, source_ref)
        except ValueError as exc:
            path, problem = "", str(exc)
        size = mtime_ns = -1
        if path and (out_dir / path).is_file():
            st = (out_dir / path).stat()
            size, mtime_ns = st.st_size, st.st_mtime_ns
        rows.append(
            {
                "sha256": sha,
                "file_identifier": fid,
                "aesthetic_score": record["aesthetic_score"],
                "captions": captions_json(record["captions"]),
                "local_path": path,
                "size": size,
                "mtime_ns": mtime_ns,
                "subset": subset,
                "source_ref": source_ref,
                "problem": problem,
            }
        )
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS + ["problem"])


def trellis500k_manifest(
    csv_paths: dict[str, str | os.PathLike], out_dir: str | os.PathLike, object_paths_file: str | os.PathLike | None = None
) -> pd.DataFrame:
    """The manifest of the given subsets (subset -> its CSV), in subset order."""
    object_paths = load_object_paths(object_paths_file) if SKETCHFAB in csv_paths and object_paths_file else None
    if SKETCHFAB in csv_paths and object_paths is None:
        raise ConfigError(f"{SKETCHFAB} needs allenai/objaverse's {OBJECT_PATHS_FILE}")
    frames = [subset_manifest(read_subset_csv(path, subset), out_dir, object_paths) for subset, path in csv_paths.items()]
    return pd.concat(frames, ignore_index=True)


def check_user_archives(subsets, settings: DownloadSettings, out_dir: str | os.PathLike) -> None:
    """3D-FUTURE and Toys4k cannot be downloaded: stop with instructions when an archive is absent."""
    for subset in subsets:
        if subset not in USER_ARCHIVES:
            continue
        path = settings.archive_path(subset, out_dir)
        if not path.is_file():
            name, site = USER_ARCHIVES[subset]
            key = "future_archive" if subset == FUTURE else "toys4k_archive"
            raise ConfigError(
                f"{subset} is downloaded by hand: get {name} from {site} (its licence needs a sign-up), "
                f"then put it at {path} or set download.{key} to its path"
            )


def hf_token() -> str | None:
    """The HF token from HF_TOKEN or `hf auth login` (huggingface_hub's lookup)."""
    from huggingface_hub import get_token

    return get_token()


def hf_headers() -> dict[str, str]:
    token = hf_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def check_hssd_token(manifest: pd.DataFrame, out_dir: str | os.PathLike) -> None:
    """HSSD is gated: without a token, stop before any job when HSSD files are still missing."""
    hssd = manifest[manifest["subset"] == HSSD]
    if hssd.empty or hf_token():
        return
    missing = [p for p in hssd["local_path"] if p and not (Path(out_dir) / p).is_file()]
    if missing:
        raise ConfigError(
            f"{len(missing)} HSSD asset(s) to download, and no Hugging Face token: accept the terms at "
            "https://huggingface.co/datasets/hssd/hssd-models, then `export HF_TOKEN=hf_...` (or `hf auth login`)"
        )


def asset_sources(manifest_path: str | os.PathLike) -> dict[str, AssetSource]:
    """sha256 -> AssetSource for the manifest's TRELLIS-500K assets (none for other sources)."""
    table = pd.read_csv(manifest_path, dtype=str, keep_default_na=False)
    if "subset" not in table.columns:
        return {}
    table = table[table["subset"] != ""]
    return {
        sha: AssetSource(sha, subset, fid, ref)
        for sha, subset, fid, ref in table[["sha256", "subset", "file_identifier", "source_ref"]].itertuples(index=False)
    }
