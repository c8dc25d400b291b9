"""Snakemake adapter: encode one asset's voxel features into its structured latent."""

from slatflow.workflow import run_model_job

run_model_job(
    snakemake,
    "slat_latent",
    {"latents": snakemake.config["latents"], "threads": snakemake.threads},
    {"sha256": snakemake.wildcards.sha256, "source": snakemake.input[0], "output": snakemake.output[0]},
)
