"""The one exception type a stage raises for a bad asset.

A stage raises `AssetError` when one asset cannot be processed (corrupt file, no
geometry, a subprocess timeout, ...). The workflow quarantines that asset with the
message as its reason; the other assets of the run go on. A failure that is the machine's
(`TransientError`, or an error `transient_cause` recognises) fails the job without a
quarantine record, so the next run retries the asset.
"""

from __future__ import annotations

import dataclasses
import errno
import os
from typing import Iterable, Sequence


class AssetError(Exception):
    """An asset that a stage cannot process, with a one-line reason.

    Args:
        sha256: the asset's key.
        reason: what is wrong, naming the value and what was expected.
        stage: the stage that found it; the caller may leave it to the workflow.
    """

    def __init__(self, sha256: str, reason: str, stage: str | None = None):
        self.sha256 = sha256
        self.reason = reason
        self.stage = stage
        where = f"{stage}: " if stage else ""
        super().__init__(f"asset {sha256}: {where}{reason}")


@dataclasses.dataclass(frozen=True)
class AssetOutcome:
    """What a stage's batch function did with one asset: done (`error` None) or failed.

    Every batch function (`render_views`, `FeatureExtractor.run`, `encode_*_latents`) returns
    one per asset, in the order it was given them; a stage's own result type adds its figures.
    """

    sha256: str
    error: AssetError | None = None


def failures(outcomes: Iterable[AssetOutcome]) -> dict[str, AssetError]:
    """The failed assets of a batch, by sha256."""
    return {outcome.sha256: outcome.error for outcome in outcomes if outcome.error is not None}


def raise_first_failure(outcomes: Iterable[AssetOutcome]) -> None:
    """Raise the first failure's AssetError (a per-asset job has one outcome)."""
    for outcome in outcomes:
        if outcome.error is not None:
            raise outcome.error


def outcomes_in_order(sha256s: Sequence[str], failed: dict[str, AssetError]) -> list[AssetOutcome]:
    """One outcome per asset from a batch's failures by sha256."""
    return [AssetOutcome(sha256, failed.get(sha256)) for sha256 in sha256s]


class ConfigError(Exception):
    """A configuration value that is wrong for the whole run (not one asset)."""


class DownloadError(Exception):
    """A download that cannot succeed as asked (HTTP 404, a wrong hash, a missing archive member).

    The message is one line naming the URL or member and the cause. Transient failures
    (connection reset, HTTP 5xx, a stalled or truncated body) are retried inside the
    download functions and only become a `DownloadError` when the retries are spent.
    """


class AccessDenied(DownloadError):
    """HTTP 401/403: a missing token or a gated dataset; wrong for every asset of the host."""


class HashMismatch(DownloadError):
    """The bytes arrived complete but their sha256 is not the listed one."""


class TransientError(Exception):
    """A failure that is not the asset's fault (the machine's: a full disk, an I/O error, out of
    memory, a killed worker, a CUDA error). The job fails without a quarantine record, so the
    next run tries the asset again."""


# errno values that describe the machine, not the asset's bytes
TRANSIENT_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.ENOMEM, errno.ESTALE, errno.EROFS, errno.ENFILE, errno.EMFILE}
)
# the same causes as a subprocess prints them (Blender, a worker): strerror texts and CUDA's words
TRANSIENT_MESSAGES = tuple(os.strerror(code) for code in sorted(TRANSIENT_ERRNOS)) + (
    "CUDA error",
    "CUDA out of memory",
    "CUBLAS_STATUS",
    "cuDNN error",
    "out of memory",
)


def transient_cause(exc: BaseException) -> str | None:
    """Why `exc` is the machine's fault rather than the asset's, or None when it may be the asset's.

    Looks through the exception's chain (`raise ... from`, and the error being handled when it
    was raised), so an `AssetError` raised while handling a full disk still counts as transient;
    then through the messages, for what a subprocess (Blender, a worker) reported as text.
    """
    chain: list[BaseException] = []
    while exc is not None and all(exc is not seen for seen in chain):
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    for error in chain:
        if isinstance(error, TransientError):
            return str(error)
        if isinstance(error, MemoryError):
            return "out of memory (MemoryError)"
        if isinstance(error, OSError) and error.errno in TRANSIENT_ERRNOS:
            return f"{error.strerror or os.strerror(error.errno)} ({errno.errorcode.get(error.errno, error.errno)})"
        if type(error).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch
            return "CUDA out of memory"
    for error in chain:
        if isinstance(error, ConfigError):
            continue
        text = (error.reason if isinstance(error, AssetError) else str(error)).lower()
        found = next((m for m in TRANSIENT_MESSAGES if m.lower() in text), None)
        if found:
            return found
    return None
