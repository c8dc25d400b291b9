"""Snakemake adapter: OUT/report/quality_report.html from the files on disk (slatflow.report)."""

from slatflow.logs import configure_job_logging
from slatflow.metadata import ModelNames, build_metadata
from slatflow.report import write_report

configure_job_logging(snakemake.log[0])
out_dir = snakemake.config["output_dir"]
# the table is derived afresh: metadata.csv may predate this run's quality records
metadata = build_metadata(out_dir, snakemake.input.manifest, ModelNames.from_config(snakemake.config))
write_report(
    snakemake.output[0],
    out_dir,
    metadata=metadata,
    num_previews=snakemake.config["quality"]["num_previews"],
    voxel_resolution=snakemake.config["voxelize"]["resolution"],
)
