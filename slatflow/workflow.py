"""The glue between Snakemake jobs and the library: running a stage job with quarantine.

`scripts/*.py` are adapters of a few lines: they unpack `snakemake.*` and call
`run_asset_job`, which sends logging to the rule's log, runs the stage function and,
when an asset fails, writes its quarantine record and exits non-zero with one line (a
failure that is the machine's, not the asset's, leaves no quarantine record).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from slatflow.errors import AssetError, ConfigError, transient_cause
from slatflow.logs import LOG_ONLY, configure_job_logging
from slatflow.quarantine import Failure, clear_failure, record_failure

logger = logging.getLogger(__name__)

# host:pid:start time of the Snakemake process that started the run, set when it parses the
# workflow (its jobs inherit it; their own parses keep it): a job exits when that process is gone
RUN_PROCESS_ENV = "SLATFLOW_RUN_PROCESS"
RUN_POLL_S = 1.0  # how often a job looks for its run's process
TERM_GRACE_S = 10.0  # after SIGTERM to itself (Blender is killed on the way out), before _exit


def _process_start(pid: int) -> str | None:
    """The start time of a live process (clock ticks since boot), None when gone or a zombie."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in "ZX" else fields[19]


def run_process_identity() -> str:
    """This process as RUN_PROCESS_ENV names it (the start time tells a reused pid apart)."""
    return f"{socket.gethostname()}:{os.getpid()}:{_process_start(os.getpid())}"


def exit_with_run(poll_s: float = RUN_POLL_S) -> threading.Thread | None:
    """In a job: stop this job (and, through it, its subprocesses) once the Snakemake process
    of the run is gone. A Snakemake killed with SIGKILL cannot stop its jobs; they would run
    on, adopted by init, and write their outputs into a run that no longer exists.

    Returns:
        the watching thread, or None when the run's process is not on this machine (a SLURM
        job: SLURM ends it) or is this process.
    """
    host, _, rest = os.environ.get(RUN_PROCESS_ENV, "").partition(":")
    pid, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid() or start == "None":
        return None

    def watch() -> None:
        while _process_start(int(pid)) == start:
            time.sleep(poll_s)
        logger.error("the Snakemake process of this run (pid %s) is gone: stopping this job", pid)
        os.kill(os.getpid(), signal.SIGTERM)  # the render stage kills Blender's process group on it
        time.sleep(TERM_GRACE_S)
        os._exit(1)

    thread = threading.Thread(target=watch, name="exit-with-run", daemon=True)
    thread.start()
    return thread


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
    exit_with_run()
    try:
        process()
    except ConfigError as exc:  # wrong for every asset (e.g. a GPU that is absent): no quarantine
        logger.error("%s: %s\n%s", stage, exc, traceback.format_exc(), extra=LOG_ONLY)
        print(f"slatflow: {stage}: {exc} (log: {log_path})", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 - any other failure: this asset only
        reason = exc.reason if isinstance(exc, AssetError) else f"{type(exc).__name__}: {exc}"
        reason = " ".join(reason.split())
        # the traceback goes to the log only: the console gets the one line printed below
        logger.error("%s failed for %s: %s\n%s", stage, sha256, reason, traceback.format_exc(), extra=LOG_ONLY)
        cause = transient_cause(exc)
        if cause is not None:  # the machine's fault: no quarantine, the next run retries
            record_failure(out_dir, stage, sha256, reason, log_path, transient=True)
            print(
                f"slatflow: asset {sha256} failed in {stage} for a reason that is not the asset's ({cause}), "
                f"not quarantined, the next run retries it: {reason} (log: {log_path})",
                file=sys.stderr,
            )
        else:
            record_failure(out_dir, stage, sha256, reason, log_path)
            print(Failure(sha256, stage, reason, str(log_path), "").line(), file=sys.stderr)
        sys.exit(1)
    clear_failure(out_dir, stage, sha256)


def run_model_job(
    snakemake: Any, stage: str, settings: dict, job: Any, client: Callable[[Any, Callable[[dict], Any]], None] | None = None
) -> None:
    """`run_asset_job` for a model stage: the asset goes to the stage's model worker.

    Args:
        stage: a `slatflow.worker.SERVICES` name, also the quarantine stage.
        settings: the service's settings (what its model worker is keyed by).
        job: the stage's typed job (`features.FeatureJob`, `latents.LatentJob`): what its
            batch function, its worker's handler and the tests take.
        client: `client(job, submit)` does the job's side (reads its input, submits it,
            writes what comes back: `latents.run_latent_job`); default: submit
            `job.to_request()`, the worker writing the outputs.
    """
    from slatflow.worker import WorkerSettings, WorkerSpec, run_request

    def submit(request: dict) -> Any:
        return run_request(
            WorkerSpec(stage, settings),
            request,
            WorkerSettings.from_config(snakemake.config["workers"]),
            Path(snakemake.config["output_dir"]) / "logs" / "workers",
        )

    run_asset_job(snakemake, stage, lambda: client(job, submit) if client else submit(job.to_request()))


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
