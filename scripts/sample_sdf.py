"""Snakemake adapter: one asset's watertight mesh -> sdf/<sha256>.npz (slatflow.geometry)."""

import os

os.environ.setdefault("IGL_NUM_THREADS", str(snakemake.threads))  # before libigl loads

from slatflow.geometry import sample_sdf_asset  # noqa: E402
from slatflow.plan import sdf_params  # noqa: E402
from slatflow.workflow import run_asset_job  # noqa: E402

run_asset_job(
    snakemake,
    "sdf",
    lambda: sample_sdf_asset(
        snakemake.wildcards.sha256, snakemake.input[0], snakemake.output[0], **sdf_params(snakemake.config)
    ),
)
