"""Snakemake adapter: DINOv2 features of one asset's renders, averaged onto its voxels."""

from pathlib import Path

from slatflow.features import FeatureJob, FeatureSettings, extract_feature_files
from slatflow.workflow import run_asset_job

run_asset_job(
    snakemake,
    "features",
    lambda: extract_feature_files(
        [
            FeatureJob(
                snakemake.wildcards.sha256,
                Path(snakemake.input.transforms).parent,
                Path(snakemake.input.voxels),
                Path(snakemake.output[0]),
            )
        ],
        FeatureSettings.from_config(snakemake.config["features"], threads=snakemake.threads),
    ),
)
