"""Shared fixtures: small assets made on the fly and a runner for the real workflow."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_workflow(
    config: dict,
    targets: list[str] | tuple[str, ...] = (),
    *args: str,
    cwd: Path = REPO,
    config_dir: Path,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """Run `snakemake --configfile <config> targets args` in the repo and capture its output.

    The default workflow profile applies (keep-going, all cores), as for a user. HOME and
    the XDG folders point into `config_dir`, where bpy and torch write their caches.
    """
    configfile = write_config(config_dir / "config.yaml", config)
    worker_dir = Path(tempfile.mkdtemp(prefix="sfw", dir="/tmp"))  # sockets need short paths
    env = dict(os.environ)
    env.update(
        HOME=str(config_dir),
        XDG_CONFIG_HOME=str(config_dir / ".config"),
        XDG_CACHE_HOME=str(config_dir / ".cache"),
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(REPO),
        SLATFLOW_WORKER_DIR=str(worker_dir),
    )
    # targets first: --configfile takes every following word as another config file
    cmd = SNAKEMAKE + [*targets, "--configfile", str(configfile), *args]
    # A session of its own: on a timeout the whole run (jobs, Blender) is killed, not just
    # snakemake, whose jobs would otherwise render on as orphans.
    process = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    finally:
        stop_workers(worker_dir)
    return subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)


def stop_workers(worker_dir: Path) -> None:
    """End the model workers a run started (they would wait for their idle timeout)."""
    for pid_file in worker_dir.glob("*.pid"):
        with contextlib.suppress(OSError, ValueError):
            os.killpg(int(pid_file.read_text()), signal.SIGTERM)
    shutil.rmtree(worker_dir, ignore_errors=True)


def make_small_assets(folder: Path) -> dict[str, Path]:
    """A handful of tiny, valid assets in several formats, plus a non-asset file."""
    import trimesh

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "nested").mkdir(exist_ok=True)
    made = {
        "box.obj": trimesh.creation.box(extents=(2.0, 1.0, 0.5)),
        "nested/ball.glb": trimesh.creation.icosphere(subdivisions=2, radius=3.0),
        "cone.stl": trimesh.creation.cone(radius=1.0, height=2.0),
    }
    paths = {}
    for name, mesh in made.items():
        mesh.export(folder / name)
        paths[name] = folder / name
    (folder / "README.txt").write_text("not an asset\n")
    return paths


@pytest.fixture
def small_assets(tmp_path: Path) -> dict[str, Path]:
    return make_small_assets(tmp_path / "assets")
