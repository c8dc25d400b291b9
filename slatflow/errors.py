"""The one exception type a stage raises for a bad asset.

A stage raises `AssetError` when one asset cannot be processed (corrupt file, no
geometry, a subprocess timeout, ...). The workflow quarantines that asset with the
message as its reason; the other assets of the run go on.
"""

from __future__ import annotations


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
