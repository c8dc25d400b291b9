"""Benchmark: a stream of assets through the features, SS and SLat model workers on the GPU.

RANDOM WEIGHTS (no DINOv2/TRELLIS weights exist here; timings do not depend on them).
Synthetic renders as in bench/bench_features.py (a ray-cast textured sphere: 150 views of
512^2 RGBA PNG, ~20k voxels; asset 0 rendered, the others copies under other keys).

The workers are the workflow's: `slatflow.worker.serve` with the stages' request handlers,
fed through `run_request` by client threads, as Snakemake's model jobs feed them (the
default profile runs up to 8 model jobs side by side). The worker runs in this process so that
the profiler sees its kernels: GPU busy = union of the device's kernel and copy intervals
over the stream's wall time (torch.profiler, CUDA activity only), and, beside it, NVML's
utilization sampled every 20 ms.

Reported, in one run (the card is named in the output):
- model only, 150 views on the device: transformers' forward under bf16 autocast (the
  previous path) against the fused forward with each SDPA backend, view batch sizes and,
  with --compile, torch.compile: seconds and TFLOP/s (FLOPs as in bench_features.py);
- per-voxel cosine of the default (bf16, fused) features to float32;
- npz writes: np.savez_compressed (before), then size and seconds per deflate level of
  slatflow's parallel writer, and 4 writers at once; PNG decode of
  150 views on 1 thread and on the decode pool;
- streams through the workers, ms per asset: features before (transformers' forward,
  deflate level 6, one job at a time) and now (one job at a time, then --clients at once,
  then --variants: other requests at once and deflate levels),
  SS and SLat one job at a time and --latent-clients at once (SLat on the features the
  stream wrote, and on --slat-voxels synthetic voxels); GPU busy of the features stream;
  then features, SS and SLat again with each worker a process of its own, started by the
  first request as a job starts it (the workflow's arrangement: the clients hold no GIL the
  worker needs);
- TRELLIS's loop (bench_features.run_trellis) on --trellis-assets assets (the first a
  warm-up) and the ratio to the features stream.

GPU:  PYTHONPATH=. python bench/bench_pipeline_gpu.py --out bench/out/pipeline_gpu
CPU smoke run (tiny models, minutes on 2 cores):
    .venv/bin/python bench/bench_pipeline_gpu.py --device cpu --arch tiny --views 6 --resolution 64 \\
        --radius 0.3 --assets 4 --slat-voxels 2000 --trellis-assets 2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "bench")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_features import cosine, make_assets, run_trellis, vit_flops  # noqa: E402
from features_fixtures import TINY_ARCH, random_official_state_dict, reference_model  # noqa: E402
from latents_fixtures import TINY_SLAT_ARGS, TINY_SS_ARGS, random_patchtokens, surface_voxels  # noqa: E402

from slatflow import features, io, latents, worker  # noqa: E402
from slatflow.dinov2 import ARCHITECTURES, FusedDinov2, LoadedDinov2, model_from_official_state_dict  # noqa: E402
from slatflow.features import FeatureExtractor, FeatureSettings, decode_view, lanczos_resize_rgba  # noqa: E402
from slatflow.models import load_encoder  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device: torch.device, repeats: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def equal_batches(count: int, batch: int) -> list[slice]:
    num = -(-count // batch)
    size = -(-count // num)
    return [slice(i, min(i + size, count)) for i in range(0, count, size)]


# ----------------------------------------------------------------------------------------------
# Model only
# ----------------------------------------------------------------------------------------------


def model_steps(extractor: FeatureExtractor, views_u8: torch.Tensor, args, report: dict) -> None:
    """Seconds for the forward over all views: the previous path, then each step."""
    device = extractor.device
    flops = report["tflop_per_asset"]
    rows = report["model_steps"] = []

    def add(name: str, forward, batch: int, equal: bool = True) -> None:
        slices = equal_batches(len(views_u8), batch) if equal else [
            slice(i, i + batch) for i in range(0, len(views_u8), batch)]

        def run():
            with torch.inference_mode():
                for part in slices:
                    forward(extractor._normalize(views_u8[part]))

        try:
            seconds = median_seconds(run, device)
        except Exception as exc:  # noqa: BLE001 - a backend the build lacks is a row, not a crash
            rows.append({"step": name, "error": f"{type(exc).__name__}: {exc}"[:200]})
            print(f"  {name}: failed: {rows[-1]['error']}", flush=True)
            return
        rows.append({"step": name, "batch": batch, "s": seconds, "tflops": flops / seconds})
        print(f"  {name:52s} {seconds:.3f} s  {flops / seconds:5.0f} TFLOP/s", flush=True)

    def transformers_autocast(pixels):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return features.prenorm_patch_tokens(extractor.model, pixels).float()

    add("transformers bf16 autocast, batch 32 (before)", transformers_autocast, 32, equal=False)
    fused = {}
    for backend in ("auto",) if args.quick else ("auto", "cudnn", "flash", "efficient"):
        fused[backend] = FusedDinov2(extractor.model, torch.bfloat16, backend).to(device)
        add(f"fused, {backend} attention, batch {args.batch_size} (equal batches)", fused[backend], args.batch_size)
        if device.type == "cpu":
            break
    timed = [r for r in rows[1:] if "s" in r]
    best_backend = min(timed, key=lambda r: r["s"])["step"].split(", ")[1].split()[0]
    report["best_attention"] = best_backend
    for batch in args.batch_sweep:
        add(f"fused, {best_backend} attention, batch {batch}", fused[best_backend], batch)
    for backend in list(fused):
        if backend != best_backend:
            del fused[backend]


def compile_step(extractor: FeatureExtractor, views_u8: torch.Tensor, args, report: dict) -> None:
    """torch.compile of the fused block at the best backend (last: it can take minutes)."""
    device, backend, flops = extractor.device, report["best_attention"], report["tflop_per_asset"]
    compiled = FusedDinov2(extractor.model, torch.bfloat16, backend, compile=True).to(device)
    slices = equal_batches(len(views_u8), args.batch_size)

    def run():
        with torch.inference_mode():
            for part in slices:
                compiled(extractor._normalize(views_u8[part]))

    start = time.perf_counter()
    try:
        run()  # compiles
        report["compile_s"] = time.perf_counter() - start
        seconds = median_seconds(run, device)
        report["model_steps"].append({"step": f"fused + torch.compile, {backend}, batch {args.batch_size}",
                                      "batch": args.batch_size, "s": seconds, "tflops": flops / seconds})
        compiled.cuda_graph = True  # the same compiled forward, replayed as one CUDA graph per batch
        seconds = median_seconds(run, device)
        report["model_steps"].append({"step": f"fused + torch.compile + CUDA graph, {backend}, batch {args.batch_size}",
                                      "batch": args.batch_size, "s": seconds, "tflops": flops / seconds})
    except Exception as exc:  # noqa: BLE001 - an optional step
        report["model_steps"].append({"step": "torch.compile", "error": f"{type(exc).__name__}: {exc}"[:300]})


# ----------------------------------------------------------------------------------------------
# Streams through the workers
# ----------------------------------------------------------------------------------------------


class WorkerInProcess:
    """`slatflow.worker.serve` with a given handler, on the socket `run_request` looks for."""

    def __init__(self, service: str, handler, settings: dict, root: Path):
        self.spec = worker.WorkerSpec(service, settings)
        self.settings = worker.WorkerSettings(socket_dir=tempfile.mkdtemp(prefix="sfb", dir="/tmp"),
                                              request_timeout_s=120)  # a retired worker fails the run soon
        self.log_dir = root / "logs"
        path = Path(self.settings.socket_dir) / f"{self.spec.key()}.sock"
        original = worker.make_handler
        worker.make_handler = lambda spec: handler
        try:
            threading.Thread(target=worker.serve, args=(self.spec, path, 3600.0), daemon=True).start()
            deadline = time.monotonic() + 60
            while not path.exists():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the in-process {service} worker did not start")
                time.sleep(0.01)
        finally:  # serve() has called make_handler by the time the socket exists
            worker.make_handler = original

    def stream(self, requests: list[dict], clients: int, device: torch.device, profile: bool = False) -> dict:
        """Send the requests from `clients` threads at once; seconds per asset and GPU busy."""
        return stream_requests(self.spec, self.settings, self.log_dir, requests, clients, device, profile)


class WorkerProcess:
    """The workflow's arrangement: the worker its own process, started by the first request
    (`run_request`, as a job starts it), the clients processes of their own (a latent job reads
    its input and writes its latent). The in-process worker shares one interpreter lock with the
    client threads, which the workflow's jobs (other processes) do not; its streams are the
    pessimistic figure, these the workflow's."""

    def __init__(self, service: str, settings: dict, root: Path):
        self.spec = worker.WorkerSpec(service, settings)
        self.settings = worker.WorkerSettings(socket_dir=tempfile.mkdtemp(prefix="sfp", dir="/tmp"), idle_timeout_s=30,
                                              start_timeout_s=600, request_timeout_s=300)
        self.log_dir = root / "logs"

    def stream(self, requests: list[dict], clients: int, device: torch.device) -> dict:
        return stream_requests(self.spec, self.settings, self.log_dir, requests, clients, device, processes=True)


# the latent services' jobs read their inputs and write their outputs (latents.run_latent_job)
LATENT_KINDS = {"ss_latent": "ss", "slat_latent": "slat"}


def job_request(spec, settings, log_dir: Path, request: dict) -> None:
    """One job's request, as its script makes it (module level: client processes run it)."""

    def submit(message: dict):
        return worker.run_request(spec, message, settings, log_dir)

    kind = LATENT_KINDS.get(spec.service)
    if kind is None:
        submit(request)
    else:
        latents.run_latent_job(kind, latents.LatentJob.from_request(request), submit)


_CLIENT_PROCESSES: dict[int, ProcessPoolExecutor] = {}


def client_processes(clients: int) -> ProcessPoolExecutor:
    """`clients` processes kept for the run (spawned: this one holds CUDA), started before use."""
    if clients not in _CLIENT_PROCESSES:
        pool = ProcessPoolExecutor(clients, mp_context=multiprocessing.get_context("spawn"))
        list(pool.map(time.sleep, [0.5] * clients))  # each process started and importing this module
        _CLIENT_PROCESSES[clients] = pool
    return _CLIENT_PROCESSES[clients]


def stream_requests(spec, settings, log_dir: Path, requests: list[dict], clients: int, device: torch.device,
                    profile: bool = False, processes: bool = False) -> dict:
    """Send the requests from `clients` threads (or, with `processes`, processes, as the
    workflow's jobs are) at once; seconds per asset and GPU busy (the profiler's only for a
    worker in this process)."""
    sampler = NvmlSampler(device) if device.type == "cuda" else None
    profiler = None
    if profile and device.type == "cuda":
        profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
        profiler.__enter__()
    one = partial(job_request, spec, settings, log_dir)
    pool = client_processes(clients) if processes else None
    start = time.perf_counter()
    if pool is not None:
        list(pool.map(one, requests))
    else:
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(one, requests))
    wall = time.perf_counter() - start
    row = {"assets": len(requests), "clients": clients, "wall_s": wall, "ms_per_asset": 1e3 * wall / len(requests)}
    if sampler is not None:
        row["nvml_busy"] = sampler.stop()
    if profiler is not None:
        profiler.__exit__(None, None, None)
        row["gpu_busy"] = busy_fraction(profiler, wall)
    print(f"  stream {spec.service} {spec.settings}: {row}", flush=True)  # as it comes: a killed run keeps its rows
    return row


def process_streams(args, base: dict, stream_jobs, slat_sources, device: torch.device, streams: dict,
                    random_args: dict) -> None:
    """The features, SS and SLat streams again, each worker its own process (WorkerProcess);
    a first round of requests starts and warms it and is not timed."""
    latent_settings = {"latents": {"ss_encoder": "random", "slat_encoder": "random", "device": args.device, **random_args},
                       "threads": 4}
    cases = (
        ("features", {**base, "batch_size": args.batch_size}, feature_requests(stream_jobs, args.out / "process_f")),
        ("ss_latent", latent_settings,
         latent_requests([(j.sha256, j.voxels_path) for j in stream_jobs], args.out / "process_ss")),
        ("slat_latent", latent_settings, latent_requests(slat_sources, args.out / "process_slat")),
    )
    for service, settings, requests in cases:
        process = WorkerProcess(service, settings, args.out)
        # a first round as a long run's first jobs: the model loads and compiles, the caches of
        # pinned buffers and CUDA graphs fill (a long run pays that once)
        warm = [dict(r, output=str(Path(r["output"]).with_suffix(".warm.npz"))) for r in requests[: args.clients]]
        try:
            process.stream(warm[:1], 1, device)
            process.stream(warm, args.clients, device)
            streams[f"{service}_process"] = process.stream(requests, args.clients, device)
        except Exception as exc:  # noqa: BLE001 - a row, not a crash: the other figures stand
            streams[f"{service}_process"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            print(f"  {service} worker process: {streams[f'{service}_process']['error']}", flush=True)


def busy_fraction(profiler, wall_s: float) -> float:
    """Union of the device's kernel/copy intervals over the wall time."""
    from torch.autograd import DeviceType

    spans = sorted((e.time_range.start, e.time_range.end) for e in profiler.events() if e.device_type == DeviceType.CUDA)
    busy_us, end = 0.0, -1.0
    for lo, hi in spans:
        if hi <= end:
            continue
        busy_us += hi - max(lo, end)
        end = hi
    return busy_us / (wall_s * 1e6)


class NvmlSampler:
    """NVML's GPU utilization, sampled every 20 ms until `stop` (None without pynvml)."""

    def __init__(self, device: torch.device):
        self.samples: list[int] = []
        self._done = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            self._read = lambda: pynvml.nvmlDeviceGetUtilizationRates(self._handle).gpu
        except Exception:  # noqa: BLE001 - optional
            self._read = None
            return
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._done.wait(0.02):
            self.samples.append(self._read())

    def stop(self) -> float | None:
        if self._read is None:
            return None
        self._done.set()
        self._thread.join()
        return statistics.mean(self.samples) / 100 if self.samples else None


def feature_requests(jobs, folder: Path) -> list[dict]:
    return [{"sha256": j.sha256, "render_dir": str(j.render_dir), "voxels": str(j.voxels_path),
             "output": str(folder / f"{j.sha256}.npz")} for j in jobs]


def latent_requests(sources: list[tuple[str, Path]], folder: Path) -> list[dict]:
    return [{"sha256": sha, "source": str(src), "output": str(folder / f"{sha}.npz")} for sha, src in sources]


# ----------------------------------------------------------------------------------------------


def savez_compressed_atomic(path, **arrays) -> None:
    """The previous writer: np.savez_compressed (zipfile, deflate level 6, one thread)."""
    with io.atomic_path(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, **arrays)


def npz_levels(arrays: dict, out: Path, report: dict) -> None:
    rows = report["npz_levels"] = []
    raw = sum(a.nbytes for a in arrays.values())
    report["npz_savez_compressed_s"] = median_seconds(
        lambda: savez_compressed_atomic(out / "savez.npz", **arrays), torch.device("cpu"))
    for level in (0, 1, 2, 3, 6, 9):
        path = out / f"level{level}.npz"
        seconds = median_seconds(lambda: io.save_npz_atomic(path, compresslevel=level, **arrays), torch.device("cpu"))
        rows.append({"level": level, "s": seconds, "mb": path.stat().st_size / 1e6, "ratio": path.stat().st_size / raw})
    paths = [out / f"parallel{i}.npz" for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        start = time.perf_counter()
        list(pool.map(lambda p: io.save_npz_atomic(p, **arrays), paths))
        report["npz_4_writers_s_per_file"] = (time.perf_counter() - start) / 4
    with np.load(paths[0]) as loaded:
        assert all(loaded[k].dtype == v.dtype and np.array_equal(loaded[k], v) for k, v in arrays.items())


def decode_timing(render_dir: Path, workers: int, report: dict) -> None:
    views = sorted(render_dir.glob("*.png"))
    one = median_seconds(lambda: [decode_view("x", p, None) for p in views], torch.device("cpu"), repeats=1)
    with ThreadPoolExecutor(workers) as pool:
        many = median_seconds(lambda: list(pool.map(lambda p: decode_view("x", p, None), views)),
                              torch.device("cpu"), repeats=3)
    report.update(decode_1_thread_s=one, decode_pool_s=many, decode_workers=workers, decode_views=len(views))


def latent_model_only(placed, kind: str, inputs, report: dict, key: str) -> None:
    """ms per asset of one forward over a full batch (the codec's budget) of `inputs`."""
    device = placed.device
    if kind == "ss":
        grids = torch.from_numpy(np.stack([latents.voxel_occupancy(idx) for idx in inputs])).to(device)
        run = lambda: placed.model(grids)  # noqa: E731
    else:
        coords = np.concatenate([np.concatenate([np.full((len(idx), 1), b), idx], axis=1)
                                 for b, (idx, _) in enumerate(inputs)])
        feats = torch.from_numpy(np.concatenate([tok for _, tok in inputs])).to(device).float()
        coords = torch.from_numpy(coords.astype(np.int64)).to(device)
        run = lambda: placed.model(feats, coords)  # noqa: E731
    with torch.inference_mode():
        seconds = median_seconds(run, device, repeats=5)
    report[key] = {"assets_per_forward": len(inputs), "ms_per_asset": 1e3 * seconds / len(inputs)}


def trellis_loop(args, arch, state, jobs, device, report: dict) -> None:
    """TRELLIS's loop (bench_features.run_trellis): the first asset a warm-up."""
    streams = report["streams"]
    trellis_model = reference_model(arch, state).to(device)
    run_trellis(trellis_model, [jobs[0]], args.out / "trellis_warmup", device)
    timed = jobs[1 : args.trellis_assets]
    sync(device)
    start = time.perf_counter()
    run_trellis(trellis_model, timed, args.out / "trellis", device)
    sync(device)
    report["trellis_s_per_asset"] = (time.perf_counter() - start) / len(timed)
    report["ratio_trellis_to_stream"] = report["trellis_s_per_asset"] / (streams["features"]["ms_per_asset"] / 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default="dinov2_vitl14_reg", choices=[*ARCHITECTURES, "tiny"])
    parser.add_argument("--views", type=int, default=150)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--radius", type=float, default=0.48, help="sphere radius (0.48: ~20k voxels)")
    parser.add_argument("--assets", type=int, default=20, help="assets in each stream")
    parser.add_argument("--before-assets", type=int, default=6, help="assets of the 'before' features stream")
    parser.add_argument("--clients", type=int, default=8, help="model jobs at once (profiles/default: 8)")
    parser.add_argument("--latent-clients", type=int, default=8, help="latent jobs at once")
    parser.add_argument("--batch-size", type=int, default=FeatureSettings.batch_size)
    parser.add_argument("--batch-sweep", type=int, nargs="*", default=[50, 75, 150])
    parser.add_argument("--decode-workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--slat-voxels", type=int, default=32768)
    parser.add_argument("--trellis-assets", type=int, default=2, help="TRELLIS's loop: the first is a warm-up")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd model-only")
    parser.add_argument("--quick", action="store_true", help="model only: the before and default rows; no TRELLIS")
    parser.add_argument("--variants", type=lambda v: (tuple(map(int, v.split(","))) + (1,))[:3], nargs="*",
                        default=[(4, 1, 1), (4, 0, 0), (8, 0, 1)],
                        help="features streams with other worker settings: AT_ONCE,LEVEL[,CUDA_GRAPH] each")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "pipeline_gpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the workers' per-asset random-weights warnings stay out
    device = torch.device(args.device)
    tiny = args.arch == "tiny"
    arch = TINY_ARCH if tiny else ARCHITECTURES[args.arch]
    model_name = "dinov2_vits14_reg" if tiny else args.arch
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report: dict = {"device": card, "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()}}
    print(f"pipeline benchmark on {card}, torch {torch.__version__}, {os.cpu_count()} CPUs: RANDOM WEIGHTS", flush=True)

    shutil.rmtree(args.out, ignore_errors=True)
    started = time.perf_counter()
    count = max(args.assets, args.trellis_assets)
    jobs = make_assets(args.out / "data", count, args.views, args.resolution, args.radius)
    print(f"data: {count} assets x {args.views} views ({time.perf_counter() - started:.1f} s)", flush=True)

    state = random_official_state_dict(arch, seed=0)
    loaded = LoadedDinov2(model_from_official_state_dict(state, arch), arch, "random (official layout)", True)
    base = dict(model=model_name, weights="random", device=args.device, decode_workers=args.decode_workers)
    settings = FeatureSettings(batch_size=args.batch_size, **base)
    extractor = FeatureExtractor(settings, loaded)
    report["defaults"] = {"batch_size": settings.batch_size, "attention": settings.attention, "compile": settings.compile,
                          "cuda_graph": settings.cuda_graph,
                          "npz_level": settings.deflate_level, "decode_workers": args.decode_workers}
    image_size = settings.image_size
    report["tflop_per_asset"] = vit_flops(arch, image_size) * args.views / 1e12

    # model only
    raw = torch.from_numpy(np.stack([decode_view("x", p, None) for p in sorted(jobs[0].render_dir.glob("*.png"))]))
    views_u8 = lanczos_resize_rgba(raw.to(device), image_size)
    print(f"model only, {args.views} views ({report['tflop_per_asset']:.1f} TFLOP):", flush=True)
    model_steps(extractor, views_u8, args, report)

    feature_worker = WorkerInProcess("features", features.request_handler(extractor), {"variant": "now"}, args.out)
    start = time.perf_counter()
    feature_worker.stream(feature_requests(jobs[:1], args.out / "f_warmup"), 1, device)
    report["features_first_request_s"] = time.perf_counter() - start  # torch.compile's one-off cost

    # precision: the default path against float32 on one asset
    fp32 = FeatureExtractor(FeatureSettings(batch_size=args.batch_size, dtype="float32", **base), loaded)
    [ours] = extractor.run([jobs[0]], keep_features=True)
    [exact] = fp32.run([jobs[0]], keep_features=True)
    cos = cosine(ours.features.patchtokens.astype(np.float32), exact.features.mean)
    report["cosine_vs_fp32"] = {"min": float(cos.min()), "median": float(np.median(cos))}
    print(f"  cosine vs fp32: {report['cosine_vs_fp32']}", flush=True)
    del fp32
    npz_levels({"indices": ours.features.indices, "patchtokens": ours.features.patchtokens}, args.out, report)
    decode_timing(jobs[0].render_dir, args.decode_workers, report)
    print(f"  npz {report['npz_levels']}, savez_compressed {report['npz_savez_compressed_s']:.3f} s, "
          f"decode 1 thread {report['decode_1_thread_s']:.3f} s, pool {report['decode_pool_s']:.3f} s", flush=True)

    # features streams through the worker
    streams = report["streams"] = {}
    service = "features"
    before = FeatureExtractor(FeatureSettings(batch_size=32, **base), loaded)
    before.fused = None  # transformers' forward under autocast
    original_save = features.save_npz_atomic
    features.save_npz_atomic = savez_compressed_atomic
    old_worker = WorkerInProcess(service, features.request_handler(before), {"variant": "before"}, args.out)
    streams["features_before_serial"] = old_worker.stream(
        feature_requests(jobs[: args.before_assets], args.out / "f_before"), 1, device)
    features.save_npz_atomic = original_save
    del before
    stream_jobs = jobs[: args.assets]
    streams["features_serial"] = feature_worker.stream(feature_requests(stream_jobs, args.out / "f_serial"), 1, device)
    streams["features"] = feature_worker.stream(feature_requests(stream_jobs, args.out / "f"), args.clients, device)
    streams["features_profiled"] = feature_worker.stream(
        feature_requests(stream_jobs, args.out / "f_prof"), args.clients, device, profile=True)
    for at_once, level, graph in args.variants:  # requests at once, npz level, CUDA graph: swept
        handler = features.request_handler(extractor)
        handler.concurrency = at_once
        variant = WorkerInProcess(service, handler, {"variant": f"{at_once}-{level}-{graph}"}, args.out)
        default_settings, extractor.settings = extractor.settings, replace(extractor.settings, deflate_level=level)
        default_graph = extractor.fused.cuda_graph if extractor.fused is not None else False
        if extractor.fused is not None:
            extractor.fused.cuda_graph = bool(graph)
        name = f"features_{at_once}_at_once_level_{level}" + ("" if graph else "_no_graph")
        streams[name] = variant.stream(
            feature_requests(stream_jobs, args.out / f"f_{at_once}_{level}_{graph}"), args.clients, device, profile=True)
        extractor.settings = default_settings
        if extractor.fused is not None:
            extractor.fused.cuda_graph = default_graph
    for name in ("features_serial", "features"):
        print(f"  {name}: {streams[name]['ms_per_asset']:.0f} ms/asset", flush=True)

    # latent streams
    ss_encoder = load_encoder("random", "ss", random_args=TINY_SS_ARGS if tiny else None)
    slat_args = {**TINY_SLAT_ARGS, "in_channels": arch.embed_dim} if tiny else None
    slat_encoder = load_encoder("random", "slat", random_args=slat_args)
    ss_placed = latents.place(ss_encoder, "ss", args.device, "auto", compile=latents.LatentSettings().compile)
    slat_placed = latents.place(slat_encoder, "slat", args.device, "auto")
    ss_worker = WorkerInProcess("ss_latent", latents.request_handler(ss_placed), {"variant": "now"}, args.out)
    slat_worker = WorkerInProcess("slat_latent", latents.request_handler(slat_placed), {"variant": "now"}, args.out)
    ss_sources = [(j.sha256, j.voxels_path) for j in stream_jobs]
    streams["ss_serial"] = ss_worker.stream(latent_requests(ss_sources, args.out / "ss1"), 1, device)
    streams["ss"] = ss_worker.stream(latent_requests(ss_sources, args.out / "ss"), args.latent_clients, device)
    slat_sources = [(j.sha256, args.out / "f" / f"{j.sha256}.npz") for j in stream_jobs]
    streams["slat_stream_features"] = slat_worker.stream(
        latent_requests(slat_sources, args.out / "slat_f"), args.latent_clients, device)
    big = []
    for i in range(args.assets):
        sha = f"{i + 1:064x}"
        indices = surface_voxels(args.slat_voxels, seed=i)
        path = args.out / "big_features" / f"{sha}.npz"
        io.save_npz_atomic(path, indices=indices, patchtokens=random_patchtokens(len(indices), arch.embed_dim, seed=i))
        big.append((sha, path))
    streams["slat_big_serial"] = slat_worker.stream(latent_requests(big, args.out / "slat_b1"), 1, device)
    streams["slat_big"] = slat_worker.stream(latent_requests(big, args.out / "slat_b"), args.latent_clients, device)
    stored = []  # the same inputs written at deflate level 0 (stored blocks: no inflate work)
    for sha, path in big:
        with np.load(path) as data:
            copy = args.out / "big_features_level_0" / path.name
            io.save_npz_atomic(copy, compresslevel=0, **{key: data[key] for key in data.files})
        stored.append((sha, copy))
    streams["slat_big_level_0"] = slat_worker.stream(
        latent_requests(stored, args.out / "slat_b0"), args.latent_clients, device)
    process_streams(args, base, stream_jobs, stored, device, streams,  # the workflow's arrangement
                    {"random_ss_args": TINY_SS_ARGS, "random_slat_args": slat_args} if tiny else {})
    big_inputs = [(surface_voxels(args.slat_voxels, seed=i), random_patchtokens(args.slat_voxels, arch.embed_dim, seed=i))
                  for i in range(max(1, latents.SLAT_VOXELS_PER_BATCH[device.type] // args.slat_voxels))]
    latent_model_only(slat_placed, "slat", big_inputs, report, "slat_model_only")
    latent_model_only(slat_placed, "slat", big_inputs[:1], report, "slat_model_only_1")
    ss_inputs = [surface_voxels(20000, seed=i) for i in range(latents.SS_BATCH[device.type])]
    latent_model_only(ss_placed, "ss", ss_inputs, report, "ss_model_only")
    print(f"  model only: slat {report['slat_model_only']}, slat alone {report['slat_model_only_1']}, "
          f"ss {report['ss_model_only']}", flush=True)

    if args.quick:
        report["trellis_s_per_asset"] = report["ratio_trellis_to_stream"] = float("nan")
        del state
    else:
        trellis_loop(args, arch, state, jobs, device, report)
    (args.out / "results.json").write_text(json.dumps(report, indent=2))
    print_summary(report)
    if args.compile:
        print("torch.compile ...", flush=True)
        compile_step(extractor, views_u8, args, report)
        (args.out / "results.json").write_text(json.dumps(report, indent=2))
        print_summary(report)
    sys.stdout.flush()
    os._exit(0)  # the in-process workers' threads wait on their sockets


def print_summary(r: dict) -> None:
    s = r["streams"]
    fmt = lambda x: "n/a" if x is None else f"{100 * x:.0f}%"  # noqa: E731
    lines = ["", f"== pipeline on {r['device']} (RANDOM WEIGHTS), torch {r['torch']}, defaults {r['defaults']} ==",
             f"model only ({r['tflop_per_asset']:.1f} TFLOP per asset):"]
    for row in r["model_steps"]:
        lines.append(f"  {row['step']:52s} " + (f"{row['s']:.3f} s  {row['tflops']:4.0f} TFLOP/s" if "s" in row
                                                 else f"failed: {row['error']}"))
    if "compile_s" in r:
        lines.append(f"  (compile took {r['compile_s']:.0f} s)")
    cos = r["cosine_vs_fp32"]
    lines.append(f"features worker's first request (compiles): {r['features_first_request_s']:.1f} s")
    lines.append(f"per-voxel cosine, default vs float32: min {cos['min']:.6f} median {cos['median']:.6f}")
    lines.append("npz: " + "  ".join(f"level {x['level']}: {x['s']:.3f} s {x['mb']:.1f} MB ({x['ratio']:.2f})"
                                     for x in r["npz_levels"])
                 + f"; 4 writers at once: {r['npz_4_writers_s_per_file']:.3f} s per file; "
                 f"np.savez_compressed (before): {r['npz_savez_compressed_s']:.3f} s")
    lines.append(f"PNG decode of {r['decode_views']} views: 1 thread {r['decode_1_thread_s']:.3f} s, "
                 f"{r['decode_workers']} threads {r['decode_pool_s']:.3f} s")
    lines.append("streams through the workers (ms per asset):")
    for name, row in s.items():
        if "error" in row:
            lines.append(f"  {name:24s} failed: {row['error']}")
            continue
        extra = "".join(f"  {k} {fmt(row[k])}" for k in ("gpu_busy", "nvml_busy") if k in row)
        lines.append(f"  {name:24s} {row['ms_per_asset']:8.1f} ms/asset  ({row['assets']} assets, "
                     f"{row['clients']} at once){extra}")
    for key in ("slat_model_only", "slat_model_only_1", "ss_model_only"):
        lines.append(f"  {key:24s} {r[key]['ms_per_asset']:8.1f} ms/asset  ({r[key]['assets_per_forward']} per forward)")
    lines.append(f"TRELLIS's loop {r['trellis_s_per_asset']:.3f} s/asset; features stream "
                 f"{s['features']['ms_per_asset'] / 1e3:.3f} s/asset: {r['ratio_trellis_to_stream']:.1f}x")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
