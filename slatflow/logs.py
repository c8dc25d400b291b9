"""Logging for jobs: everything to the rule's log file, one-line errors to stderr."""

from __future__ import annotations

import logging
import os
import sys

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

RANDOM_WEIGHTS_BANNER = "RANDOM WEIGHTS"

# `logger.error(..., extra=LOG_ONLY)`: into the job's log file, not onto the console (a
# traceback, beside the one-line reason the job prints)
LOG_ONLY = {"log_only": True}


def _not_log_only(record: logging.LogRecord) -> bool:
    return not getattr(record, "log_only", False)


def configure_job_logging(log_path: str | os.PathLike | None, level: int = logging.INFO) -> None:
    """Send the `logging` records of this process to `log_path` (and warnings to stderr).

    Args:
        log_path: the rule's log file; None logs to stderr only (library use, tests).
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(level)
    if log_path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
        file_handler = logging.FileHandler(log_path, mode="a")
        file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(file_handler)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    console.setLevel(logging.WARNING if log_path is not None else level)
    console.addFilter(_not_log_only)
    root.addHandler(console)
    logging.captureWarnings(True)
    if log_path is not None:
        sys.excepthook = _log_uncaught


def _log_uncaught(exc_type, exc, tb) -> None:
    """An exception no code caught goes into the job's log too (it would be on stderr only)."""
    logging.getLogger("slatflow").critical("uncaught exception", exc_info=(exc_type, exc, tb), extra=LOG_ONLY)
    sys.__excepthook__(exc_type, exc, tb)


def warn_random_weights(logger: logging.Logger, model: str) -> None:
    """Say loudly that `model` runs with random weights: its outputs are not real data."""
    line = "!" * 78
    logger.warning(  # the banner starts the message: no record line of its own without text
        "%s\n%s: %s is randomly initialised. Its outputs are NOT usable training data;\n"
        "they exist to test the pipeline. Set the weights in the config for real runs.\n%s",
        line,
        RANDOM_WEIGHTS_BANNER,
        model,
        line,
    )
