"""Snakemake adapter: one asset's mesh.ply -> voxels/<sha256>.ply (slatflow.voxelize)."""

from slatflow.voxelize import voxelize_asset
from slatflow.workflow import run_asset_job

run_asset_job(
    snakemake,
    "voxelize",
    lambda: voxelize_asset(
        snakemake.wildcards.sha256,
        snakemake.input[0],
        snakemake.output[0],
        snakemake.config["voxelize"]["resolution"],
    ),
)
