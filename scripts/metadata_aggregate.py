"""Snakemake adapter: derive OUT/metadata.csv and statistics.txt from the files on disk."""

from slatflow.logs import configure_job_logging
from slatflow.metadata import ModelNames, write_metadata

configure_job_logging(snakemake.log[0])
write_metadata(
    snakemake.config["output_dir"],
    snakemake.input.manifest,
    snakemake.output.metadata,
    snakemake.output.statistics,
    ModelNames.from_config(snakemake.config),
)
