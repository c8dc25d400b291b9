"""Snakemake adapter: encode one asset's voxels into its sparse-structure latent."""

from slatflow.workflow import run_model_job

run_model_job(
    snakemake,
    "ss_latent",
    {"latents": snakemake.config["latents"], "threads": snakemake.threads},
    {"sha256": snakemake.wildcards.sha256, "source": snakemake.input[0], "output": snakemake.output[0]},
)
