"""A real single-node SLURM (Debian's slurmctld + slurmd, munge) in a folder, for tests.

No systemd: every daemon is started by hand in the foreground of a session of its own, its
PID written under `pid/` and stopped by that PID. Nothing outside the folder is written.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CONFIG_DIR = Path("/etc/slurm")
MARKER = "# written by slatflow's tests/slurm: removed when its cluster stops\n"
# What the profile asks of one node (render jobs take 8 CPUs, GPU jobs 16 CPUs and 16 GB):
# the node is declared this large whatever the host has (SlurmdParameters=config_overrides).
NODE_CPUS = 16
NODE_MEMORY_MB = 64000
# squeue keeps a finished job this long: the plugin polls with squeue (profiles/slurm) and
# the test reads every job of a run back from it, so no accounting database is needed.
MIN_JOB_AGE_S = 3600
FIELD = re.compile(r"(\w+)=(\S*)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class SlurmCluster:
    """slurmctld and slurmd on this host with partitions `cpu` (default) and `gpu`.

    The node has one stand-in GPU (`gpu` GRES on a plain file: a GRES given only a count
    registers 0 GPUs and the node is marked invalid), so `--gpus`/`--gres` jobs schedule.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.host = socket.gethostname()
        self.conf = CONFIG_DIR / "slurm.conf"
        self.gres_conf = CONFIG_DIR / "gres.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.processes: dict[str, subprocess.Popen] = {}

    @property
    def env(self) -> dict[str, str]:
        """The environment a SLURM client (sbatch, squeue, Snakemake's plugin) needs."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self, timeout_s: float = 60) -> None:
        for folder in ("munge", "spool", "state", "log", "pid", "dev"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        for path in (self.conf, self.gres_conf):
            if path.exists() and not path.read_text(errors="replace").startswith(MARKER):
                raise RuntimeError(f"{path} exists and is not a test cluster's: this host has a SLURM of its own")
        self._write_config()
        self._spawn(
            "munged",
            ["munged", "--foreground", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
             f"--pid-file={self.root / 'munge' / 'munged.pid'}", f"--log-file={self.root / 'log' / 'munged.log'}",
             f"--seed-file={self.root / 'munge' / 'munged.seed'}"],
        )  # fmt: skip
        self._wait(lambda: self.munge_socket.exists(), "munged's socket", timeout_s)
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: self._run(["scontrol", "ping"]).stdout.count("UP") > 0, "slurmctld", timeout_s)
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.host])
        self._wait(self._node_idle, f"node {self.host} idle", timeout_s)

    def stop(self) -> None:
        """Stop the daemons by their recorded PIDs, slurmd first (it ends its jobs' steps)."""
        for name in reversed(DAEMONS):
            process = self.processes.pop(name, None)
            if process is None or process.poll() is not None:
                continue
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for path in (self.conf, self.gres_conf):
            if path.exists() and path.read_text(errors="replace").startswith(MARKER):
                path.unlink()

    def jobs(self) -> list[dict[str, str]]:
        """Every job the controller still knows (all of them: MinJobAge is an hour), as
        `scontrol show job`'s fields (JobId, JobName, Partition, JobState, TresPerJob, Comment...)."""
        listing = self._run(["scontrol", "--oneliner", "show", "job"], check=True).stdout
        return [dict(FIELD.findall(line)) for line in listing.splitlines() if line.startswith("JobId=")]

    def log(self, name: str) -> str:
        path = self.root / "log" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # --- inner workings ---

    def _write_config(self) -> None:
        gpu_file = self.root / "dev" / "gpu0"
        gpu_file.touch()
        CONFIG_DIR.mkdir(parents=True, exist_ok=True)
        self.gres_conf.write_text(MARKER + f"NodeName={self.host} Name=gpu File={gpu_file}\n")
        root = self.root
        self.conf.write_text(
            MARKER
            + "\n".join(
                [
                    "ClusterName=slatflow",
                    f"SlurmctldHost={self.host}(127.0.0.1)",  # no name lookup needed
                    f"SlurmctldPort={free_port()}",
                    f"SlurmdPort={free_port()}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={self.munge_socket}",
                    f"StateSaveLocation={root / 'state'}",
                    f"SlurmdSpoolDir={root / 'spool'}",
                    f"SlurmctldPidFile={root / 'pid' / 'slurmctld.pid'}",
                    f"SlurmdPidFile={root / 'pid' / 'slurmd.pid'}",
                    f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
                    f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
                    # no cgroups without systemd: processes tracked by parent PID
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_CPU_Memory",
                    "SchedulerType=sched/backfill",
                    "MpiDefault=none",
                    "ReturnToService=2",
                    "SlurmdParameters=config_overrides",
                    "GresTypes=gpu",
                    f"MinJobAge={MIN_JOB_AGE_S}",
                    "KillWait=5",
                    "InactiveLimit=0",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={NODE_CPUS} RealMemory={NODE_MEMORY_MB}"
                    " Gres=gpu:1 State=UNKNOWN",
                    f"PartitionName=cpu Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
                    f"PartitionName=gpu Nodes={self.host} MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )

    def _spawn(self, name: str, command: list[str]) -> None:
        output = open(self.root / "log" / f"{name}.out", "w")
        process = subprocess.Popen(
            command, env=self.env, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        output.close()
        self.processes[name] = process
        (self.root / "pid" / f"{name}.test.pid").write_text(f"{process.pid}\n")

    def _run(self, command: list[str], check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=30, check=check)

    def _node_idle(self) -> bool:
        state = self._run(["sinfo", "--noheader", "--format=%T", "--nodes", self.host]).stdout
        return "idle" in state

    def _wait(self, ready, what: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited ({process.returncode}): {self._tail(name)}")
            if ready():
                return
            time.sleep(0.5)
        raise RuntimeError(f"{what} not ready after {timeout_s:.0f} s: {self._tail('slurmctld')} {self._tail('slurmd')}")

    def _tail(self, name: str) -> str:
        return (self.log(name) + (self.root / "log" / f"{name}.out").read_text(errors="replace"))[-2000:]


def slurm_installed() -> bool:
    return all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "munged", "sbatch", "squeue"))
