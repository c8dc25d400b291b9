"""Faults injected into real runs: a hard kill, and a folder of bad inputs run twice."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd

from conftest import REPO, SNAKEMAKE, run_workflow, write_config

FAST_RENDER = {"num_views": 2, "resolution": 32, "samples": 1, "denoise": False, "threads": 1}


def local_config(tmp_path, **extra):
    return {"output_dir": str(tmp_path / "out"), "source": {"type": "local", "path": str(tmp_path / "assets")}, **extra}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


def test_a_hard_kill_of_snakemake_stops_its_jobs_and_blender_and_the_rerun_resumes(small_assets, tmp_path):
    """kill -9 of Snakemake alone: its render jobs and their Blender processes end within
    seconds instead of rendering on, and the README's recipe (--unlock, then the same
    command) finishes the run."""
    pids = tmp_path / "blender.pids"
    late = tmp_path / "late_write"
    stand_in = tmp_path / "blender.sh"  # Blender's Python, slow: it would write after 60 s
    stand_in.write_text(f"#!/bin/sh\necho $$ >> {pids}\nsleep 60\ntouch {late}\n")
    stand_in.chmod(0o755)
    config = local_config(tmp_path, render={**FAST_RENDER, "python": str(stand_in)})
    configfile = write_config(tmp_path / "config.yaml", config)
    env = dict(os.environ, HOME=str(tmp_path), PYTHONPATH=str(REPO), XDG_CACHE_HOME=str(tmp_path / ".cache"))
    run = subprocess.Popen(
        SNAKEMAKE + ["renders", "--configfile", str(configfile)], cwd=REPO, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (pids.is_file() and pids.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert pids.is_file(), "no render job started"
        os.kill(run.pid, signal.SIGKILL)  # Snakemake only, as `kill -9 <pid>` does
        run.wait()
        blenders = [int(p) for p in pids.read_text().split()]
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in blenders) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(p) for p in blenders), "Blender outlived the killed run"
        time.sleep(2)
        assert not late.exists()
        assert not list((tmp_path / "out").glob("renders/*/transforms.json")), "no render appeared after the kill"
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(run.pid, signal.SIGKILL)

    config["render"].pop("python")  # the real Blender for the resumed run
    unlock = run_workflow(config, ["renders"], "--unlock", config_dir=tmp_path)
    assert unlock.returncode == 0, unlock.stderr[-2000:]
    resumed = run_workflow(config, ["renders"], config_dir=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert pd.read_csv(tmp_path / "out" / "metadata.csv")["rendered"].all()

