"""Snakemake adapter: build OUT/manifest.csv from the configured source."""

import sys

from slatflow.errors import ConfigError
from slatflow.ingest import SourceConfig, build_manifest
from slatflow.logs import configure_job_logging

configure_job_logging(snakemake.log[0])
source = SourceConfig.from_config(snakemake.config["source"])
try:
    build_manifest(
        source,
        snakemake.config["output_dir"],
        snakemake.output.manifest,
        snakemake.log[0],
        subset_csvs=dict(zip(source.subsets, snakemake.input.get("subset_csvs", []))),
        object_paths=snakemake.input.get("object_paths"),
        download=snakemake.config["download"],
    )
except ConfigError as exc:
    sys.exit(f"slatflow: {exc}")
