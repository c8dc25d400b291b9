"""The sample through `profiles/slurm` on a real single-node SLURM, as the README says.

Slow (about 10 min on 2 cores) and needs Debian's slurmctld, slurmd and munge: marked `slurm`,
left out of the default test run, run by .ci/run (`pytest -m slurm tests/slurm`). The tests
share one cluster and one output folder and run in file order: the first run, what SLURM saw
of it, a dry-run, then a bad asset and an `scancel` in a second run and their re-run.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from cluster import SlurmCluster, slurm_installed

REPO = Path(__file__).resolve().parents[2]
PROFILE = REPO / "profiles" / "slurm"
pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if not slurm_installed():
        pytest.fail("SLURM is not installed: apt-get install slurmctld slurmd slurm-client munge")
    # slurmd's spool holds Unix sockets: a short path
    root = Path(tempfile.mkdtemp(prefix="slurm", dir="/tmp"))
    slurm = SlurmCluster(root)
    try:
        slurm.start()
        yield slurm
    finally:
        slurm.stop()
        shutil.rmtree(root, ignore_errors=True)


class SampleRun:
    """The sample's config with its assets copied to a folder the test adds to."""

    def __init__(self, root: Path, slurm: SlurmCluster):
        self.root = root
        self.slurm = slurm
        self.assets = root / "assets"
        self.out = root / "out"
        shutil.copytree(REPO / "sample" / "assets", self.assets)
        config = yaml.safe_load((REPO / "config" / "sample.yaml").read_text())
        config.update(output_dir=str(self.out), source={"type": "local", "path": str(self.assets)})
        self.configfile = root / "sample.yaml"
        self.configfile.write_text(yaml.safe_dump(config, sort_keys=False))
        self.worker_dir = Path(tempfile.mkdtemp(prefix="sfw", dir="/tmp"))

    def start(self, *args: str) -> subprocess.Popen:
        """`snakemake features --profile profiles/slurm` as the README says, no conda here."""
        env = {
            **self.slurm.env,
            "HOME": str(self.root),
            "XDG_CACHE_HOME": str(self.root / ".cache"),
            "HF_HUB_OFFLINE": "1",
            "SLATFLOW_WORKER_DIR": str(self.worker_dir),
        }
        command = [
            sys.executable, "-m", "snakemake", "features", "--profile", str(PROFILE),
            "--configfile", str(self.configfile), "--software-deployment-method", "env-modules", *args,
        ]  # fmt: skip
        return subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )  # fmt: skip

    def run(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return finish(self.start(*args), timeout)


def finish(process: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"snakemake did not finish in {timeout:.0f} s: {stderr[-3000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def sample(cluster, tmp_path_factory):
    run = SampleRun(tmp_path_factory.mktemp("sample"), cluster)
    started = time.monotonic()
    run.first = run.run()
    run.first_seconds = time.monotonic() - started
    print(f"the sample's features through profiles/slurm: {run.first_seconds:.0f} s")
    yield run
    for pid_file in run.worker_dir.glob("*.pid"):
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGTERM)
        except (OSError, ValueError):
            pass
    shutil.rmtree(run.worker_dir, ignore_errors=True)


def profile() -> dict:
    return yaml.safe_load((PROFILE / "config.yaml").read_text())


def rule_of(job: dict) -> str:
    """The rule a SLURM job ran: the plugin's comment is `rule_<rule>[_wildcards_<values>]`,
    `rule_<group>_<rule>` for a group's job."""
    match = re.fullmatch(r"rule_(.+?)(_wildcards_.*)?", job["Comment"])
    assert match, job
    name = match.group(1)
    for rule, group in profile()["groups"].items():
        if name == f"{group}_{rule}":
            return rule
    return name


def test_the_sample_runs_through_profiles_slurm(sample):
    assert sample.first.returncode == 0, sample.first.stderr[-5000:]
    from slatflow.ingest import sha256_of_file

    shas = [sha256_of_file(path) for path in sorted(sample.assets.rglob("*")) if _is_asset(path)]
    assert len(shas) == 8
    for sha in shas:
        assert list((sample.out / "features").glob(f"*/{sha}.npz")), sha


def _is_asset(path: Path) -> bool:
    return path.suffix in {".stl", ".obj", ".gltf", ".usdz", ".blend", ".ply", ".fbx", ".glb"}


def test_every_rule_ran_where_the_profile_sends_it(sample):
    assert sample.first.returncode == 0
    settings = profile()
    jobs = sample.slurm.jobs()
    assert jobs, "SLURM saw no job"
    by_rule: dict[str, list[dict]] = {}
    for job in jobs:
        by_rule.setdefault(rule_of(job), []).append(job)
    assert {"render_views", "voxelize_mesh", "extract_features"} <= set(by_rule), sorted(by_rule)
    for rule, rule_jobs in by_rule.items():
        resources = {**settings["default-resources"], **settings["set-resources"].get(rule, {})}
        for job in rule_jobs:
            assert job["JobState"] == "COMPLETED", job
            assert job["Partition"] == resources["slurm_partition"], (rule, job)
            asked_gpus = job.get("TresPerJob", "") in ("gres:gpu:1", "gres/gpu:1")
            assert asked_gpus == bool(resources.get("gpu")), (rule, job.get("TresPerJob"))
    assert any(job["Partition"] == "gpu" for job in jobs) and any(job["Partition"] == "cpu" for job in jobs)


def test_grouped_rules_share_slurm_jobs_and_one_model_worker(sample):
    assert sample.first.returncode == 0
    jobs = sample.slurm.jobs()
    by_rule: dict[str, int] = {}
    for job in jobs:
        by_rule[rule_of(job)] = by_rule.get(rule_of(job), 0) + 1
    # 8 assets; groups of 100 (features, voxelize): one SLURM job each
    assert by_rule["extract_features"] == 1, by_rule
    assert by_rule["voxelize_mesh"] == 1, by_rule
    assert by_rule["render_views"] == 8, by_rule
    worker_logs = sorted((sample.out / "logs").rglob("features-*.log"))
    assert len(worker_logs) == 1, f"one model worker for the job's 8 assets: {worker_logs}"
    served = worker_logs[0].read_text()
    assert served.count("features worker ready") == 1, served[-2000:]
    assert len(re.findall(r"INFO slatflow.features: asset [0-9a-f]{64}: ", served)) == 8, served[-2000:]


def test_a_dry_run_afterwards_has_nothing_to_do(sample):
    assert sample.first.returncode == 0
    dry = sample.run("--dry-run", timeout=300)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "Nothing to be done" in dry.stdout + dry.stderr, (dry.stdout + dry.stderr)[-3000:]


def test_a_bad_asset_is_quarantined_and_a_cancelled_job_is_survived_by_a_rerun(sample):
    """A random-byte glb fails in its render job and is quarantined as locally; the render
    job of a good new asset is `scancel`ed while it runs: Snakemake sees the cancel and stops
    with an error, no record blames the asset, and a re-run finishes it and exits 0."""
    import trimesh

    from slatflow.ingest import sha256_of_file
    from slatflow.quarantine import load_failures

    assert sample.first.returncode == 0
    bad = sample.assets / "broken.glb"
    bad.write_bytes(os.urandom(4096))
    good = sample.assets / "ball.glb"
    trimesh.creation.icosphere(subdivisions=3, radius=0.7).export(good)
    bad_sha, good_sha = sha256_of_file(bad), sha256_of_file(good)

    process = sample.start()
    cancelled = None
    deadline = time.monotonic() + 600
    while cancelled is None and time.monotonic() < deadline and process.poll() is None:
        for job in sample.slurm.jobs():
            if good_sha in job["Comment"] and job["JobState"] == "RUNNING":
                subprocess.run(["scancel", job["JobId"]], env=sample.slurm.env, check=True, timeout=30)
                cancelled = job
        time.sleep(2)
    second = finish(process, timeout=900)
    console = second.stdout + second.stderr
    assert cancelled is not None, f"the new asset's render never ran: {console[-3000:]}"
    assert second.returncode != 0, console[-3000:]
    assert f"SLURM-job '{cancelled['JobId']}' failed" in console and "CANCELLED" in console, console[-3000:]

    failures = {failure.sha256: failure for failure in load_failures(sample.out)}
    assert set(failures) == {bad_sha}, failures
    record = failures[bad_sha]
    assert record.stage == "render" and record.reason and "\n" not in record.reason, record
    assert record.line() in console, "the end of the run has the job's one line (SLURM keeps the job's output)"

    third = sample.run()
    assert third.returncode == 0, third.stderr[-5000:]
    assert list((sample.out / "features").glob(f"*/{good_sha}.npz")), "the re-run finished the asset"
    assert set(failure.sha256 for failure in load_failures(sample.out)) == {bad_sha}
