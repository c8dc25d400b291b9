"""The glue between Snakemake jobs and the library: running a stage job with quarantine.

`scripts/*.py` are adapters of a few lines: they unpack `snakemake.*` and call
`run_asset_job`, which sends logging to the rule's log, runs the stage function and,
when an asset fails, writes its quarantine record and exits non-zero with one line.
"""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

from slatflow.errors import AssetError, ConfigError
from slatflow.logs import configure_job_logging
from slatflow.quarantine import clear_failure, record_failure

logger = logging.getLogger(__name__)


def run_asset_job(
    snakemake: Any,
    stage: str,
    process: Callable[[], None],
) -> None:
    """Run `process()` for the asset(s) of one Snakemake job, quarantining on failure.

    Args:
        snakemake: the `snakemake` object of a `script:` job; needs `wildcards.sha256`,
            `log[0]` and `config["output_dir"]`.
        stage: the quarantine stage name (`render`, `voxelize`, ...).
        process: does the work; raises `AssetError` (or anything else) on failure.
    """
    sha256 = snakemake.wildcards.sha256
    out_dir = snakemake.config["output_dir"]
    log_path = snakemake.log[0]
    configure_job_logging(log_path)
    try:
        process()
    except ConfigError as exc:  # wrong for every asset (e.g. a GPU that is absent): no quarantine
        logger.error("%s: %s", stage, exc)
        print(f"slatflow: {stage}: {exc} (log: {log_path})", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 - any other failure quarantines this asset only
        reason = exc.reason if isinstance(exc, AssetError) else f"{type(exc).__name__}: {exc}"
        logger.error("%s failed for %s: %s\n%s", stage, sha256, reason, traceback.format_exc())
        record_failure(out_dir, stage, sha256, reason, log_path)
        print(f"slatflow: asset {sha256} failed in {stage}: {reason} (log: {log_path})", file=sys.stderr)
        sys.exit(1)
    clear_failure(out_dir, stage, sha256)


def run_model_job(snakemake: Any, stage: str, settings: dict, request: dict) -> None:
    """`run_asset_job` for a model stage: the asset goes to the stage's model worker.

    Args:
        stage: a `slatflow.worker.SERVICES` name, also the quarantine stage.
        settings: the service's settings (what its model worker is keyed by).
        request: the asset's inputs and output, as the service reads them.
    """
    from slatflow.worker import WorkerSettings, WorkerSpec, run_request

    run_asset_job(
        snakemake,
        stage,
        lambda: run_request(
            WorkerSpec(stage, settings),
            request,
            WorkerSettings.from_config(snakemake.config["workers"]),
            Path(snakemake.config["output_dir"]) / "logs" / "workers",
        ),
    )


def raster_worker_client(snakemake: Any, settings: dict) -> Callable[[dict], dict | None]:
    """How a render job hands its exported scene to the machine's raster worker, which keeps
    one GL context, its shaders and tables for every asset (as the model workers keep a model).

    Args:
        settings: `slatflow.raster.RasterOptions` fields (what the worker is keyed by).
    """
    from slatflow.worker import WorkerSettings, WorkerSpec, run_request

    spec = WorkerSpec("raster", settings)
    workers = WorkerSettings.from_config(snakemake.config["workers"])
    log_dir = Path(snakemake.config["output_dir"]) / "logs" / "workers"
    return lambda request: run_request(spec, request, workers, log_dir)
