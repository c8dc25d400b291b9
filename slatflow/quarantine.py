"""Failure quarantine shared by all stages.

When an asset fails in a stage, its job writes `OUT/failed/<stage>/<sha256>.json`
(stage, reason, log path, time) and fails. Later runs leave quarantined assets out of
their targets, so they complete; metadata.csv shows the reason; the config switch
`retry_failed: true` puts them back, and a success removes the stale record.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from slatflow.io import write_json_atomic

FAILED_DIR = "failed"


@dataclass(frozen=True)
class Failure:
    sha256: str
    stage: str
    reason: str
    log: str
    time: str


def failure_path(out_dir: str | os.PathLike, stage: str, sha256: str) -> Path:
    return Path(out_dir) / FAILED_DIR / stage / f"{sha256}.json"


def record_failure(
    out_dir: str | os.PathLike, stage: str, sha256: str, reason: str, log: str | os.PathLike = ""
) -> Path:
    """Write the quarantine record of one asset in one stage; return its path."""
    path = failure_path(out_dir, stage, sha256)
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


def load_failures(out_dir: str | os.PathLike) -> list[Failure]:
    """Every failure record under OUT/failed, unreadable ones reported as such."""
    root = Path(out_dir) / FAILED_DIR
    failures = []
    for path in sorted(root.glob("*/*.json")):
        try:
            failures.append(Failure(**json.loads(path.read_text())))
        except (OSError, ValueError, TypeError) as exc:
            failures.append(Failure(path.stem, path.parent.name, f"unreadable failure record: {exc}", "", ""))
    return failures


def failure_summary(out_dir: str | os.PathLike) -> str:
    """A few lines for the end of a failed run: what is quarantined and what to do next."""
    failures = load_failures(out_dir)
    if not failures:
        return "slatflow: no asset is quarantined; the failure was not an asset's (see the log above)."
    by_stage: dict[str, int] = {}
    for failure in failures:
        by_stage[failure.stage] = by_stage.get(failure.stage, 0) + 1
    counts = ", ".join(f"{stage}: {n}" for stage, n in sorted(by_stage.items()))
    return (
        f"slatflow: {len(failures)} asset(s) quarantined ({counts}), records in "
        f"{Path(out_dir) / FAILED_DIR}. The next run leaves them out and completes; "
        "metadata.csv shows the reasons; --config retry_failed=true tries them again."
    )
