"""The stage table: every stage of the workflow declared once.

A stage has several names, and each part of slatflow knows it by one of them: the command
line by its target (`voxels`), Snakemake by its rules (`voxelize_mesh`), the quarantine by
its stage name (`OUT/failed/voxelize/`), metadata.csv by its column (`voxelized`), the
model workers by their service. The registries of those parts (the rule files' stage
targets, metadata's stage order, the report's counts, the worker services, the stage names
in errors) read them from this table; `tests/test_stages.py` checks it against the rule
files, so a rule nobody declared, or a declared rule that is gone, fails a test.

This module imports nothing of slatflow: every floor may read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class Stage:
    """One stage of the workflow.

    Attributes:
        name: the quarantine stage (`OUT/failed/<name>/`, `failed_stage` in metadata.csv).
        target: the command-line target of its per-asset outputs; None for a stage that
            has none (ingest, metadata).
        rules: the rules that make its outputs, as `rules/*.smk` names them (the raster
            engine's render rules add RASTER_RULE_SUFFIX to theirs).
        folder: its output folder under OUT; None when it writes none of its own.
        suffix: what follows `<sha256>` in an output's path (`/transforms.json` for a folder
            per asset); None when its output is not per asset.
        per_model: the folder holds a subfolder per model (`features/<model>/`).
        columns: its metadata.csv columns; for a per-model stage the column prefix, as
            `<prefix>_<model>` (`feature_dinov2_vitl14_reg`).
        service: (worker service, "module:function" of its handler) when its jobs hand
            assets to a worker (slatflow.worker).
        upstream: the stages whose outputs its target is built from (stage names).
        in_all: part of the `all` target.
        enabled_by: a config switch (dotted keys) that, when false, leaves it out of `all`.
    """

    name: str
    target: str | None
    rules: tuple[str, ...]
    folder: str | None = None
    suffix: str | None = None
    per_model: bool = False
    columns: tuple[str, ...] = ()
    service: tuple[str, str] | None = None
    upstream: tuple[str, ...] = ()
    in_all: bool = True
    enabled_by: str | None = None

    def in_all_for(self, config: dict) -> bool:
        """Whether `all` includes this stage under `config` (its switch, if it has one)."""
        if not self.in_all:
            return False
        if self.enabled_by is None:
            return True
        value = config
        for key in self.enabled_by.split("."):
            value = value[key]
        return bool(value)


# The raster engine's render rules are named apart (`render_views_raster`), so a SLURM profile
# can send them to GPUs (profiles/slurm).
RASTER_RULE_SUFFIX = "_raster"

INGEST = Stage("ingest", None, ("ingest_manifest",))
DOWNLOAD = Stage(
    "download",
    "downloads",
    ("download_subset_csv", "download_object_paths", "download_asset"),
    folder="raw",
)
RENDER = Stage(
    "render",
    "renders",
    ("render_views",),
    folder="renders",
    suffix="/transforms.json",  # written last: the folder is complete
    columns=("rendered",),
    service=("raster", "slatflow.raster:worker_service"),  # the raster engine's GL context
    upstream=("download",),
)
RENDER_COND = Stage(
    "render_cond",
    "renders_cond",
    ("render_cond",),
    folder="renders_cond",
    suffix="/transforms.json",
    columns=("cond_rendered",),
    upstream=("download",),
    in_all=False,  # TRELLIS's image-conditioned training only
)
VOXELIZE = Stage(
    "voxelize",
    "voxels",
    ("voxelize_mesh",),
    folder="voxels",
    suffix=".ply",
    columns=("voxelized", "num_voxels"),
    upstream=("render",),
)
FEATURES = Stage(
    "features",
    "features",
    ("extract_features",),
    folder="features",
    suffix=".npz",
    per_model=True,
    columns=("feature",),
    service=("features", "slatflow.features:worker_service"),
    upstream=("render", "voxelize"),
)
SS_LATENT = Stage(
    "ss_latent",
    "ss_latents",
    ("encode_ss_latent",),
    folder="ss_latents",
    suffix=".npz",
    per_model=True,
    columns=("ss_latent",),
    service=("ss_latent", "slatflow.latents:ss_worker_service"),
    upstream=("voxelize",),
)
SLAT_LATENT = Stage(
    "slat_latent",
    "latents",
    ("encode_slat_latent",),
    folder="latents",
    suffix=".npz",
    per_model=True,
    columns=("latent",),
    service=("slat_latent", "slatflow.latents:slat_worker_service"),
    upstream=("features",),
)
LATENT_STATS = Stage(
    "latent_stats",
    "latent_stats",
    ("latent_stats",),
    folder="latents",  # latents/<name>/stats.json, beside the latents it summarizes
    upstream=("slat_latent",),
)
MESHES = Stage(
    "meshes", "meshes", ("extract_mesh",), folder="meshes", suffix=".ply", upstream=("render",)
)
SDF = Stage(
    "sdf",
    "sdf",
    ("sample_sdf",),
    folder="sdf",
    suffix=".npz",
    upstream=("meshes",),
    enabled_by="meshes.sdf.enabled",
)
QUALITY = Stage(
    "quality",
    "quality",
    ("quality_check",),
    folder="quality",
    suffix=".json",
    upstream=("render", "voxelize", "meshes"),
)
# No per-asset files of its own: asking for the report asks for the quality records it shows.
REPORT = Stage("report", "report", ("quality_report",), folder="report", upstream=("quality",), in_all=False)
METADATA = Stage("metadata", "metadata", ("metadata_aggregate",))

# Pipeline order: an asset that failed in several stages shows the earliest (the cause).
STAGES: tuple[Stage, ...] = (
    INGEST,
    DOWNLOAD,
    RENDER,
    RENDER_COND,
    VOXELIZE,
    FEATURES,
    SS_LATENT,
    SLAT_LATENT,
    MESHES,
    SDF,
    QUALITY,
    LATENT_STATS,  # after the per-asset stages: an asset's own failure is the cause to show
    REPORT,
    METADATA,
)
STAGE_BY_NAME = {stage.name: stage for stage in STAGES}
STAGE_BY_TARGET = {stage.target: stage for stage in STAGES if stage.target}
# The workflow's default target, in the Snakefile: every stage's target with in_all.
ALL_TARGET = "all"


def upstream_targets(stage: Stage) -> tuple[str, ...]:
    """The targets `stage`'s target is built from."""
    return tuple(STAGE_BY_NAME[name].target for name in stage.upstream if STAGE_BY_NAME[name].target)


def with_upstream(names: Iterable[str]) -> set[str]:
    """The named stages and every stage they are built from, transitively."""
    built: set[str] = set()
    pending = list(names)
    while pending:
        name = pending.pop()
        if name not in built:
            built.add(name)
            pending.extend(STAGE_BY_NAME[name].upstream)
    return built


def workflow_rules() -> set[str]:
    """Every rule the table declares, as the rule files name them, with the default target."""
    return {ALL_TARGET} | {rule for stage in STAGES for rule in stage.rules} | set(STAGE_BY_TARGET)


def stage_of_folder() -> dict[str, str]:
    """Output folder under OUT -> the stage that writes its per-asset files."""
    return {stage.folder: stage.name for stage in STAGES if stage.folder and stage.suffix}


def stage_of_column(column: str) -> str | None:
    """The stage of a metadata.csv column (`voxelized` -> voxelize, `feature_<m>` -> features)."""
    for stage in STAGES:
        if stage.per_model and any(column.startswith(f"{prefix}_") for prefix in stage.columns):
            return stage.name
        if not stage.per_model and column in stage.columns:
            return stage.name
    return None


def worker_services() -> dict[str, str]:
    """Worker service name -> "module:function" of its handler."""
    return dict(stage.service for stage in STAGES if stage.service)


def markdown_table() -> str:
    """The table as the README draws it (a test keeps the two the same)."""

    def output(stage: Stage) -> str:
        if stage.folder is None or stage.suffix is None:
            return ""
        model = "<model>/" if stage.per_model else ""
        return f"`{stage.folder}/{model}<sha256>{stage.suffix}`"

    def columns(stage: Stage) -> str:
        return ", ".join(f"`{c}_<model>`" if stage.per_model else f"`{c}`" for c in stage.columns)

    header = "| stage (quarantine) | target | rules | per-asset file (written last) | metadata.csv | worker | built from |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    for stage in STAGES:
        cells = (
            f"`{stage.name}`",
            f"`{stage.target}`" if stage.target else "",
            ", ".join(f"`{rule}`" for rule in stage.rules),
            output(stage),
            columns(stage),
            f"`{stage.service[0]}`" if stage.service else "",
            ", ".join(f"`{name}`" for name in stage.upstream),
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
