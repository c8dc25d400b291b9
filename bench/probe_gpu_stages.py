"""Device probe for issue 17 (exploratory; the figures that count come from bench_pipeline_gpu.py).

One call: where the GPU stages' time goes, and candidate changes side by side. Sections:
env (torch, cuDNN, flash impls); gemm (ViT-L's four matmuls at 50 views: weight layouts,
epilogues); slat (the SLat forward's kernels, packed against bucketed, a request's read pieces,
the worker stream); ss (the compiled SS encoder per batch size, kernels, the worker stream);
vit (ViT-L over 150 views, compiled and graphed, with and without the matmul epilogues and
TunableOp, with kernel tables).
    PYTHONPATH=. python bench/probe_gpu_stages.py --out /tmp/probe --only env gemm slat ss vit
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "bench")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

T0 = time.perf_counter()


def log(*a):
    print(f"[{time.perf_counter() - T0:6.1f}s]", *a, flush=True)


def gpu_ms(fn, repeats=5, warmup=1):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def wall_ms(fn, repeats=3, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        s = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - s))
    return statistics.median(times)


def section(name):
    def deco(fn):
        def run(*a, **k):
            log(f"== {name}")
            try:
                return fn(*a, **k)
            except Exception:  # noqa: BLE001
                traceback.print_exc()
                log(f"!! {name} failed")
        return run
    return deco


def kernel_table(fn, top=14):
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    cats = {}
    rows = []
    for ev in prof.key_averages():
        t = ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
        if t <= 0:
            continue
        name = ev.key
        low = name.lower()
        cat = ("attention" if any(s in low for s in ("flash", "fmha", "attention", "cudnn", "sdpa")) else
               "gemm" if any(s in low for s in ("gemm", "sm90", "cutlass", "matmul", "nvjet", "xmma")) else
               "conv" if "conv" in low else "other")
        cats[cat] = cats.get(cat, 0) + t
        rows.append((t, ev.count, name[:110]))
    total = sum(cats.values())
    log("  categories ms:", {k: round(v / 1e3, 2) for k, v in sorted(cats.items(), key=lambda x: -x[1])},
        "total", round(total / 1e3, 2))
    for t, n, name in sorted(rows, reverse=True)[:top]:
        print(f"     {t / 1e3:8.2f} ms  x{n:<5d} {name}")


@section("env")
def env():
    import torch.nn.attention as A

    log(torch.__version__, torch.cuda.get_device_name(), "cpus", os.cpu_count())
    log("varlen:", hasattr(A, "varlen") or os.path.exists(os.path.join(os.path.dirname(A.__file__), "varlen.py")))
    try:
        log("flash impls:", A.list_flash_attention_impls(), A.current_flash_attention_impl())
    except Exception as e:  # noqa: BLE001
        log("no flash impl registry", e)
    log("cudnn", torch.backends.cudnn.version())



@section("vit")
def vit(args, out):
    """ViT-L over 150 views: the compiled, graphed forward with and without matmul epilogues."""
    from features_fixtures import random_official_state_dict

    from bench_features import vit_flops
    from slatflow.dinov2 import ARCHITECTURES, FusedDinov2, model_from_official_state_dict

    arch = ARCHITECTURES["dinov2_vitl14_reg"]
    model = model_from_official_state_dict(random_official_state_dict(arch, seed=0), arch).cuda().eval()
    flops = vit_flops(arch, 518) * 150
    gen = torch.Generator(device="cuda").manual_seed(0)
    pixels = torch.randn(150, 3, 518, 518, device="cuda", generator=gen)
    with torch.inference_mode():
        reference = torch.cat([FusedDinov2(model, torch.float32, epilogues=False)(pixels[i:i + 10]) for i in range(0, 20, 10)])

    def timed(name, fwd, batch):
        parts = [pixels[i:i + batch] for i in range(0, 150, batch)]

        def run():
            with torch.inference_mode():
                for part in parts:
                    fwd(part)
        try:
            ms = gpu_ms(run, repeats=3)
            with torch.inference_mode():
                got = torch.cat([fwd(pixels[i:i + batch])[: 20 - i] for i in range(0, 20, batch)])[:20]
            cos = F.cosine_similarity(got.float(), reference, dim=1).min().item()
            log(f"  {name:48s} {ms:7.1f} ms  {flops / ms / 1e9:5.0f} TFLOP/s  min cos {cos:.6f}")
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            log(f"  {name} failed: {type(e).__name__}: {str(e)[:300]}")
        return run

    try:
        from torch.nn.attention import activate_flash_attention_impl

        activate_flash_attention_impl("FA3")
        log("  FA3 activated")
    except Exception as e:  # noqa: BLE001
        log(f"  FA3: {type(e).__name__}: {str(e)[:200]}")
    for name, epilogues, tunable in (("no epilogues", False, False), ("epilogues", True, False),
                                     ("epilogues + TunableOp", True, True)):
        if tunable:
            torch.cuda.tunable.enable(True)
            torch.cuda.tunable.set_filename(str(out / "tunableop.csv"))
        f = FusedDinov2(model, torch.bfloat16, "auto", compile=True, cuda_graph=True, epilogues=epilogues).to("cuda")
        t = time.perf_counter()
        with torch.inference_mode():
            f(pixels[:50])
        log(f"  {name}: first call (compile, tuning, capture) {time.perf_counter() - t:.1f} s")
        for batch in (50, 30):
            timed(f"compiled+graph {name} b{batch}", f, batch)
        if not tunable:
            log(f"  kernel table, {name} b50 (no graph):")
            f.cuda_graph = False
            with torch.inference_mode():
                kernel_table(lambda: [f(pixels[i:i + 50]) for i in range(0, 150, 50)], top=12)
        del f
        torch.cuda.empty_cache()
    torch.cuda.tunable.enable(False)


@section("gemm")
def gemm():
    """ViT-L's four matmuls at 50 views (M = 68,700 tokens): weight layouts and epilogues."""
    import torch.nn.functional as F

    m, d = 50 * 1374, 1024
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, d, device="cuda", generator=gen)
    h = x.bfloat16()
    u = torch.randn(m, 4 * d, device="cuda", generator=gen).bfloat16()
    unit = 2 * m * d * d / 1e9  # GFLOP of a D x D matmul over the tokens

    def row(name, fn, units):
        ms = gpu_ms(fn, repeats=20, warmup=3)
        log(f"  {name:44s} {ms:6.3f} ms  {units * unit / ms:5.0f} TFLOP/s")

    for n, k, a, units in ((3 * d, d, h, 3), (d, d, h, 1), (4 * d, d, h, 4), (d, 4 * d, u, 4)):
        w = (torch.randn(n, k, device="cuda", generator=gen) / k**0.5).bfloat16()
        wt = w.t().contiguous()
        b = torch.randn(n, device="cuda", generator=gen).bfloat16()
        tag = f"N={n} K={k}"
        row(f"{tag} linear+bias", lambda: F.linear(a, w, b), units)
        row(f"{tag} addmm(b, a, W^T contiguous)", lambda: torch.addmm(b, a, wt), units)
        if n == 4 * d:
            row(f"{tag} gelu epilogue, W.t()", lambda: torch._addmm_activation(b, a, w.t(), use_gelu=True), units)
            row(f"{tag} gelu epilogue, W^T contiguous", lambda: torch._addmm_activation(b, a, wt, use_gelu=True), units)
        if n == d:
            c = x.clone()
            row(f"{tag} residual epilogue fp32 C, W.t()", lambda: torch.addmm(c, a, w.t(), out_dtype=torch.float32, out=c), units)
            row(f"{tag} residual epilogue fp32 C, W^T contig", lambda: torch.addmm(c, a, wt, out_dtype=torch.float32, out=c), units)
            row(f"{tag} mm bf16 out, no bias", lambda: torch.mm(a, w.t()), units)


@section("slat")
def slat(out):
    """The SLat encoder at 4 x 32k voxels: kernels; a request's pieces; the worker stream."""
    from latents_fixtures import random_patchtokens, surface_voxels

    from bench_pipeline_gpu import WorkerInProcess, latent_requests
    from slatflow import io, latents
    from slatflow.models import load_encoder

    placed = latents.place(load_encoder("random", "slat"), "slat", "cuda", "auto")
    model = placed.model
    inputs = [(surface_voxels(32768, seed=i), random_patchtokens(32768, 1024, seed=i)) for i in range(4)]
    coords = torch.from_numpy(np.concatenate([np.concatenate([np.full((len(i), 1), b), i], 1) for b, (i, _) in enumerate(inputs)]).astype(np.int64)).cuda()
    feats = torch.from_numpy(np.concatenate([t for _, t in inputs])).cuda().float()
    with torch.inference_mode():
        ms = wall_ms(lambda: model(feats, coords), repeats=5)
        log(f"  forward: {ms:.1f} ms per 4x32k ({ms / 4:.1f} ms/asset)")
        kernel_table(lambda: model(feats, coords), top=16)
        from slatflow.models import slat_encoder
        available = slat_encoder.packed_attention_available
        slat_encoder.packed_attention_available = lambda *a: False
        bucketed = model(feats, coords)
        slat_encoder.packed_attention_available = available
        packed = model(feats, coords)
        log(f"  packed vs bucketed rel {((packed - bucketed).abs().max() / bucketed.abs().max()).item():.2e}")
    paths = []
    for i in range(24):
        idx, tok = inputs[i % 4]
        path = out / f"slat_src_{i}.npz"
        io.save_npz_atomic(path, compresslevel=0, indices=idx, patchtokens=tok)
        paths.append(path)
    from concurrent.futures import ThreadPoolExecutor

    def per_file(fn, threads):
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(fn, paths[:threads]))  # warm
            t = time.perf_counter()
            list(pool.map(fn, paths))
            return 1e3 * (time.perf_counter() - t) / len(paths)

    def np_load(p):
        with np.load(p) as d:
            return d["patchtokens"], d["indices"]

    tok = inputs[0][1]
    codec = latents._slat_codec(placed)
    for threads in (1, 8):
        log(f"  {threads} thread(s), ms per file: np.load {per_file(np_load, threads):.1f}, "
            f"read_sparse_features {per_file(lambda p: latents.read_sparse_features('x', p, 1024), threads):.1f}, "
            f"finite check {per_file(lambda p: latents._all_finite(tok), threads):.1f}, "
            f"pin 64MB {per_file(lambda p: torch.from_numpy(tok).pin_memory(), threads):.1f}, "
            f"crc32 64MB {per_file(lambda p: zlib.crc32(tok), threads):.1f}, "
            f"codec read (cuda) {per_file(lambda p: codec.read(latents.LatentJob('x', p, p)), threads):.1f}, "
            f"job's read {per_file(lambda p: latents.latent_request('slat', latents.LatentJob('x', p, p)), threads):.1f}")
    handler = latents.request_handler(placed)
    worker_ = WorkerInProcess("slat_latent", handler, {"probe": 1}, out)
    for clients in (8, 16):
        worker_.stream(latent_requests([(f"{i:064x}", p) for i, p in enumerate(paths)], out / f"slat_out{clients}"),
                       clients, torch.device("cuda"))


@section("ss")
def ss(out):
    """The SS encoder: batch sizes, kernels, torch.compile; a request's pieces; the stream."""
    from latents_fixtures import surface_voxels

    from bench_pipeline_gpu import WorkerInProcess, latent_requests
    from slatflow import io, latents
    from slatflow.models import load_encoder

    placed = latents.place(load_encoder("random", "ss"), "ss", "cuda", "auto", compile=True)
    model = placed.model
    occ = [latents.voxel_occupancy(surface_voxels(20000, seed=i)) for i in range(16)]
    with torch.inference_mode():
        t = time.perf_counter()
        model(torch.from_numpy(np.stack(occ[:8])).cuda())
        log(f"  compiled first call {time.perf_counter() - t:.1f} s")
        for b in (1, 2, 4, 8, 16):
            g = torch.from_numpy(np.stack(occ[:b])).cuda()
            log(f"  compiled b{b}: {gpu_ms(lambda: model(g)) / b:.2f} ms/asset")
        g = torch.from_numpy(np.stack(occ[:8])).cuda()
        eager = model.model(g).float()
        rel = ((model(g).float() - eager).norm() / eager.norm()).item()
        log(f"  compiled vs eager rel {rel:.2e}, eager b8 {gpu_ms(lambda: model.model(g)) / 8:.2f} ms/asset")
        kernel_table(lambda: model(g), top=8)
    paths = []
    for i in range(48):
        path = out / f"ss_src_{i}.ply"
        io.write_points_ply(path, (surface_voxels(20000, seed=i % 16).astype(np.float32) + 0.5) / 64 - 0.5)
        paths.append(path)
    t = time.perf_counter()
    for p in paths[:8]:
        idx = latents.read_voxel_indices("x", p)
    t1 = time.perf_counter()
    for _ in range(8):
        latents.voxel_occupancy(idx)
    t2 = time.perf_counter()
    for i in range(8):
        io.save_npz_atomic(out / f"ss_w{i}.npz", mean=np.zeros((8, 16, 16, 16), np.float32))
    t3 = time.perf_counter()
    log(f"  ms per asset, 1 thread: read ply {1e3 * (t1 - t) / 8:.1f}, occupancy {1e3 * (t2 - t1) / 8:.1f}, write {1e3 * (t3 - t2) / 8:.1f}")
    handler = latents.request_handler(placed)
    worker_ = WorkerInProcess("ss_latent", handler, {"probe": 1}, out)
    for clients in (8, 16):
        worker_.stream(latent_requests([(f"{i:064x}", p) for i, p in enumerate(paths)], out / f"ss_out{clients}"),
                       clients, torch.device("cuda"))


@section("timeline")
def timeline(out):
    """The SS and SLat worker streams, jobs as processes: each request's time in the worker and
    its batch's forward, the device thread's busy share and the gaps between its forwards."""
    import dataclasses
    import threading

    from latents_fixtures import random_patchtokens, surface_voxels

    from functools import partial

    from bench_pipeline_gpu import WorkerInProcess, latent_requests, stream_requests
    from slatflow import io, latents
    from slatflow.models import load_encoder

    events = []

    def timed(name, fn):
        def run(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                events.append((name, threading.get_ident(), start, time.perf_counter(),
                               len(a[0]) if name == "forward" else 1))
        return run

    originals = {"ss": latents._ss_codec, "slat": latents._slat_codec}

    def wrapped(kind):
        def build(placed):
            codec = originals[kind](placed)
            return dataclasses.replace(codec, forward=timed("forward", codec.forward))
        return build

    latents._ss_codec, latents._slat_codec = wrapped("ss"), wrapped("slat")

    def report(label, wall):
        log(f"  {label}: wall {wall * 1e3:.0f} ms")
        for name in ("handle", "forward"):
            rows = [e for e in events if e[0] == name]
            if rows:
                d = [1e3 * (e[3] - e[2]) for e in rows]
                log(f"    {name}: n {len(rows)} mean {statistics.mean(d):.2f} ms median {statistics.median(d):.2f} "
                    f"max {max(d):.2f} total {sum(d):.0f} ms" + (f", assets/forward {statistics.mean(e[4] for e in rows):.2f}" if name == "forward" else ""))
        fw = sorted((e[2], e[3]) for e in events if e[0] == "forward")
        if fw:
            gaps = [1e3 * (b[0] - a[1]) for a, b in zip(fw, fw[1:])]
            log(f"    device thread busy {sum(e - s for s, e in fw) / wall:.0%}, gaps mean {statistics.mean(gaps or [0]):.2f} ms "
                f"max {max(gaps or [0]):.2f}")

    try:
        for kind, n, make in (
            ("ss", 64, lambda i, p: io.write_points_ply(p, (surface_voxels(20000, seed=i % 16).astype(np.float32) + 0.5) / 64 - 0.5)),
            ("slat", 32, lambda i, p: io.save_npz_atomic(p, compresslevel=0, indices=surface_voxels(32768, seed=i % 4),
                                                          patchtokens=random_patchtokens(32768, 1024, seed=i % 4))),
        ):
            paths = []
            for i in range(n):
                path = out / (f"tl_{kind}_{i}" + (".ply" if kind == "ss" else ".npz"))
                make(i, path)
                paths.append(path)
            placed = latents.place(load_encoder("random", kind), kind, "cuda", "auto", compile=kind == "ss")
            inner = latents.request_handler(placed)
            handler = timed("handle", inner)
            handler.concurrency, handler.allocate = inner.concurrency, getattr(inner, "allocate", None)
            worker_ = WorkerInProcess(f"{kind}_latent", handler, {"timeline": 1}, out)
            requests = latent_requests([(f"{i:064x}", p) for i, p in enumerate(paths)], out / f"tl_{kind}_out")
            # the jobs are processes of their own (they read the inputs and write the latents)
            stream = partial(stream_requests, worker_.spec, worker_.settings, worker_.log_dir, processes=True,
                             device=torch.device("cuda"))
            stream(requests[:8], clients=8)  # warm: compile, pinned cache, client processes
            for clients in (1, 8, 16):
                events.clear()
                row = stream([dict(r, output=r["output"] + f".{clients}.npz") for r in requests], clients=clients)
                report(f"{kind} {clients} clients", row["wall_s"])
    finally:
        latents._ss_codec, latents._slat_codec = originals["ss"], originals["slat"]


@section("slatin")
def slat_input_layer():
    """The SLat input layer at 4 x 32k voxels: float32 (TRELLIS's) against half inputs and
    weights with float32 accumulation and output; the whole forward's error either way."""
    from latents_fixtures import random_patchtokens, surface_voxels

    from slatflow import latents
    from slatflow.models import load_encoder

    placed = latents.place(load_encoder("random", "slat"), "slat", "cuda", "auto")
    model = placed.model
    inputs = [(surface_voxels(32768, seed=i), random_patchtokens(32768, 1024, seed=i)) for i in range(4)]
    coords = torch.from_numpy(np.concatenate([np.concatenate([np.full((len(i), 1), b), i], 1) for b, (i, _) in enumerate(inputs)]).astype(np.int64)).cuda()
    half = torch.from_numpy(np.concatenate([t for _, t in inputs])).cuda()
    layer = model.input_layer
    w16 = layer.weight.half()
    with torch.inference_mode():
        fp32 = gpu_ms(lambda: layer(half.float()))
        mixed = gpu_ms(lambda: torch.addmm(layer.bias, half, w16.t(), out_dtype=torch.float32))
        ref = layer(half.float())
        out16 = torch.addmm(layer.bias, half, w16.t(), out_dtype=torch.float32)
        log(f"  input layer ms: float32 {fp32:.2f} (with the cast), half in fp32 out {mixed:.2f}; "
            f"rel {((out16 - ref).norm() / ref.norm()).item():.2e}")
        base = model(half.float(), coords)
        original = layer.forward
        layer.forward = lambda x: torch.addmm(layer.bias, x.half(), w16.t(), out_dtype=torch.float32)
        alt = model(half.float(), coords)
        layer.forward = original
        log(f"  latent rel {((alt - base).norm() / base.norm()).item():.2e} (fp16 torso's own: see gpu tests)")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=Path("/tmp/probe"))
    p.add_argument("--only", nargs="*", default=["env", "gemm", "slat", "ss", "vit"])  # also: timeline, slatin
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import logging
    logging.basicConfig(level=logging.ERROR)
    if "env" in args.only:
        env()
    if "gemm" in args.only:
        gemm()
    if "slat" in args.only:
        slat(args.out)
    if "ss" in args.only:
        ss(args.out)
    if "vit" in args.only:
        vit(args, args.out)
    if "timeline" in args.only:
        timeline(args.out)
    if "slatin" in args.only:
        slat_input_layer()
    log("done")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
