"""Snakemake adapter: one streaming pass over the ABO archive for this run's ABO assets."""

import sys

from slatflow.download import run_abo_archive_pass
from slatflow.errors import DownloadError
from slatflow.logs import configure_job_logging
from slatflow.trellis500k import AssetSource, DownloadSettings

configure_job_logging(snakemake.log[0])
try:
    run_abo_archive_pass(
        [AssetSource(**source) for source in snakemake.params.sources],
        DownloadSettings.from_config(snakemake.config["download"]),
        snakemake.config["output_dir"],
        snakemake.output[0],
    )
except DownloadError as exc:  # the archive itself: every ABO asset waits for the next run
    sys.exit(f"slatflow: ABO archive pass: {exc} (log: {snakemake.log[0]})")
