"""Snakemake adapter: one file with no listed hash (a subset CSV, object paths) over HTTP."""

import sys

from slatflow.download import fetch_file
from slatflow.errors import ConfigError
from slatflow.logs import configure_job_logging
from slatflow.trellis500k import DownloadSettings

configure_job_logging(snakemake.log[0])
try:
    fetch_file(
        snakemake.params.url,
        snakemake.output[0],
        DownloadSettings.from_config(snakemake.config["download"]),
        snakemake.rule,
    )
except ConfigError as exc:
    sys.exit(f"slatflow: {exc} (log: {snakemake.log[0]})")
