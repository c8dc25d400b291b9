"""Config validation with one line per error, before any job starts.

Snakemake's `validate` prints the whole schema on an error; users need to see which key
is wrong and why. This checks first with jsonschema (one line per error, with the key's
path), then lets Snakemake's `validate` fill in the defaults.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from slatflow.errors import ConfigError
from slatflow.ingest import parse_shard


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
