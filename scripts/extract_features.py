"""Snakemake adapter: DINOv2 features of one asset's renders, averaged onto its voxels."""

from dataclasses import asdict
from pathlib import Path

from slatflow.features import FeatureSettings
from slatflow.worker import WorkerSettings, WorkerSpec, run_request
from slatflow.workflow import run_asset_job

settings = FeatureSettings.from_config(snakemake.config["features"], threads=snakemake.threads)
request = {
    "sha256": snakemake.wildcards.sha256,
    "render_dir": str(Path(snakemake.input.transforms).parent),
    "voxels": snakemake.input.voxels,
    "output": snakemake.output[0],
}
run_asset_job(
    snakemake,
    "features",
    lambda: run_request(
        WorkerSpec("features", asdict(settings)),
        request,
        WorkerSettings.from_config(snakemake.config["workers"]),
        Path(snakemake.config["output_dir"]) / "logs" / "workers",
    ),
)
