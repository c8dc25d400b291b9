"""Snakemake adapter: DINOv2 features of one asset's renders, averaged onto its voxels."""

from dataclasses import asdict
from pathlib import Path

from slatflow.feature_settings import FeatureSettings
from slatflow.features import FeatureJob
from slatflow.workflow import run_model_job

run_model_job(
    snakemake,
    "features",
    asdict(
        FeatureSettings.from_config(
            snakemake.config["features"],
            threads=snakemake.threads,
            voxel_resolution=snakemake.config["voxelize"]["resolution"],
        )
    ),
    FeatureJob(
        snakemake.wildcards.sha256,
        Path(snakemake.input.transforms).parent,
        Path(snakemake.input.voxels),
        Path(snakemake.output[0]),
    ),
)
