"""Config validation with one line per error, before any job starts.

Snakemake's `validate` prints the whole schema on an error; users need to see which key
is wrong and why. This checks first with jsonschema (one line per error, with the key's
path), then lets Snakemake's `validate` fill in the defaults.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import yaml

from slatflow.errors import ConfigError
from slatflow.grid import MAX_UINT8_RESOLUTION, TRELLIS_RESOLUTION
from slatflow.ingest import parse_shard
from slatflow.stages import ALL_TARGET, STAGE_BY_TARGET, STAGES, with_upstream


def _key_path(error) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "(top level)"


def config_errors(config: dict, schema: dict) -> list[str]:
    """One line per schema violation: `key.path: what is wrong`."""
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(schema)
    lines = []
    for error in sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path))):
        message = error.message
        if error.validator == "oneOf":
            message = f"{error.instance!r} is not one of the accepted forms ({error.schema.get('description', '')})"
        lines.append(f"{_key_path(error)}: {message}")
    return lines


def check_config(config: dict, schema_path: str | os.PathLike) -> None:
    """Raise ConfigError listing every problem of `config`, one per line.

    Beyond the schema: the shard must be i/n with i < n, and the source path must exist.
    """
    schema = yaml.safe_load(Path(schema_path).read_text())
    problems = config_errors(config, schema)
    shard = config.get("shard", "0/1")
    if isinstance(shard, str):
        try:
            parse_shard(shard)
        except ConfigError as exc:
            problems.append(f"shard: {exc}")
    source = config.get("source")
    if isinstance(source, dict) and isinstance(source.get("path"), str) and source.get("type") != "trellis500k":
        path = Path(source["path"])
        if source.get("type", "local") == "local" and not path.is_dir():
            problems.append(f"source.path: {str(path)!r} is not a folder (source.type is local)")
        elif source.get("type") == "csv" and not path.is_file():
            problems.append(f"source.path: {str(path)!r} is not a file (source.type is csv)")
    if isinstance(source, dict) and source.get("type") == "trellis500k" and source.get("csv_dir"):
        folder = Path(source["csv_dir"])
        for subset in source.get("subsets") or []:
            if not (folder / f"{subset}.csv").is_file():
                problems.append(f"source.csv_dir: {str(folder)!r} has no {subset}.csv (leave csv_dir empty to download it)")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


# The stages that read the voxel grid in a form that limits it: TRELLIS's released encoders
# read 64^3 only; the features' `indices` and the SLat latents' `coords` are uint8.
_TRELLIS_GRID_STAGES = ("ss_latent", "slat_latent", "latent_stats")
_UINT8_INDEX_STAGES = ("features", "slat_latent", "latent_stats")


def built_stages(config: dict, targets: Iterable[str]) -> set[str]:
    """The stages a run of these command-line targets builds (`all`'s when it names none),
    with every stage they are built from."""
    named = set(targets)
    if not named or ALL_TARGET in named:
        return with_upstream(stage.name for stage in STAGES if stage.target and stage.in_all_for(config))
    return with_upstream(STAGE_BY_TARGET[name].name for name in named if name in STAGE_BY_TARGET)


def check_voxel_grid(config: dict, targets: Iterable[str]) -> None:
    """Raise ConfigError (one line) when the run's stages cannot use `voxelize.resolution`.

    Asked once the targets are known (Snakemake has them when it builds the DAG, not when
    it parses the workflow), before any job: a voxels, features or meshes run may use
    another grid; the latent stages may not.
    """
    resolution = config["voxelize"]["resolution"]
    built = built_stages(config, targets)
    if resolution > MAX_UINT8_RESOLUTION and built.intersection(_UINT8_INDEX_STAGES):
        stages = ", ".join(s for s in _UINT8_INDEX_STAGES if s in built)
        raise ConfigError(f"voxelize.resolution: {resolution}, but the {stages} stage(s) store voxel indices as uint8 "
                          f"(a grid of at most {MAX_UINT8_RESOLUTION})")
    if resolution != TRELLIS_RESOLUTION and built.intersection(_TRELLIS_GRID_STAGES):
        stages = ", ".join(s for s in _TRELLIS_GRID_STAGES if s in built)
        raise ConfigError(f"voxelize.resolution: {resolution}, but the {stages} stage(s) need TRELLIS's "
                          f"{TRELLIS_RESOLUTION}^3 grid (its released encoders read no other); set "
                          f"{TRELLIS_RESOLUTION}, or ask only for targets before them (voxels, features, meshes, quality)")
