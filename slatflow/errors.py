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
