"""Planning cost at dataset scale: slatflow's real rules against Snakemake's own floor.

For each size it makes a folder of N tiny distinct assets and ingests it (a real run of the
`metadata` target), then measures, each side by side with a minimal Snakefile of the same
job count (the floor: per asset a chain of as many `shell:` rules as the target has jobs per
asset, one aggregate rule, one target; the same asset list, no checkpoint, no functions):
- the dry-run of each target (`-n -q rules`): CPU and wall time, peak memory of the process;
  a second floor gives each per-asset rule the directives slatflow's rules have (log,
  benchmark, conda, threads, a resource, params, script): what those cost Snakemake itself
  (`directives_ratio`), against `cpu_ratio`, which is ours against the bare floor;
- one remote-style job (`--target-jobs`, as the SLURM plugin starts each job, with `-n` so
  the job itself does not run): the time from its start until Snakemake has parsed the
  Snakefile and built the job's DAG, with a manifest of `--remote-rows` rows (the real
  assets plus synthetic rows appended), against the floor's parse of as many assets.

`--profile` also runs each dry-run of ours once more under cProfile (WORK/<target>_<n>.prof)
and prints where its time goes, by area (see `AREAS`).

Usage: .venv/bin/python bench/bench_dag.py [--sizes 5000 20000] [--targets features all]
       [--remote-rows 500000] [--profile] [--work DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import pstats
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
TIMEOUT_S = 3600  # a 20k-asset dry-run of `all` took 250 s before this benchmark's cuts

# Where a dry-run's time goes: area -> substrings of the profiled functions' "file:line(name)".
# Cumulative times overlap (an input function runs inside DAG construction), so each area
# is read on its own against the total. Line numbers are Snakemake 9.27.1's.
AREAS = {
    "DAG construction (dag.update, new jobs)": ["dag.py:1159(update)"],
    "checkpoint re-evaluation": ["(update_checkpoint_dependencies)"],
    "postprocess (needrun, script checks, ...)": ["dag.py:1960(postprocess)"],
    "needrun (mtimes, params, metadata reads)": ["dag.py:1411(update_needrun)"],
    "script source checks (per script: job)": ["script/__init__.py:1361(get_source)"],
    "input functions (ours and Snakemake's)": ["rules.py:659(apply_input_function)"],
    "resources (per job, inspect.signature)": ["rules.py:1066(expand_resources)"],
    "inspect.signature (all callers)": ["inspect.py:3278(signature)"],
    "params evaluation": ["rules.py:936(expand_params)"],
    "Snakefile parse (config checks, includes)": ["workflow.py:1690(include)"],
    "job printing (log_info)": ["jobs.py:1061(log_info)"],
    "slatflow's common.smk functions": ["rules/common.smk:"],
}


def make_assets(folder: Path, count: int) -> None:
    """`count` distinct one-triangle OBJ files (distinct bytes, so distinct sha256s)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        path = folder / f"{i // 1000:03d}" / f"a{i:06d}.obj"
        path.parent.mkdir(exist_ok=True)
        path.write_text(f"# asset {i}\nv 0 0 0\nv 1 0 0\nv 0 1 {i % 7}\nf 1 2 3\n")


def timed(cmd: list[str], cwd: Path = REPO) -> tuple[float, float, float, subprocess.CompletedProcess]:
    """Wall seconds, CPU seconds (user + system) and peak RSS (MB) of `cmd`, from GNU time.
    CPU time is the figure to compare on a shared machine: other processes stretch the wall
    time of both sides of a comparison by different amounts."""
    start = time.perf_counter()
    result = subprocess.run(
        ["/usr/bin/time", "-f", "TIME_STATS %M %U %S", *cmd], cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    stats = [line.split()[1:] for line in result.stderr.splitlines() if line.startswith("TIME_STATS ")][-1]
    rss_kb, user, system = int(stats[0]), float(stats[1]), float(stats[2])
    return wall, user + system, rss_kb / 1024, result


def job_table(dry_run_output: str) -> dict[str, int]:
    """rule -> job count of a dry-run's first job table (it prints the table twice)."""
    table: dict[str, int] = {}
    for line in dry_run_output.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] != "job":
            if parts[0] == "total":
                return table
            table[parts[0]] = int(parts[1])
    return table


FLOOR_SNAKEFILE = '''\
# Snakemake's floor: the same job count as the measured target, nothing of slatflow's.
SHA256S = open(config["list"]).read().split()


rule all:
    input:
        "out/aggregate.txt",


rule aggregate:
    input:
        lambda wildcards: expand("out/s{{stage}}/{{sha256}}.txt", stage=range(1, {stages} + 1), sha256=SHA256S),
    output:
        "out/aggregate.txt",
    shell:
        "touch {{output}}"
{stage_rules}
'''

FLOOR_STAGE = '''

rule stage_{k}:
    input:
        "{input}",
    output:
        "out/s{k}/{{sha256}}.txt",
{directives}'''

# The directives every per-asset rule of slatflow has, for the floor that shows what they
# cost Snakemake: a log, a benchmark, a conda env, threads, a constant resource, a params
# dict and a script (checked by Snakemake per job).
OUR_DIRECTIVES = '''\
    log:
        "logs/s{k}/{{sha256}}.log",
    benchmark:
        "benchmarks/s{k}/{{sha256}}.tsv"
    conda:
        "envs/floor.yaml"
    threads: 1
    resources:
        gpu_slot=0,
    params:
        settings={{"resolution": 64, "names": ["a", "b"]}},
    script:
        "scripts/touch.py"
'''
BARE_DIRECTIVES = '''\
    shell:
        "touch {{output}}"
'''


def write_floor(folder: Path, sha256s: list[str], stages: int, our_directives: bool = False) -> Path:
    """A minimal workflow of `stages` jobs per asset, plus an aggregate and a target; with
    `our_directives`, each per-asset rule has the directives slatflow's rules have."""
    folder.mkdir(parents=True, exist_ok=True)
    directives = OUR_DIRECTIVES if our_directives else BARE_DIRECTIVES
    stage_rules = "".join(
        FLOOR_STAGE.format(
            k=k,
            input="assets/{sha256}.txt" if k == 1 else f"out/s{k - 1}/{{sha256}}.txt",
            directives=directives.format(k=k),
        )
        for k in range(1, stages + 1)
    )
    (folder / "Snakefile").write_text(FLOOR_SNAKEFILE.format(stages=stages, stage_rules=stage_rules))
    for sub, name, text in [
        ("scripts", "touch.py", "from pathlib import Path\n\nPath(snakemake.output[0]).touch()\n"),
        ("envs", "floor.yaml", "channels: [conda-forge]\ndependencies: [python=3.11]\n"),
    ]:
        (folder / sub).mkdir(exist_ok=True)
        (folder / sub / name).write_text(text)
    (folder / "assets").mkdir(exist_ok=True)
    for sha in sha256s:
        (folder / "assets" / f"{sha}.txt").touch()
    (folder / "list.txt").write_text("\n".join(sha256s) + "\n")
    return folder


def floor_cmd(folder: Path, *args: str) -> list[str]:
    return SNAKEMAKE + ["-s", str(folder / "Snakefile"), "-d", str(folder), "--config", "list=list.txt", *args]


def area_times(profile: Path) -> dict[str, float]:
    """Cumulative seconds per area of `AREAS` (the largest matching entry, not the sum:
    recursive and nested entries would count twice), and the profile's total."""
    stats = pstats.Stats(str(profile)).stats  # (file, line, name) -> (cc, nc, tt, ct, callers)
    keyed = {f"{file}:{line}({name})": ct for (file, line, name), (_, _, _, ct, _) in stats.items()}
    result = {"total (profiled)": max(keyed.values())}
    for area, needles in AREAS.items():
        hits = [ct for key, ct in keyed.items() if any(n in key for n in needles)]
        if "rules/common.smk:" in needles:
            # top-level functions of common.smk: count those not called by another of them
            hits = [
                ct
                for (file, line, name), (_, _, _, ct, callers) in stats.items()
                if file.endswith("rules/common.smk") and not any(c[0].endswith("common.smk") for c in callers)
            ]
            result[area] = sum(hits)
            continue
        result[area] = max(hits, default=0.0)
    return result


def synthetic_manifest(manifest: Path, rows: int) -> None:
    """Append synthetic rows (sha256s of counters, paths that do not exist) up to `rows`;
    the real rows stay first."""
    table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    extra = rows - len(table)
    if extra <= 0:
        return
    fake = pd.DataFrame(
        {column: [""] * extra for column in table.columns}
    )
    fake["sha256"] = [hashlib.sha256(f"synthetic {i}".encode()).hexdigest() for i in range(extra)]
    fake["file_identifier"] = [f"synthetic/{i}.glb" for i in range(extra)]
    fake["captions"] = '["a synthetic asset with a caption of about TRELLIS-500K\'s length"]'
    fake["local_path"] = [f"../synthetic/{i:07d}/model.glb" for i in range(extra)]
    fake["size"], fake["mtime_ns"] = "1000", "0"
    pd.concat([table, fake]).to_csv(manifest, index=False)


def remote_job(configfile: Path, root: Path, rule: str, sha: str) -> list[str]:
    """The command the SLURM plugin runs for one job, as a dry-run."""
    return SNAKEMAKE + [
        "--target-jobs", f"{rule}:sha256={sha}", "--allowed-rules", rule, "--cores", "1",
        "--nolock", "--ignore-incomplete", "--scheduler", "greedy", "--mode", "remote", "-n",
        "--configfile", str(configfile),
    ]  # fmt: skip


def ingest(root: Path, count: int) -> Path:
    """`count` assets under root/assets, ingested into root/out; returns the config file."""
    if root.exists():
        shutil.rmtree(root)
    make_assets(root / "assets", count)
    config = {"output_dir": str(root / "out"), "source": {"type": "local", "path": str(root / "assets")}}
    configfile = root / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    timed(SNAKEMAKE + ["metadata", "--configfile", str(configfile)])
    return configfile


def bench_size(work: Path, count: int, targets: list[str], profile: bool) -> list[dict]:
    root = work / f"n{count}"
    configfile = ingest(root, count)
    sha256s = pd.read_csv(root / "out" / "manifest.csv", usecols=["sha256"], dtype=str)["sha256"].tolist()
    rows = []
    for target in targets:
        dry = SNAKEMAKE + [target, "-n", "-q", "rules", "--configfile", str(configfile)]
        wall, cpu, rss, result = timed(dry)
        prof = work / f"{target}_{count}.prof"
        if profile:  # a run of its own: the profiler slows the code it watches about 2x
            timed([sys.executable, "-m", "cProfile", "-o", str(prof), *dry[1:]])
        table = job_table(result.stdout)
        jobs = sum(table.values())
        per_asset = max(n for n in table.values())  # the per-asset rules have one job per asset
        stages = sum(1 for n in table.values() if n == per_asset)
        floor = write_floor(work / f"floor_{target}_{count}", sha256s, stages)
        floor_wall, floor_cpu, floor_rss, floor_result = timed(floor_cmd(floor, "-n", "-q", "rules"))
        floor_jobs = sum(job_table(floor_result.stdout).values())
        directives = write_floor(work / f"floor_directives_{target}_{count}", sha256s, stages, our_directives=True)
        _, directives_cpu, directives_rss, _ = timed(floor_cmd(directives, "-n", "-q", "rules"))
        row = {
            "target": target,
            "assets": count,
            "jobs": jobs,
            "floor_jobs": floor_jobs,
            "wall_s": round(wall, 1),
            "cpu_s": round(cpu, 1),
            "floor_cpu_s": round(floor_cpu, 1),
            "directives_cpu_s": round(directives_cpu, 1),
            "cpu_ms_per_asset": round(1000 * cpu / count, 2),
            "floor_cpu_ms_per_asset": round(1000 * floor_cpu / count, 2),
            "cpu_ratio": round(cpu / floor_cpu, 2),
            "directives_ratio": round(directives_cpu / floor_cpu, 2),
            "peak_mb": round(rss),
            "floor_peak_mb": round(floor_rss),
            "directives_peak_mb": round(directives_rss),
        }
        if profile:
            row["profile"] = {area: round(s, 1) for area, s in area_times(prof).items()}
        rows.append(row)
    return rows


def bench_remote(work: Path, manifest_rows: int) -> dict:
    """A remote job's start with a manifest of `manifest_rows` rows, against the floor's."""
    root = work / f"remote{manifest_rows}"
    configfile = ingest(root, 3)
    manifest = root / "out" / "manifest.csv"
    sha = pd.read_csv(manifest, usecols=["sha256"], dtype=str)["sha256"].iloc[0]
    synthetic_manifest(manifest, manifest_rows)
    wall, cpu, rss, _ = timed(remote_job(configfile, root, "render_views", sha))
    shas = pd.read_csv(manifest, usecols=["sha256"], dtype=str)["sha256"].tolist()
    floor = write_floor(work / f"floor_remote{manifest_rows}", [], 1)
    (floor / "list.txt").write_text("\n".join(shas) + "\n")
    (floor / "assets" / f"{sha}.txt").touch()
    floor_wall, floor_cpu, floor_rss, _ = timed(
        floor_cmd(floor, "--target-jobs", f"stage_1:sha256={sha}", "--allowed-rules", "stage_1", "--cores", "1",
                  "--nolock", "--scheduler", "greedy", "--mode", "remote", "-n")
    )  # fmt: skip
    return {
        "manifest_rows": manifest_rows,
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "floor_wall_s": round(floor_wall, 2),
        "floor_cpu_s": round(floor_cpu, 2),
        "cpu_ratio": round(cpu / floor_cpu, 2),
        "peak_mb": round(rss),
        "floor_peak_mb": round(floor_rss),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[5000, 20000])
    parser.add_argument("--targets", nargs="+", default=["features", "all"])
    parser.add_argument("--remote-rows", type=int, nargs="*", default=[500000])
    parser.add_argument("--profile", action="store_true", help="cProfile our dry-runs and print where time goes")
    parser.add_argument("--work", type=Path, default=REPO / "bench" / "out" / "dag")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = [row for n in args.sizes for row in bench_size(args.work, n, args.targets, args.profile)]
    profiles = {f"{r['target']} {r['assets']}": r.pop("profile") for r in rows if "profile" in r}
    if rows:
        print(pd.DataFrame(rows).to_string(index=False))
    if profiles:
        print("\nwhere a dry-run's time goes (cumulative s under cProfile; areas overlap):")
        print(pd.DataFrame(profiles).to_string())
    remote = [bench_remote(args.work, n) for n in args.remote_rows]
    if remote:
        print("\none remote job (--target-jobs render_views, -n), against the floor's one job:")
        print(pd.DataFrame(remote).to_string(index=False))


if __name__ == "__main__":
    main()
