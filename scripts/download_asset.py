"""Snakemake adapter: fetch one TRELLIS-500K asset to its local_path, verified."""

from slatflow.download import fetch_asset
from slatflow.trellis500k import AssetSource, DownloadSettings
from slatflow.workflow import run_asset_job

run_asset_job(
    snakemake,
    "download",
    lambda: fetch_asset(
        AssetSource(**snakemake.params.source),
        snakemake.output[0],
        DownloadSettings.from_config(snakemake.config["download"]),
        snakemake.config["output_dir"],
        shard=snakemake.config["shard"],
        retry_failed=snakemake.config["retry_failed"],
    ),
)
