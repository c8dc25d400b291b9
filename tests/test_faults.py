"""Faults injected into real runs: a hard kill, and a folder of bad inputs run twice."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
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



def _bad_inputs(folder: Path, good: dict[str, Path]) -> tuple[dict[str, Path], dict[str, Path]]:
    """Files a skeptical user would try, beside the good ones: (bad assets, good assets)."""
    rng = np.random.default_rng(14)
    box_obj = good["box.obj"].read_text()
    bad = {
        "truncated.glb": good["nested/ball.glb"].read_bytes()[:700],
        "random.glb": rng.bytes(3000),
        "random.obj": rng.bytes(3000),
        "random.ply": b"ply\n" + rng.bytes(3000),
        "random.stl": rng.bytes(3000),
        "random.fbx": rng.bytes(3000),
        "empty.obj": b"",
        "no_faces.obj": b"v 0 0 0\nv 1 0 0\nv 0 1 0\n",
        "nan.obj": b"v 0 0 0\nv 1 0 0\nv nan 1 0\nf 1 2 3\n",
    }
    bad_paths = {}
    for name, data in bad.items():
        bad_paths[name] = folder / "bad" / name
        bad_paths[name].parent.mkdir(parents=True, exist_ok=True)
        bad_paths[name].write_bytes(data)
    # degraded but renderable: they finish (Blender renders them without the missing files)
    more_good = {
        "no_texture.obj": "mtllib tex.mtl\nusemtl skin\n" + box_obj + "\n# 1\n",
        "no_mtl.obj": "mtllib nowhere.mtl\nusemtl skin\n" + box_obj + "\n# 2\n",
        "ünïcødé 模型.obj": box_obj + "\n# 3\n",
    }
    good_paths = dict(good)
    for name, text in more_good.items():
        good_paths[name] = folder / "odd" / name
        good_paths[name].parent.mkdir(parents=True, exist_ok=True)
        good_paths[name].write_text(text, encoding="utf-8")
    (folder / "odd" / "tex.mtl").write_text("newmtl skin\nmap_Kd gone.png\n")
    # left out by ingest with a warning line each: not assets, no quarantine record
    (folder / "dangling.glb").symlink_to(folder / "nowhere.glb")
    (folder / "loop_a.obj").symlink_to(folder / "loop_b.obj")
    (folder / "loop_b.obj").symlink_to(folder / "loop_a.obj")
    (folder / "odd" / "up").symlink_to("..")
    return bad_paths, good_paths


def test_a_folder_of_bad_inputs_twice(small_assets, tmp_path):
    """Every bad asset: one quarantine record with a one-line reason, no traceback anywhere on
    the console; every good asset finishes; the second run exits 0; nothing hangs."""
    from slatflow.ingest import sha256_of_file
    from slatflow.quarantine import load_failures

    bad, good = _bad_inputs(tmp_path / "assets", small_assets)
    config = local_config(tmp_path, render={**FAST_RENDER, "timeout_s": 120})
    started = time.monotonic()
    first = run_workflow(config, ["voxels"], config_dir=tmp_path, timeout=900)
    console = first.stdout + first.stderr
    assert first.returncode != 0, "the failures fail the first run"
    assert "Traceback" not in console, console[-3000:]
    for line in ("dangling.glb", "loop_a.obj", "loop_b.obj", "odd/up"):
        assert f"/{line}:" in console, f"ingest names {line} in one warning line"

    failures = load_failures(tmp_path / "out")
    by_asset: dict[str, list] = {}
    for failure in failures:
        by_asset.setdefault(failure.sha256, []).append(failure)
    for name, path in bad.items():
        records = by_asset.get(sha256_of_file(path), [])
        assert len(records) == 1, (name, records)
        reason = records[0].reason
        assert reason and "\n" not in reason and "Traceback" not in reason, (name, reason)
        assert f"failed in {records[0].stage}: {reason}" in console, "the console has the same one line"
    assert "vertices are not finite" in by_asset[sha256_of_file(bad["nan.obj"])][0].reason
    for name, path in good.items():
        sha = sha256_of_file(path)
        assert sha not in by_asset, (name, by_asset.get(sha))
        assert (tmp_path / "out" / "voxels" / f"{sha}.ply").is_file(), name

    second = run_workflow(config, ["voxels"], config_dir=tmp_path, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Traceback" not in second.stdout + second.stderr
    table = pd.read_csv(tmp_path / "out" / "metadata.csv").set_index("sha256")
    assert len(table) == len(bad) + len(good)
    assert table.loc[[sha256_of_file(p) for p in good.values()], "voxelized"].all()
    assert table.loc[[sha256_of_file(p) for p in bad.values()], "failed_reason"].notna().all()
    assert len(load_failures(tmp_path / "out")) == len(bad), "no new record, none lost"
    assert time.monotonic() - started < 900


def test_deleted_renders_show_in_metadata_without_re_rendering(small_assets, tmp_path):
    """Renders deleted to save space: a downstream target re-runs no stage, metadata.csv is
    rebuilt and shows them missing, and the run after that has nothing to do."""
    import shutil

    config = local_config(tmp_path, render=FAST_RENDER)
    assert run_workflow(config, ["voxels"], config_dir=tmp_path).returncode == 0
    assert pd.read_csv(tmp_path / "out" / "metadata.csv")["rendered"].all()
    shutil.rmtree(tmp_path / "out" / "renders")
    rerun = run_workflow(config, ["voxels"], config_dir=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "render_views" not in rerun.stdout + rerun.stderr
    table = pd.read_csv(tmp_path / "out" / "metadata.csv")
    assert not table["rendered"].any() and table["voxelized"].all()
    again = run_workflow(config, ["voxels"], "-n", config_dir=tmp_path)
    assert "Nothing to be done" in again.stdout + again.stderr, again.stdout[-2000:]
