"""metadata.csv and statistics.txt, derived from the manifest and the files on disk.

TRELLIS rebuilds its metadata by hand from per-rank CSVs that a killed run loses;
slatflow never stores state anywhere but in the outputs themselves, so this table can
be rebuilt at any time and always tells the truth about OUT.

Columns: TRELLIS's (`sha256` index, `file_identifier`, `aesthetic_score`, `captions`,
`local_path`, `rendered`, `voxelized`, `num_voxels`, `cond_rendered`, `feature_<feat>`,
`ss_latent_<ss_enc>`, `latent_<feat>_<slat_enc>`), then the columns stages register in
`COLUMN_SOURCES`, then the failure columns `failed_stage`, `failed_reason`, `failed_log`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd

from slatflow.io import STAGE_OF_FOLDER, atomic_path, write_text_atomic
from slatflow.manifest import SOURCE_COLUMNS
from slatflow.models.names import latent_folder_names
from slatflow.quarantine import load_failures
from slatflow.stages import FEATURES, SLAT_LATENT, SS_LATENT, STAGES

logger = logging.getLogger(__name__)

MAX_TRAINING_VOXELS = 32768  # TRELLIS's training filter on num_voxels
FAILURE_COLUMNS = ["failed_stage", "failed_reason", "failed_log"]


@dataclass(frozen=True)
class ModelNames:
    """The configured model names: their columns exist even before any output does."""

    features: tuple[str, ...] = ()
    ss_latents: tuple[str, ...] = ()
    latents: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, config: dict) -> "ModelNames":
        """The output folder names the config's stages write under (absent stages: none)."""
        features = feature_folder_name(config["features"]) if "features" in config else None
        ss_name, slat_name = latent_folder_names(config["latents"]) if "latents" in config else (None, None)
        return cls(
            features=(features,) if features else (),
            ss_latents=(ss_name,) if ss_name else (),
            latents=(f"{features}_{slat_name}",) if features and slat_name else (),
        )


def _names_with_suffix(folder: Path, suffix: str) -> set[str]:
    """Entry names in `folder` ending in `suffix`, without it (one scandir, no stat calls)."""
    if not folder.is_dir():
        return set()
    return {e.name[: -len(suffix)] for e in os.scandir(folder) if e.name.endswith(suffix)}


def _subfolders(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _complete_render_dirs(folder: Path) -> set[str]:
    """Render folders holding transforms.json (written last, so it means complete)."""
    return {name for name in _subfolders(folder) if (folder / name / "transforms.json").is_file()}


_PLY_VERTEX_COUNT = re.compile(rb"element vertex (\d+)")


def ply_vertex_count(path: str | os.PathLike) -> int:
    """The vertex count in a PLY header, without reading the body."""
    with open(path, "rb") as f:
        header = f.read(1024)
    match = _PLY_VERTEX_COUNT.search(header.split(b"end_header")[0])
    if match is None:
        raise ValueError(f"{path}: no 'element vertex' line in the PLY header")
    return int(match.group(1))


def _flag(index: pd.Index, present: Iterable[str]) -> pd.Series:
    return pd.Series(index.isin(list(present)), index=index)


def stage_columns(out_dir: Path, index: pd.Index, models: ModelNames) -> pd.DataFrame:
    """TRELLIS's per-stage columns for the assets in `index`."""
    columns: dict[str, pd.Series] = {}
    columns["rendered"] = _flag(index, _complete_render_dirs(out_dir / "renders"))
    voxelized = _names_with_suffix(out_dir / "voxels", ".ply") & set(index)
    num_voxels = pd.Series(pd.NA, index=index, dtype="Int64")
    for sha in sorted(voxelized):
        try:
            num_voxels[sha] = ply_vertex_count(out_dir / "voxels" / f"{sha}.ply")
        except (OSError, ValueError) as exc:
            logger.warning("asset %s: unreadable voxel file, voxelized is False: %s", sha, exc)
            voxelized.discard(sha)
    columns["voxelized"] = _flag(index, voxelized)
    columns["num_voxels"] = num_voxels
    columns["cond_rendered"] = _flag(index, _complete_render_dirs(out_dir / "renders_cond"))
    for stage, configured in ((FEATURES, models.features), (SS_LATENT, models.ss_latents), (SLAT_LATENT, models.latents)):
        (prefix,), folder = stage.columns, stage.folder
        for name in sorted(set(configured) | set(_subfolders(out_dir / folder))):
            columns[f"{prefix}_{name}"] = _flag(index, _names_with_suffix(out_dir / folder / name, ".npz"))
    return pd.DataFrame(columns, index=index)


# Pipeline order: an asset that failed in several stages shows the earliest (the cause).
STAGE_ORDER = [stage.name for stage in STAGES]


def failure_columns(out_dir: Path, index: pd.Index) -> pd.DataFrame:
    """Each asset's failure record of its earliest stage, if it has any."""
    frame = pd.DataFrame(index=index, columns=FAILURE_COLUMNS, dtype=object)
    rank = {stage: i for i, stage in enumerate(STAGE_ORDER)}
    for failure in sorted(load_failures(out_dir), key=lambda f: rank.get(f.stage, len(rank))):
        if failure.sha256 in frame.index and pd.isna(frame.at[failure.sha256, "failed_stage"]):
            frame.loc[failure.sha256] = [failure.stage, failure.reason, failure.log]
    return frame


def feature_folder_name(section: dict) -> str:
    """features/<name>/ of a config's `features:` section (the model plus setting suffixes)."""
    from slatflow.feature_settings import FeatureSettings

    return FeatureSettings.from_config(section).feature_name


def feature_weight_columns(out_dir: Path, index: pd.Index) -> pd.DataFrame:
    """`feature_<name>_random_weights`: the asset's features of that folder were made with
    random weights (from the folder's provenance.json; NA where the asset has none)."""
    from slatflow.feature_settings import read_random_weights_flags

    columns = {}
    for name, random_weights in sorted(read_random_weights_flags(out_dir / "features").items()):
        present = _names_with_suffix(out_dir / "features" / name, ".npz")
        column = pd.Series(pd.NA, index=index, dtype="boolean")
        column[index.isin(present)] = random_weights
        columns[f"feature_{name}_random_weights"] = column
    return pd.DataFrame(columns, index=index)


# Extra per-asset columns, one function per stage that has them: (OUT, sha256 index) ->
# a frame indexed like it. A stage adds its function here (e.g. quality metrics).
COLUMN_SOURCES: list[Callable[[Path, pd.Index], pd.DataFrame]] = []
COLUMN_SOURCES.append(feature_weight_columns)


def quality_metric_columns(out_dir: Path, index: pd.Index) -> pd.DataFrame:
    """The quality stage's metrics and `suspicious` reasons, from OUT/quality/*.json."""
    from slatflow.quality import quality_columns

    return quality_columns(out_dir, index)


COLUMN_SOURCES.append(quality_metric_columns)


def build_metadata(out_dir: str | os.PathLike, manifest_path: str | os.PathLike, models: ModelNames) -> pd.DataFrame:
    """metadata.csv's table, indexed by sha256, from the manifest and OUT's files."""
    out_dir = Path(out_dir)
    manifest = pd.read_csv(manifest_path, dtype={"sha256": str}, keep_default_na=True)
    manifest = manifest.set_index("sha256")
    table = manifest[SOURCE_COLUMNS[1:] + ["local_path"]].copy()
    # as TRELLIS: local_path only for assets whose file is there (downloads may be pending)
    present = [isinstance(p, str) and (out_dir / p).is_file() for p in table["local_path"]]
    table["local_path"] = table["local_path"].where(present)
    parts = [table, stage_columns(out_dir, table.index, models)]
    parts += [source(out_dir, table.index) for source in COLUMN_SOURCES]
    parts.append(failure_columns(out_dir, table.index))
    return pd.concat(parts, axis=1).rename_axis("sha256")


def format_statistics(metadata: pd.DataFrame) -> str:
    """statistics.txt: counts per stage, voxel-count summary, failures per stage."""
    lines = ["slatflow statistics (derived from the files on disk)", f"assets: {len(metadata)}"]
    flag_columns = [c for c in metadata.columns if metadata[c].dtype == bool]
    for column in flag_columns:
        lines.append(f"{column}: {int(metadata[column].sum())}")
    voxels = metadata["num_voxels"].dropna().astype(np.int64)
    if len(voxels):
        lines.append(
            f"num_voxels: min {voxels.min()}, median {int(voxels.median())}, max {voxels.max()}; "
            f"{int((voxels > MAX_TRAINING_VOXELS).sum())} above TRELLIS's training cap {MAX_TRAINING_VOXELS}"
        )
    failed = metadata["failed_stage"].dropna()
    lines.append(f"failed: {len(failed)}")
    for stage, count in failed.value_counts().sort_index().items():
        lines.append(f"  {stage}: {count}")
    return "\n".join(lines) + "\n"


def write_metadata(
    out_dir: str | os.PathLike,
    manifest_path: str | os.PathLike,
    metadata_path: str | os.PathLike,
    statistics_path: str | os.PathLike,
    models: ModelNames,
) -> pd.DataFrame:
    """Build the table and write metadata.csv and statistics.txt, each atomically."""
    refresh_output_state(out_dir)  # the state this table shows (see refresh_output_state)
    metadata = build_metadata(out_dir, manifest_path, models)
    with atomic_path(metadata_path) as tmp:
        metadata.to_csv(tmp)
    write_text_atomic(statistics_path, format_statistics(metadata))
    logger.info("metadata.csv: %d assets, %d columns", len(metadata), metadata.shape[1] + 1)
    return metadata


OUTPUT_STATE = "logs/metadata_aggregate.state"
_NESTED_FOLDERS = ("features", "ss_latents", "latents", "failed")  # a subfolder per model or stage


def output_state(out_dir: str | os.PathLike) -> str:
    """A digest of the entry names in every folder metadata.csv is derived from (no stat calls:
    one scandir per folder)."""
    out_dir = Path(out_dir)
    digest = hashlib.sha256()
    folders = [out_dir / name for name in STAGE_OF_FOLDER if name not in _NESTED_FOLDERS]
    for name in _NESTED_FOLDERS:
        folders += [out_dir / name / sub for sub in _subfolders(out_dir / name)]
    for folder in sorted(folders):
        names = sorted(e.name for e in os.scandir(folder) if not e.name.startswith(".")) if folder.is_dir() else []
        digest.update(f"{folder.relative_to(out_dir)}\0{len(names)}\0".encode())
        digest.update("\0".join(names).encode())
    return digest.hexdigest()


def refresh_output_state(out_dir: str | os.PathLike) -> Path:
    """Write OUT/logs/metadata_aggregate.state when the outputs on disk changed; return its path.

    It is an input of metadata.csv, rewritten only on a change, and by the metadata job itself
    just before it reads the disk: so a deleted folder (renders removed to save space, which
    re-runs no stage) still makes the next run rebuild metadata.csv, and a finished run leaves
    the next one nothing to do. A dry-run writes it too (a record of the state, not an output).
    """
    path = Path(out_dir) / OUTPUT_STATE
    state = output_state(out_dir) + "\n"
    try:
        unchanged = path.read_text() == state
    except OSError:
        unchanged = False
    if not unchanged:
        write_text_atomic(path, state)
    return path
