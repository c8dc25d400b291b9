"""Snakemake adapter: build OUT/manifest.csv from the configured source."""

import sys

from slatflow.errors import ConfigError
from slatflow.ingest import SourceConfig, build_manifest
from slatflow.logs import configure_job_logging

configure_job_logging(snakemake.log[0])
try:
    build_manifest(
        SourceConfig.from_config(snakemake.config["source"]),
        snakemake.config["output_dir"],
        snakemake.output.manifest,
        snakemake.log[0],
    )
except ConfigError as exc:
    sys.exit(f"slatflow: {exc}")
