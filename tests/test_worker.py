"""Model workers: one load serves many jobs; errors, crashes, hangs and idle exits."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, stop_workers
from slatflow.errors import AssetError, ConfigError, TransientError
from slatflow.worker import WorkerSettings, WorkerSpec, run_request

TOY = "worker_toy:make"


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """A spec for the toy service, sockets and logs in tmp_path, the worker importable."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO / "tests"), str(REPO)]))
    sockets = Path(tempfile.mkdtemp(prefix="sfw", dir="/tmp"))  # socket paths must be short
    (tmp_path / "sockets").symlink_to(sockets)
    settings = WorkerSettings(idle_timeout_s=30, start_timeout_s=60, request_timeout_s=20, socket_dir=str(sockets))
    spec = WorkerSpec(TOY, {"record_dir": str(tmp_path)})
    yield spec, settings
    stop_workers(sockets)


def request(tmp_path: Path, name: str, action: str = "write") -> dict:
    return {"sha256": name * 64, "output": str(tmp_path / f"{name}.out"), "action": action}


def loads(tmp_path: Path) -> list[str]:
    return (tmp_path / "loads").read_text().split()


def test_one_worker_serves_many_jobs_and_their_logs_come_back(toy, tmp_path, caplog):
    spec, settings = toy
    with caplog.at_level(logging.INFO):
        for name in "abc":
            run_request(spec, request(tmp_path, name), settings, tmp_path / "logs")
    assert len(loads(tmp_path)) == 1, "the model loaded once for three jobs"
    pids = {(tmp_path / f"{n}.out").read_text() for n in "abc"}
    assert pids == {loads(tmp_path)[0] + "\n"}, "all three were written by the worker"
    assert os.getpid() != int(loads(tmp_path)[0])
    assert "asset " + "b" * 64 + ": write in pid" in caplog.text, "the worker's log lines reach the job's log"


def test_numpy_arrays_travel_both_ways_as_their_bytes(toy, tmp_path):
    spec, settings = toy
    values = np.arange(3 * 70000, dtype=np.float16).reshape(3, 70000)[:, ::2]  # not contiguous, > a socket buffer
    asked = dict(request(tmp_path, "a", "arrays"), values=values, empty=np.zeros((0, 3), np.uint8))
    result = run_request(spec, asked, settings, tmp_path / "logs")
    assert result["pid"] != os.getpid() and result["shape"] == [3, 35000]
    assert result["doubled"].dtype == np.float16 and np.array_equal(result["doubled"], values * 2)
    assert result["empty"].shape == (0, 3) and result["empty"].dtype == np.uint8
    assert result["flag"].shape == () and bool(result["flag"])


def test_jobs_arriving_together_start_one_worker(toy, tmp_path):
    spec, settings = toy
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda n: run_request(spec, request(tmp_path, n), settings, tmp_path / "logs"), "abcd"))
    assert len(loads(tmp_path)) == 1


@pytest.mark.parametrize("concurrency", [1, 3])
def test_a_concurrent_service_serves_requests_at_once_and_logs_each_to_its_job(tmp_path, toy, caplog, concurrency):
    caplog.set_level(logging.INFO)
    spec, settings = toy
    spec = WorkerSpec(TOY, {"record_dir": str(tmp_path), "concurrency": concurrency})
    run_request(spec, request(tmp_path, "x"), settings, tmp_path / "logs")  # started and loaded
    captured: dict[str, list[str]] = {}

    def job(name: str) -> None:
        records: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record: records.append(record.getMessage())
        me = threading.get_ident()
        handler.addFilter(lambda record: record.thread == me)  # this job's thread only
        logging.getLogger().addHandler(handler)
        try:
            run_request(spec, request(tmp_path, name, "slow"), settings, tmp_path / "logs")
        finally:
            logging.getLogger().removeHandler(handler)
        captured[name] = records

    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        list(pool.map(job, "abc"))
    elapsed = time.monotonic() - start
    assert len(loads(tmp_path)) == 1 and all((tmp_path / f"{n}.out").exists() for n in "abc")
    if concurrency == 1:
        assert elapsed >= 3.0, "one request at a time"
    else:
        assert elapsed < 2.5, f"three 1-s requests took {elapsed:.1f} s: not served at once"
        for name in "abc":  # each job got its own asset's lines only
            assert [line for line in captured[name] if line.startswith("asset ")] == [
                f"asset {name * 64}: slow in pid {loads(tmp_path)[0]}"]


def test_a_bad_asset_is_reported_and_the_worker_goes_on(toy, tmp_path):
    spec, settings = toy
    with pytest.raises(AssetError, match="no voxels in the file") as info:
        run_request(spec, request(tmp_path, "a", "bad"), settings, tmp_path / "logs")
    assert info.value.sha256 == "a" * 64
    run_request(spec, request(tmp_path, "b"), settings, tmp_path / "logs")
    assert len(loads(tmp_path)) == 1


def test_an_unexpected_error_fails_the_asset_and_retires_the_worker(toy, tmp_path):
    spec, settings = toy
    with pytest.raises(AssetError, match="RuntimeError: CUDA error"):
        run_request(spec, request(tmp_path, "a", "crash"), settings, tmp_path / "logs")
    run_request(spec, request(tmp_path, "b"), settings, tmp_path / "logs")
    assert len(loads(tmp_path)) == 2, "the next job got a fresh worker"


def test_a_worker_that_dies_fails_only_its_asset(toy, tmp_path):
    spec, settings = toy
    with pytest.raises(TransientError, match="died while processing"):
        run_request(spec, request(tmp_path, "a", "die"), settings, tmp_path / "logs")
    run_request(spec, request(tmp_path, "b"), settings, tmp_path / "logs")
    assert (tmp_path / "b.out").exists()


def test_a_hanging_asset_times_out_and_the_worker_is_stopped(toy, tmp_path):
    spec, settings = toy
    settings = WorkerSettings(**{**settings.__dict__, "request_timeout_s": 2})
    start = time.monotonic()
    with pytest.raises(TransientError, match="timed out after 2 s"):
        run_request(spec, request(tmp_path, "a", "hang"), settings, tmp_path / "logs")
    assert time.monotonic() - start < 30
    hung_pid = int(loads(tmp_path)[0])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{hung_pid}").exists():
        time.sleep(0.1)
    assert not Path(f"/proc/{hung_pid}").exists() or "Z" in Path(f"/proc/{hung_pid}/stat").read_text().split()[2]


def test_a_worker_keeps_no_file_open_in_the_output_folder(toy, tmp_path):
    spec, settings = toy
    run_request(spec, request(tmp_path, "a"), settings, tmp_path / "logs")
    pid = int(loads(tmp_path)[0])
    open_files = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir() if fd.exists()]
    assert not [f for f in open_files if f.startswith(str(tmp_path))], open_files
    assert os.readlink(f"/proc/{pid}/cwd") != str(tmp_path)
    assert "ready on" in next((tmp_path / "logs").glob("*.log")).read_text(), "its log is still written"


def test_a_model_that_fails_to_load_is_a_config_error(toy, tmp_path):
    spec, settings = toy
    spec = WorkerSpec(TOY, {"record_dir": str(tmp_path), "fail_to_load": True})
    with pytest.raises(ConfigError, match="weights 'nowhere' not found"):
        run_request(spec, request(tmp_path, "a"), settings, tmp_path / "logs")


def test_an_idle_worker_exits_and_the_next_job_starts_another(toy, tmp_path):
    spec, settings = toy
    settings = WorkerSettings(**{**settings.__dict__, "idle_timeout_s": 1})
    run_request(spec, request(tmp_path, "a"), settings, tmp_path / "logs")
    first = int(loads(tmp_path)[0])
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and list((tmp_path / "sockets").glob("*.sock")):
        time.sleep(0.1)
    assert not list((tmp_path / "sockets").glob("*.sock")), "the idle worker removed its socket"
    run_request(spec, request(tmp_path, "b"), settings, tmp_path / "logs")
    assert int(loads(tmp_path)[1]) != first


def test_different_settings_get_different_workers(toy, tmp_path):
    spec, settings = toy
    run_request(spec, request(tmp_path, "a"), settings, tmp_path / "logs")
    other = WorkerSpec(TOY, {"record_dir": str(tmp_path), "model": "other"})
    run_request(other, request(tmp_path, "b"), settings, tmp_path / "logs")
    assert len(set(loads(tmp_path))) == 2


def test_disabled_workers_run_in_process(toy, tmp_path):
    spec, settings = toy
    settings = WorkerSettings(enabled=False)
    import sys

    sys.path.insert(0, str(REPO / "tests"))
    run_request(spec, request(tmp_path, "a"), settings, tmp_path / "logs")
    assert loads(tmp_path) == [str(os.getpid())]


def test_model_stages_write_the_same_outputs_through_a_worker(tmp_path, monkeypatch):
    """The real features and SS-latent services: through one worker (one model load for two
    assets) and in-process, the outputs are equal."""
    from dataclasses import asdict

    import numpy as np

    from features_fixtures import write_synthetic_asset
    from latents_fixtures import TINY_SS_ARGS
    from slatflow.feature_settings import FeatureSettings
    from slatflow.features import FeatureJob
    from slatflow.latents import LatentJob, run_latent_job

    monkeypatch.setenv("PYTHONPATH", str(REPO))
    sockets = Path(tempfile.mkdtemp(prefix="sfw", dir="/tmp"))
    through_worker = WorkerSettings(socket_dir=str(sockets), idle_timeout_s=60)
    in_process = WorkerSettings(enabled=False)
    shas = ["1" * 64, "2" * 64]
    inputs = {sha: write_synthetic_asset(tmp_path, sha, num_views=3, resolution=64) for sha in shas}
    stages = {
        "features": (
            asdict(FeatureSettings(model="dinov2_vits14_reg", weights="random", image_size=56, device="cpu", decode_workers=1)),
            lambda sha, out, submit: submit(FeatureJob(sha, inputs[sha][0], inputs[sha][1], Path(out)).to_request()),
        ),
        "ss_latent": (  # the job reads the voxels and writes the latent; the worker runs the model
            {"latents": {"ss_encoder": "random", "random_ss_args": TINY_SS_ARGS, "device": "cpu"}, "threads": 1},
            lambda sha, out, submit: run_latent_job("ss", LatentJob(sha, inputs[sha][1], Path(out)), submit),
        ),
    }
    try:
        for stage, (settings, run_job) in stages.items():
            spec = WorkerSpec(stage, settings)
            for sha in shas:
                for mode, worker_settings in (("worker", through_worker), ("inproc", in_process)):
                    out = str(tmp_path / stage / mode / f"{sha}.npz")
                    run_job(sha, out, lambda request: run_request(spec, request, worker_settings, tmp_path / "logs"))
            for sha in shas:
                with np.load(tmp_path / stage / "worker" / f"{sha}.npz") as a, np.load(
                    tmp_path / stage / "inproc" / f"{sha}.npz"
                ) as b:
                    assert sorted(a.files) == sorted(b.files)
                    for key in a.files:
                        assert np.array_equal(a[key], b[key]), (stage, key)
        worker_logs = {p.name.split("-")[0]: p.read_text() for p in (tmp_path / "logs").glob("*.log")}
        assert set(worker_logs) == {"features", "ss_latent"}
        assert worker_logs["features"].count("RANDOM WEIGHTS") >= 1
        assert worker_logs["ss_latent"].count("on cpu, torso") == 1, "placed once for both assets"
        assert worker_logs["ss_latent"].count("ready on") == 1
    finally:
        stop_workers(sockets)
