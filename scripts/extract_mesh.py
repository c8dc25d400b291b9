"""Snakemake adapter: one asset's mesh.ply -> meshes/<sha256>.ply (slatflow.geometry)."""

import os

os.environ.setdefault("IGL_NUM_THREADS", str(snakemake.threads))  # before libigl loads

from slatflow.geometry import extract_mesh_asset  # noqa: E402
from slatflow.workflow import run_asset_job  # noqa: E402

run_asset_job(
    snakemake,
    "meshes",
    lambda: extract_mesh_asset(
        snakemake.wildcards.sha256,
        snakemake.input[0],
        snakemake.output[0],
        snakemake.config["meshes"]["resolution"],
        snakemake.config["meshes"]["marching_cubes"],
    ),
)
