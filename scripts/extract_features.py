"""Snakemake adapter: DINOv2 features of one asset's renders, averaged onto its voxels."""

from dataclasses import asdict
from pathlib import Path

from slatflow.feature_settings import FeatureSettings
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
    {
        "sha256": snakemake.wildcards.sha256,
        "render_dir": str(Path(snakemake.input.transforms).parent),
        "voxels": snakemake.input.voxels,
        "output": snakemake.output[0],
    },
)
