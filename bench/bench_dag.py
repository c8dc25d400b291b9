"""Snakemake's planning cost against the number of assets, with slatflow's real rules.

For each size it makes a folder of N tiny distinct assets, ingests it (a real run of the
`metadata` target), then measures:
- the dry-run of `all` (`-n -q rules`): wall time and peak memory of the snakemake process;
- one remote-style job (`--target-jobs`, as the SLURM plugin starts each job): the time
  from its start until Snakemake has parsed the Snakefile and built the job's DAG (run
  with `-n`, so the job itself does not execute).

Usage: .venv/bin/python bench/bench_dag.py [--sizes 1000 5000 20000] [--work DIR]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def make_assets(folder: Path, count: int) -> None:
    """`count` distinct one-triangle OBJ files (distinct bytes, so distinct sha256s)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        path = folder / f"{i // 1000:03d}" / f"a{i:06d}.obj"
        path.parent.mkdir(exist_ok=True)
        path.write_text(f"# asset {i}\nv 0 0 0\nv 1 0 0\nv 0 1 {i % 7}\nf 1 2 3\n")


def timed(cmd: list[str]) -> tuple[float, float, subprocess.CompletedProcess]:
    """Wall seconds and peak RSS (MB) of `cmd`, measured with GNU time."""
    start = time.perf_counter()
    result = subprocess.run(
        ["/usr/bin/time", "-f", "MAXRSS_KB=%M", *cmd], cwd=REPO, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    rss_kb = [int(line.split("=")[1]) for line in result.stderr.splitlines() if line.startswith("MAXRSS_KB=")]
    return wall, (rss_kb[-1] / 1024 if rss_kb else float("nan")), result


def first_job_rule(dry_run_output: str) -> str:
    """A per-asset rule of the dry-run's job table (one with the most jobs)."""
    rows = []
    for line in dry_run_output.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] not in ("total", "all", "job"):
            rows.append((int(parts[1]), parts[0]))
    return max(rows)[1]


def bench_size(work: Path, count: int) -> dict:
    root = work / f"n{count}"
    if root.exists():
        shutil.rmtree(root)
    make_assets(root / "assets", count)
    config = {"output_dir": str(root / "out"), "source": {"type": "local", "path": str(root / "assets")}}
    configfile = root / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    base = ["--configfile", str(configfile)]

    ingest = subprocess.run(SNAKEMAKE + ["metadata", *base], cwd=REPO, capture_output=True, text=True)
    if ingest.returncode != 0:
        raise RuntimeError(ingest.stderr[-3000:])
    wall, rss, dry = timed(SNAKEMAKE + ["all", "-n", "-q", "rules", *base])
    if dry.returncode != 0:
        raise RuntimeError(dry.stdout[-3000:] + dry.stderr[-3000:])
    totals = [int(p[1]) for p in (line.split() for line in dry.stdout.splitlines()) if len(p) == 2 and p[0] == "total"]
    jobs = totals[0]  # the dry-run prints its job table twice

    rule = first_job_rule(dry.stdout)
    sha = pd.read_csv(root / "out" / "manifest.csv", usecols=["sha256"])["sha256"].iloc[0]
    remote = SNAKEMAKE + [
        "--target-jobs", f"{rule}:sha256={sha}", "--allowed-rules", rule, "--cores", "1",
        "--nolock", "--ignore-incomplete", "--scheduler", "greedy", "--mode", "remote", "-n", *base,
    ]  # fmt: skip
    remote_wall, remote_rss, remote_run = timed(remote)
    if remote_run.returncode != 0:
        raise RuntimeError(remote_run.stdout[-3000:] + remote_run.stderr[-3000:])
    return {
        "assets": count,
        "dry_run_jobs": jobs,
        "dry_run_s": round(wall, 1),
        "dry_run_peak_mb": round(rss),
        "ms_per_job": round(1000 * wall / max(jobs, 1), 2),
        "remote_job_rule": rule,
        "remote_job_start_s": round(remote_wall, 2),
        "remote_job_peak_mb": round(remote_rss),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--work", type=Path, default=REPO / "bench" / "out" / "dag")
    args = parser.parse_args()
    rows = [bench_size(args.work, n) for n in args.sizes]
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
