"""Snakemake adapter: encode one asset's voxel features into its structured latent."""

from slatflow.latents import LatentSettings, encode_latent_files
from slatflow.workflow import run_asset_job

run_asset_job(
    snakemake,
    "slat_latent",
    lambda: encode_latent_files(
        "slat",
        [snakemake.wildcards.sha256],
        snakemake.input,
        snakemake.output,
        LatentSettings.from_config(snakemake.config["latents"]),
        snakemake.threads,
    ),
)
