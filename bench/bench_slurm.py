"""The sample's `features` target through SLURM against the local profile, side by side.

Starts the single-node SLURM of tests/slurm (Debian's slurmctld, slurmd, munge; writes
/etc/slurm/slurm.conf for the run) and runs the bundled sample's `features` target, each in
a fresh output folder, one after another in one run:
- `local`: the local profile (profiles/default), as `snakemake features --configfile`;
- `slurm`: `--profile profiles/slurm` as the README says (no conda here: env-modules);
- `slurm_poll_40s`: the same with the plugin's default first status poll (40 s), which the
  profile lowers; the difference is what the polls cost a chain of dependent jobs.
Prints the wall time of each and its ratio to the local run, and how many SLURM jobs ran.

Usage: .venv/bin/python bench/bench_slurm.py [--variants local slurm slurm_poll_40s] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "slurm"))
from cluster import SlurmCluster  # noqa: E402

VARIANTS = {
    "local": [],
    "slurm": ["--profile", "profiles/slurm", "--software-deployment-method", "env-modules"],
    "slurm_poll_40s": [
        "--profile", "profiles/slurm", "--software-deployment-method", "env-modules",
        "--slurm-init-seconds-before-status-checks", "40",
    ],
}  # fmt: skip


def run_variant(name: str, work: Path, slurm: SlurmCluster) -> dict:
    folder = work / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    config = yaml.safe_load((REPO / "config" / "sample.yaml").read_text())
    config.update(output_dir=str(folder / "out"), source={"type": "local", "path": str(REPO / "sample" / "assets")})
    configfile = folder / "sample.yaml"
    configfile.write_text(yaml.safe_dump(config, sort_keys=False))
    worker_dir = Path(tempfile.mkdtemp(prefix="sfw", dir="/tmp"))
    env = {**slurm.env, "HOME": str(folder), "HF_HUB_OFFLINE": "1", "SLATFLOW_WORKER_DIR": str(worker_dir)}
    jobs_before = len(slurm.jobs())
    command = [sys.executable, "-m", "snakemake", "features", "--configfile", str(configfile), *VARIANTS[name]]
    started = time.monotonic()
    with open(folder / "snakemake.log", "w") as log:
        returncode = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=3600).returncode
    seconds = time.monotonic() - started
    shutil.rmtree(worker_dir, ignore_errors=True)
    return {"variant": name, "rc": returncode, "seconds": seconds, "slurm_jobs": len(slurm.jobs()) - jobs_before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_slurm"))
    slurm = SlurmCluster(Path(tempfile.mkdtemp(prefix="slurm", dir="/tmp")))
    slurm.start()
    try:
        results = [run_variant(name, work, slurm) for name in args.variants]
    finally:
        slurm.stop()
    local = next((r["seconds"] for r in results if r["variant"] == "local"), None)
    print(f"{'variant':16} {'rc':>3} {'seconds':>8} {'vs local':>9} {'SLURM jobs':>11}   ({os.cpu_count()} CPUs)")
    for r in results:
        ratio = f"{r['seconds'] / local:.2f}x" if local else "-"
        print(f"{r['variant']:16} {r['rc']:>3} {r['seconds']:>8.1f} {ratio:>9} {r['slurm_jobs']:>11}")


if __name__ == "__main__":
    main()
