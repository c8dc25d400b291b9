"""Snakemake adapter: write latents/<name>/stats.json from the run's structured latents."""

import sys

from slatflow.errors import AssetError
from slatflow.latents import latent_stats_job
from slatflow.logs import configure_job_logging

configure_job_logging(snakemake.log[0])
try:
    latent_stats_job(snakemake.input, snakemake.output[0], snakemake.config["output_dir"], snakemake.log[0])
except AssetError as exc:
    sys.exit(f"slatflow: {exc} (quarantined; the next run leaves it out)")
