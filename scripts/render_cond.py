"""Snakemake adapter: render one asset's conditioning views and transforms.json with Blender."""

from pathlib import Path

from slatflow.render import CondSettings, RenderAsset, RenderSettings, render_cond_views
from slatflow.errors import raise_first_failure
from slatflow.workflow import raster_worker_client, run_asset_job

settings = RenderSettings.from_config(snakemake.config["render"], threads=snakemake.threads)
run_asset_job(
    snakemake,
    "render_cond",
    lambda: raise_first_failure(
        render_cond_views(
            [RenderAsset(snakemake.wildcards.sha256, Path(snakemake.input[0]))],
            Path(snakemake.output[0]).parent.parent,
            settings,
            CondSettings.from_config(snakemake.config["render_cond"]),
            raster_worker_client(snakemake, settings.raster_options()),
        )
    ),
)
