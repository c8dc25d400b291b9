"""Snakemake adapter: one asset's quality record quality/<sha256>.json (slatflow.geometry)."""

import os
from pathlib import Path

os.environ.setdefault("IGL_NUM_THREADS", str(snakemake.threads))  # before libigl loads

from slatflow.geometry import check_quality_asset  # noqa: E402
from slatflow.quality import QualitySettings  # noqa: E402
from slatflow.workflow import run_asset_job  # noqa: E402

run_asset_job(
    snakemake,
    "quality",
    lambda: check_quality_asset(
        snakemake.wildcards.sha256,
        snakemake.input.source,
        snakemake.output[0],
        watertight_mesh=snakemake.input.mesh,
        voxels=snakemake.input.voxels,
        render_dir=Path(snakemake.input.renders).parent,
        settings=QualitySettings.from_config(snakemake.config["quality"]),
        voxel_resolution=snakemake.config["voxelize"]["resolution"],
    ),
)
