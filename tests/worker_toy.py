"""A toy model-worker service for tests/test_worker.py: it records how often it loaded."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from slatflow.errors import AssetError, ConfigError

logger = logging.getLogger("toy")


def make(settings: dict):
    if settings.get("fail_to_load"):
        raise ConfigError("weights 'nowhere' not found")
    loads = Path(settings["record_dir"]) / "loads"
    with open(loads, "a") as f:
        f.write(f"{os.getpid()}\n")

    def handle(request: dict) -> None:
        action = request.get("action", "write")
        logger.info("asset %s: %s in pid %d", request["sha256"], action, os.getpid())
        if action == "bad":
            raise AssetError(request["sha256"], "no voxels in the file")
        if action == "crash":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if action == "die":
            os._exit(3)
        if action == "hang":
            time.sleep(3600)
        if action == "slow":
            time.sleep(1.0)
        if action == "arrays":  # the arrays came as bytes: answer with arrays made of them
            return {"pid": os.getpid(), "doubled": request["values"] * 2, "empty": request["empty"],
                    "flag": np.bool_(request["values"].dtype == np.float16), "shape": list(request["values"].shape)}
        Path(request["output"]).write_text(f"{os.getpid()}\n")

    handle.concurrency = settings.get("concurrency", 1)
    return handle
