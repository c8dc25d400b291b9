"""Snakemake adapter: encode one asset's voxels into its sparse-structure latent."""

from functools import partial
from pathlib import Path

from slatflow.latents import LatentJob, run_latent_job
from slatflow.workflow import run_model_job

run_model_job(
    snakemake,
    "ss_latent",
    {"latents": snakemake.config["latents"], "threads": snakemake.threads},
    LatentJob(snakemake.wildcards.sha256, Path(snakemake.input[0]), Path(snakemake.output[0])),
    partial(run_latent_job, "ss"),
)
