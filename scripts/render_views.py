"""Snakemake adapter: render one asset's views, mesh.ply and transforms.json with Blender."""

from pathlib import Path

from slatflow.render import RenderAsset, RenderSettings, render_views
from slatflow.errors import raise_first_failure
from slatflow.workflow import raster_worker_client, run_asset_job

settings = RenderSettings.from_config(snakemake.config["render"], threads=snakemake.threads)
run_asset_job(
    snakemake,
    "render",
    lambda: raise_first_failure(
        render_views(
            [RenderAsset(snakemake.wildcards.sha256, Path(snakemake.input[0]))],
            Path(snakemake.output.transforms).parent.parent,
            settings,
            raster_worker_client(snakemake, settings.raster_options()),
        )
    ),
)
