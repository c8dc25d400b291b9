"""Failure quarantine shared by all stages.

When an asset fails in a stage, its job writes `OUT/failed/<stage>/<sha256>.json`
(stage, reason, log path, time) and fails. Later runs leave quarantined assets out of
their targets, so they complete; metadata.csv shows the reason; the config switch
`retry_failed: true` puts them back, and a success removes the stale record.

A failure that is not the asset's (a full disk, an I/O error, out of memory, a killed
worker) writes `OUT/logs/transient/<stage>/<sha256>.json` instead: the asset is not left
out of the next run, and the end-of-run summary lists it apart from the quarantined ones.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from slatflow.io import write_json_atomic

FAILED_DIR = "failed"
TRANSIENT_DIR = "logs/transient"


@dataclass(frozen=True)
class Failure:
    sha256: str
    stage: str
    reason: str
    log: str
    time: str

    def line(self) -> str:
        """The one console line of this failure, as the failed job prints it."""
        return f"slatflow: asset {self.sha256} failed in {self.stage}: {self.reason} (log: {self.log})"


SUMMARY_LINES = 20  # a run's end lists at most this many of its quarantined assets


def failure_path(out_dir: str | os.PathLike, stage: str, sha256: str) -> Path:
    return Path(out_dir) / FAILED_DIR / stage / f"{sha256}.json"


def transient_path(out_dir: str | os.PathLike, stage: str, sha256: str) -> Path:
    return Path(out_dir) / TRANSIENT_DIR / stage / f"{sha256}.json"


def record_failure(
    out_dir: str | os.PathLike,
    stage: str,
    sha256: str,
    reason: str,
    log: str | os.PathLike = "",
    transient: bool = False,
) -> Path:
    """Write the quarantine record of one asset in one stage; return its path.

    Args:
        transient: the failure is the machine's, not the asset's: the record goes to
            OUT/logs/transient, which leaves nothing out of the next run.
    """
    path = (transient_path if transient else failure_path)(out_dir, stage, sha256)
    failure = Failure(
        sha256=sha256,
        stage=stage,
        reason=" ".join(str(reason).split()),  # one line, whatever the exception printed
        log=str(log),
        time=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    write_json_atomic(path, asdict(failure))
    return path


def clear_failure(out_dir: str | os.PathLike, stage: str, sha256: str) -> None:
    failure_path(out_dir, stage, sha256).unlink(missing_ok=True)
    transient_path(out_dir, stage, sha256).unlink(missing_ok=True)


def quarantined_sha256s(out_dir: str | os.PathLike, only: list[str] | None = None) -> set[str]:
    """The assets with a failure record (a scan of the record names only, no reads).

    Args:
        only: count the records of these stages alone; None counts every stage.
    """
    root = Path(out_dir) / FAILED_DIR
    if not root.is_dir():
        return set()
    found = set()
    for stage_dir in os.scandir(root):
        if stage_dir.is_dir() and (only is None or stage_dir.name in only):
            found.update(e.name[: -len(".json")] for e in os.scandir(stage_dir) if e.name.endswith(".json"))
    return found


def load_failures(out_dir: str | os.PathLike, since: float | None = None, transient: bool = False) -> list[Failure]:
    """Every failure record under OUT/failed, unreadable ones reported as such.

    Args:
        since: only records written at or after this time (seconds since the epoch).
        transient: the records of failures that were not the assets' (OUT/logs/transient).
    """
    root = Path(out_dir) / (TRANSIENT_DIR if transient else FAILED_DIR)
    failures = []
    for path in sorted(root.glob("*/*.json")):
        if since is not None and _mtime(path) < since:
            continue
        try:
            failures.append(Failure(**json.loads(path.read_text())))
        except (OSError, ValueError, TypeError) as exc:
            failures.append(Failure(path.stem, path.parent.name, f"unreadable failure record: {exc}", "", ""))
    return failures


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _stage_counts(failures: list[Failure]) -> str:
    by_stage: dict[str, int] = {}
    for failure in failures:
        by_stage[failure.stage] = by_stage.get(failure.stage, 0) + 1
    return ", ".join(f"{stage}: {n}" for stage, n in sorted(by_stage.items()))


def failure_summary(out_dir: str | os.PathLike, since: float | None = None) -> str:
    """A few lines for the end of a failed run: what is quarantined, what failed for a reason
    that is not the asset's (and will be retried), and what to do next.

    Args:
        since: the run's start (seconds since the epoch): transient failures of earlier runs
            are left out of the summary.
    """
    failures = load_failures(out_dir)
    transient = load_failures(out_dir, since=since, transient=True)
    lines = []
    if failures:
        lines.append(
            f"slatflow: {len(failures)} asset(s) quarantined ({_stage_counts(failures)}), records in "
            f"{Path(out_dir) / FAILED_DIR}. The next run leaves them out and completes; "
            "metadata.csv shows the reasons; --config retry_failed=true tries them again."
        )
    if transient:
        lines.append(
            f"slatflow: {len(transient)} asset(s) failed for a reason that is not the asset's "
            f"({_stage_counts(transient)}; first: {transient[0].reason}), records in "
            f"{Path(out_dir) / TRANSIENT_DIR}. They are not quarantined: fix the machine and run "
            "again, and the next run retries them."
        )
    if not lines:
        return "slatflow: no asset is quarantined; the failure was not an asset's (see the log above)."
    # This run's quarantines again, one line each: a job on SLURM prints its line into its
    # SLURM log, not to this console.
    new = load_failures(out_dir, since=since) if since is not None else []
    lines += [failure.line() for failure in new[:SUMMARY_LINES]]
    if len(new) > SUMMARY_LINES:
        lines.append(f"slatflow: ... and {len(new) - SUMMARY_LINES} more quarantined in this run (metadata.csv)")
    return "\n".join(lines)
