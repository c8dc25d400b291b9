"""What a model worker saves per Snakemake job: features of K assets, one job process each.

Every Snakemake job is a fresh Python process. This runs K such processes one after
another, each handing one asset to `slatflow.worker.run_request` as the rule's script does:
- `in-process`: `workers.enabled: false`, so every job imports torch and loads the model;
- `worker`: the first job starts a model worker, the others hand their asset to it.
It reports seconds per asset (job start to job end) for both, and their ratio, on the same
synthetic renders (tests/features_fixtures.py) with random weights.

Usage: python bench/bench_workers.py --device cuda --model dinov2_vitl14_reg --assets 6
       python bench/bench_workers.py --device cpu --model dinov2_vits14_reg --image-size 224 --views 12
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

JOB = """
import json, sys
from slatflow.logs import configure_job_logging
from slatflow.worker import WorkerSettings, WorkerSpec, run_request
spec, request, settings, log_dir, job_log = json.loads(sys.argv[1])
configure_job_logging(job_log)
run_request(WorkerSpec(**spec), request, WorkerSettings(**settings), log_dir)
"""


def run_jobs(mode: str, spec: dict, requests: list[dict], root: Path) -> list[float]:
    settings = {"enabled": mode == "worker", "socket_dir": tempfile.mkdtemp(prefix="sfw", dir="/tmp")}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    seconds = []
    try:
        for i, request in enumerate(requests):
            args = [spec, {**request, "output": str(root / mode / f"{request['sha256']}.npz")}, settings,
                    str(root / "logs" / mode), str(root / "logs" / mode / f"job{i}.log")]  # fmt: skip
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", JOB, json.dumps(args)], env=env, check=True)
            seconds.append(time.perf_counter() - start)
    finally:
        for pid_file in Path(settings["socket_dir"]).glob("*.pid"):
            os.killpg(int(pid_file.read_text()), 15)
    return seconds


def main() -> None:
    from features_fixtures import write_synthetic_asset
    from slatflow.feature_settings import FeatureSettings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="dinov2_vitl14_reg")
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--views", type=int, default=150)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--assets", type=int, default=6)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench_workers"))
    shas = [f"{i + 1:x}" * 64 for i in range(args.assets)]
    requests = []
    for sha in shas:
        render_dir, voxels = write_synthetic_asset(root, sha, num_views=args.views, resolution=args.resolution, workers=8)
        requests.append({"sha256": sha, "render_dir": str(render_dir), "voxels": str(voxels)})
    settings = FeatureSettings(model=args.model, weights="random", image_size=args.image_size, device=args.device)
    spec = {"service": "features", "settings": asdict(settings)}

    results = {mode: run_jobs(mode, spec, requests, root) for mode in ("in-process", "worker")}
    rows = {}
    for mode, seconds in results.items():
        rows[mode] = {"first_job_s": seconds[0], "later_jobs_s_per_asset": sum(seconds[1:]) / max(len(seconds) - 1, 1),
                      "all_s_per_asset": sum(seconds) / len(seconds)}  # fmt: skip
    ratio = rows["in-process"]["later_jobs_s_per_asset"] / rows["worker"]["later_jobs_s_per_asset"]
    print(f"features jobs, {args.model} RANDOM WEIGHTS, {args.views} views {args.resolution}^2 -> {args.image_size}, "
          f"device {args.device}, {args.assets} assets, one process per job")  # fmt: skip
    for mode, row in rows.items():
        print(f"  {mode:10s} first job {row['first_job_s']:6.2f} s   later jobs {row['later_jobs_s_per_asset']:6.2f} s/asset"
              f"   all {row['all_s_per_asset']:6.2f} s/asset")  # fmt: skip
    print(f"  later jobs: worker is {ratio:.1f}x faster per asset")
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "ratio_later_jobs": ratio, "args": vars(args)}, default=str, indent=2))


if __name__ == "__main__":
    main()
