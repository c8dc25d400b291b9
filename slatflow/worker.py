"""Model workers: one loaded model serves the per-asset jobs of a machine.

Every Snakemake job is a fresh process, and loading DINOv2 or the TRELLIS encoders (and
starting CUDA) costs seconds per job: more than an asset's GPU work. So a job of a model
stage hands its asset to a worker process that keeps the model loaded. The first job on a
machine starts the worker; later jobs find it by its Unix socket; it exits once it has
been idle for `idle_timeout_s`. Outputs, per-asset logs and quarantine are the same as
in-process: the worker runs the same service function, streams its log lines for the
asset back into the job's log, and relays an `AssetError` with its reason.

A worker is keyed by its service, its settings, the visible GPUs and the SLURM job, so a
different model or GPU gets a worker of its own, and a worker never outlives its SLURM
allocation's jobs (SLURM ends it with the allocation).

A service is a factory `make(settings: dict) -> handler(request: dict) -> dict | None` (a
JSON-serialisable summary for the job, or None), named `"module:function"` (see SERVICES);
the handler raises `AssetError` for a bad asset. Numpy arrays among the top-level values of a
request or a result travel as their raw bytes after the message's JSON line (a job reads its
asset's input and writes its output, in its own process, and the worker only runs the model:
see `slatflow.latents`); a handler's `allocate(nbytes)` says where a request's arrays land
(pinned memory, say). A handler with a `concurrency` attribute
n > 1 is thread-safe and serves up to n requests at once, each in its own thread: so one
asset's inputs are read and its outputs written while another's runs on the GPU (the jobs
of a model stage may then run side by side).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from slatflow.errors import AssetError, ConfigError, TransientError
from slatflow.io import file_lock
from slatflow.logs import LOG_FORMAT
from slatflow.stages import worker_services

logger = logging.getLogger(__name__)

# service name -> "module:function" of its handler: the stage table's (slatflow.stages)
SERVICES = worker_services()

Handler = Callable[[dict], None]
Allocate = Callable[[int], "np.ndarray"]


@dataclass(frozen=True)
class WorkerSettings:
    """The config's `workers:` section.

    Attributes:
        enabled: hand assets to a worker; false runs every job in-process (loads per job).
        idle_timeout_s: a worker exits after this long without a request.
        start_timeout_s: how long a job waits for a new worker to load its model.
        request_timeout_s: how long a job waits for its asset; then the worker is killed.
        socket_dir: where sockets live; empty: $SLATFLOW_WORKER_DIR or /tmp/slatflow-<uid>.
    """

    enabled: bool = True
    idle_timeout_s: float = 300.0
    start_timeout_s: float = 900.0
    request_timeout_s: float = 3600.0
    socket_dir: str = ""

    @classmethod
    def from_config(cls, section: dict | None) -> "WorkerSettings":
        return cls(**(section or {}))


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker serves: a service (a SERVICES name or "module:function") and its settings."""

    service: str
    settings: dict = field(default_factory=dict)

    @property
    def factory(self) -> str:
        return SERVICES.get(self.service, self.service)

    def key(self) -> str:
        """Who may share a worker: same service, settings and code, same GPUs and SLURM job."""
        identity = {
            **asdict(self),
            "code": _code_fingerprint(),
            "python": sys.executable,
            "gpus": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "slurm_job": os.environ.get("SLURM_JOB_ID"),
        }
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        return f"{self.service.replace(':', '_').replace('.', '_')[-24:]}-{digest}"


def _code_fingerprint() -> str:
    """Names, sizes and mtimes of slatflow's modules: an edited library gets a new worker."""
    package = Path(__file__).parent
    stats = sorted((str(p.relative_to(package)), p.stat().st_size, p.stat().st_mtime_ns) for p in package.rglob("*.py"))
    return hashlib.sha256(repr(stats).encode()).hexdigest()[:16]


def make_handler(spec: WorkerSpec) -> Handler:
    """Import the service's factory and build its handler (loads the model)."""
    module_name, _, function_name = spec.factory.partition(":")
    if not function_name:
        raise ConfigError(f"worker service {spec.service!r} is not a SERVICES name or 'module:function'")
    return getattr(importlib.import_module(module_name), function_name)(spec.settings)


def socket_dir(settings: WorkerSettings) -> Path:
    # Unix socket paths are limited to ~107 bytes, so not a deep per-job TMPDIR.
    folder = Path(settings.socket_dir or os.environ.get("SLATFLOW_WORKER_DIR") or f"/tmp/slatflow-{os.getuid()}")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder


# --- client --------------------------------------------------------------------------------


def run_request(
    spec: WorkerSpec, request: dict, settings: WorkerSettings, log_dir: str | os.PathLike
) -> dict | None:
    """Process one asset's request, in a worker (started if needed) or in-process.

    Args:
        spec: the service and its settings.
        request: the service's description of the asset (JSON-serialisable).
        settings: the `workers:` config.
        log_dir: where a worker started by this call writes its log (`<key>.log`).

    Returns:
        what the service's handler returned (a JSON-serialisable summary, or None).

    Raises:
        AssetError: the asset failed (its reason as the service gave it).
        TransientError: the worker died or timed out on it (not the asset's fault).
        ConfigError: the worker could not start (its model failed to load).
    """
    if not settings.enabled:
        return make_handler(spec)(request)
    key = spec.key()
    folder = socket_dir(settings)
    path = folder / f"{key}.sock"
    worker_log = Path(log_dir).absolute() / f"{key}.log"
    sha256 = str(request.get("sha256", "?"))
    for _ in range(3):  # a worker that is exiting (idle, or retired) may refuse the request
        connection = _connect(path)
        if connection is None:
            with file_lock(folder / f"{key}.lock"):
                connection = _connect(path) or _start_worker(spec, path, settings, worker_log)
        with connection:
            done = _exchange(connection, request, sha256, path, settings.request_timeout_s, worker_log)
            if done is not None:
                return done.get("result")
    raise TransientError(f"no model worker accepted the asset after 3 tries (log: {worker_log})")


def _connect(path: Path) -> socket.socket | None:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        client.close()
        return None
    return client


def _start_worker(spec: WorkerSpec, path: Path, settings: WorkerSettings, worker_log) -> socket.socket:
    """Start a worker (in a session of its own, so it outlives this job) and connect."""
    path.unlink(missing_ok=True)  # a socket left by a killed worker
    Path(worker_log).parent.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "slatflow.worker", "--socket", str(path), "--log", str(worker_log),
        "--idle-timeout", str(settings.idle_timeout_s), "--spec", json.dumps(asdict(spec)),
    ]  # fmt: skip
    logger.info("starting a %s worker (log: %s)", spec.service, worker_log)
    # stdout (what native code prints) beside the socket, not in the output folder (see _LogPerRecord)
    with open(_output_path(path), "w") as output:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + settings.start_timeout_s
    while time.monotonic() < deadline:
        connection = _connect(path)
        if connection is not None:
            return connection
        if process.poll() is not None:
            raise ConfigError(
                f"the {spec.service} worker exited while loading (code {process.returncode}): "
                f"{_last_line(_output_path(path))} (log: {worker_log})"
            )
        time.sleep(0.1)
    process.kill()
    raise ConfigError(f"the {spec.service} worker did not start in {settings.start_timeout_s:.0f} s (log: {worker_log})")


def _output_path(socket_path: Path) -> Path:
    return socket_path.with_suffix(".out")


def _last_line(path) -> str:
    lines = [line for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"


def _exchange(
    connection: socket.socket, request: dict, sha256: str, path: Path, timeout: float, worker_log: Path
) -> dict | None:
    """Send the request; copy the worker's log lines into this job's log; raise its error.

    Returns:
        the worker's "done" message; None when it closed before accepting the request.
    """
    connection.settimeout(timeout)
    stream = connection.makefile("rwb")
    accepted = False
    try:
        _write_message(stream, *_split_arrays(request))
        for line in stream:
            message = json.loads(line)
            if "accepted" in message:
                accepted = True
            elif "log" in message:
                logging.getLogger(message.get("name", "slatflow.worker")).log(message["level"], "%s", message["log"])
            elif "done" in message:
                error = message["error"]
                if error is None:
                    message["result"] = _read_arrays(stream, message.pop("arrays", ()), message["result"])
                    return message
                if error["kind"] == "config":
                    raise ConfigError(error["reason"])
                if error["kind"] == "asset":
                    raise AssetError(sha256, error["reason"])
                raise AssetError(sha256, f"{error['reason']} (in the model worker)")
    except TimeoutError:  # a model's time per asset is bounded: a hang is the machine's (a stuck GPU)
        _kill_worker(path)
        raise TransientError(f"timed out after {timeout:.0f} s in the model worker, which was stopped") from None
    except ConnectionError:
        pass  # the worker went away: retried if it had not accepted the request
    if not accepted:
        return None
    raise TransientError(f"the model worker died while processing it (log: {worker_log})")


def _split_arrays(values: dict) -> tuple[dict, dict[str, np.ndarray]]:
    """(the JSON part of a message's values, its numpy arrays)."""
    arrays = {key: _contiguous(value) for key, value in values.items() if _is_array(value)}
    return {key: value for key, value in values.items() if key not in arrays}, arrays


def _write_message(stream, head: dict, arrays: dict[str, np.ndarray] | None = None) -> None:
    """`head` as a JSON line naming `arrays`, then their bytes in order (from their own memory)."""
    if arrays:
        head = {**head, "arrays": [[key, value.dtype.str, list(value.shape)] for key, value in arrays.items()]}
    stream.write(json.dumps(head).encode() + b"\n")
    for value in (arrays or {}).values():
        stream.write(memoryview(value.reshape(-1).view(np.uint8)))
    stream.flush()


def _read_arrays(stream, described, into: dict | None, allocate: Allocate | None = None) -> dict | None:
    """Read the arrays a message's `arrays` entry describes into `into` (a new dict if None)."""
    if not described:
        return into
    into = dict(into or {})
    for key, dtype, shape in described:
        dtype = np.dtype(dtype)
        if dtype.hasobject:
            raise ValueError(f"array {key!r} holds Python objects")
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        data = (allocate or _plain_buffer)(size)
        view, filled = memoryview(data)[:size], 0
        while filled < size:
            read = stream.readinto(view[filled:])
            if not read:
                raise ConnectionResetError(f"the message ended inside array {key!r}")
            filled += read
        into[key] = data[:size].view(dtype).reshape(shape)
    return into


def _is_array(value) -> bool:
    return isinstance(value, (np.ndarray, np.generic))  # a numpy scalar travels as a 0-d array


def _contiguous(value) -> np.ndarray:
    array = np.asarray(value)  # np.ascontiguousarray would make a 0-d array 1-d
    return array if array.flags.c_contiguous else array.copy(order="C")


def _plain_buffer(size: int) -> np.ndarray:
    return np.empty(size, np.uint8)


def _kill_worker(path: Path) -> None:
    pid_file = path.with_suffix(".pid")
    with contextlib.suppress(OSError, ValueError):
        os.killpg(int(pid_file.read_text()), signal.SIGKILL)
    path.unlink(missing_ok=True)


# --- server --------------------------------------------------------------------------------


class _LogPerRecord(logging.FileHandler):
    """Opens the log file for each record: a worker outlives the run that started it, and a
    file it kept open in that run's output folder would stop the folder's filesystem from
    being unmounted until the worker exits."""

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        self.close()


class _StreamToClient(logging.Handler):
    """Sends the log records of the request being served to its job (with requests served
    at once, only the records of the thread serving it)."""

    def __init__(self, stream, thread: int | None = None):
        super().__init__()
        self.stream = stream
        if thread is not None:
            self.addFilter(lambda record: record.thread == thread)

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(OSError):
            line = {"log": record.getMessage(), "level": record.levelno, "name": record.name}
            self.stream.write(json.dumps(line).encode() + b"\n")
            self.stream.flush()


_SERVING = [False]


def serving() -> bool:
    """Whether this process is a model worker (its handler will serve many assets): what a
    service asks before paying a one-off cost, such as torch.compile, that only pays over many."""
    return _SERVING[0]


def serve(spec: WorkerSpec, path: Path, idle_timeout: float) -> None:
    """Load the service, then answer requests on `path` one at a time until idle."""
    _SERVING[0] = True
    handler = make_handler(spec)  # before listening: a connectable socket means loaded
    path.with_suffix(".pid").write_text(str(os.getpgid(0)))
    tmp = Path(tempfile.mktemp(prefix=".", suffix=".sock", dir=path.parent))
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(tmp))
    server.listen(64)
    os.replace(tmp, path)
    own_socket = os.stat(path).st_ino
    server.settimeout(idle_timeout)
    concurrency = max(1, int(getattr(handler, "concurrency", 1)))
    logger.info("%s worker ready on %s (pid %d, %d request(s) at once)", spec.service, path, os.getpid(), concurrency)
    free = threading.Semaphore(concurrency)  # accept only while a request slot is free
    healthy = threading.Event()
    healthy.set()
    in_flight = [0]  # requests being served
    counter_lock = threading.Lock()

    def retire() -> None:  # stop taking requests before the job hears of the error
        logger.error("exiting after an unexpected error, so the next job gets a fresh worker")
        healthy.clear()
        server.close()

    def serve_connection(connection: socket.socket) -> None:
        try:
            with connection:
                _serve_one(handler, connection, retire, concurrency > 1)
        finally:
            with counter_lock:
                in_flight[0] -= 1
            free.release()

    served = 0
    try:
        with ThreadPoolExecutor(concurrency, thread_name_prefix="request") as pool:
            while healthy.is_set():
                free.acquire()
                try:
                    connection, _ = server.accept()
                except TimeoutError:
                    free.release()
                    if in_flight[0] == 0:
                        logger.info("idle for %.0f s after %d request(s): exiting", idle_timeout, served)
                        return
                    continue
                except OSError:  # closed by retire()
                    free.release()
                    return
                served += 1
                with counter_lock:
                    in_flight[0] += 1
                if concurrency == 1:  # on the thread that made the handler: a GL context is bound to it
                    serve_connection(connection)
                else:
                    pool.submit(serve_connection, connection)
    finally:
        server.close()
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == own_socket:  # not a newer worker's socket
                path.unlink()
                path.with_suffix(".pid").unlink(missing_ok=True)


def _serve_one(handler: Handler, connection: socket.socket, retire: Callable[[], None], threaded: bool = False) -> bool:
    """Serve one request; False after an unexpected error (the process may be unhealthy).

    Args:
        threaded: requests are served at once: relay only this thread's log records.
    """
    stream = connection.makefile("rwb")
    try:
        request = json.loads(stream.readline())
        request = _read_arrays(stream, request.pop("arrays", ()), request, getattr(handler, "allocate", None))
        stream.write(b'{"accepted": true}\n')
        stream.flush()
    except (ValueError, OSError):
        return True
    to_client = _StreamToClient(stream, threading.get_ident() if threaded else None)
    to_client.setLevel(logging.INFO)
    logging.getLogger().addHandler(to_client)
    error, healthy, result = None, True, None
    try:
        result = handler(request)
    except AssetError as exc:
        error = {"reason": exc.reason, "kind": "asset"}
    except ConfigError as exc:
        error = {"reason": str(exc), "kind": "config"}
    except Exception as exc:  # noqa: BLE001 - relayed to the job, which quarantines the asset
        logger.exception("request %s failed", request.get("sha256"))
        error, healthy = {"reason": f"{type(exc).__name__}: {exc}", "kind": "crash"}, False
    finally:
        logging.getLogger().removeHandler(to_client)
    if not healthy:
        retire()
    summary, arrays = _split_arrays(result) if isinstance(result, dict) else (result, None)
    with contextlib.suppress(OSError):
        _write_message(stream, {"done": True, "error": error, "result": summary}, arrays)
    return healthy


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="slatflow model worker (started by jobs, not by hand)")
    parser.add_argument("--spec", required=True, help="WorkerSpec as JSON")
    parser.add_argument("--socket", required=True, type=Path)
    parser.add_argument("--log", type=Path, help="the worker's log file (default: stdout)")
    parser.add_argument("--idle-timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    handlers = [_LogPerRecord(args.log, delay=True)] if args.log else None
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, force=True, handlers=handlers)
    spec = WorkerSpec(**json.loads(args.spec))
    try:
        serve(spec, args.socket, args.idle_timeout)
    except Exception as exc:  # noqa: BLE001 - the starting job reads this last line
        logger.exception("worker failed")
        print(f"{type(exc).__name__}: {exc}", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
