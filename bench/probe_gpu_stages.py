"""Device probe for issue 17 (exploratory; the figures that count come from bench_pipeline_gpu.py).

One call: where the GPU stages' time goes, and candidate changes side by side.
    PYTHONPATH=. python bench/probe_gpu_stages.py --out /tmp/probe
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
    from features_fixtures import random_official_state_dict

    from bench_features import make_assets, vit_flops
    from slatflow.dinov2 import ARCHITECTURES, FusedDinov2, model_from_official_state_dict
    from slatflow.features import decode_view, lanczos_resize_rgba, FeatureExtractor, FeatureSettings
    from slatflow.dinov2 import LoadedDinov2

    arch = ARCHITECTURES["dinov2_vitl14_reg"]
    state = random_official_state_dict(arch, seed=0)
    model = model_from_official_state_dict(state, arch).cuda().eval()
    flops = vit_flops(arch, 518) * 150
    jobs = make_assets(out / "data", 2, 150, 512, 0.48)
    raw = torch.from_numpy(np.stack([decode_view("x", p, None) for p in sorted(jobs[0].render_dir.glob("*.png"))]))
    views = lanczos_resize_rgba(raw.cuda(), 518)
    mean = torch.tensor((0.485, 0.456, 0.406), device="cuda").view(3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225), device="cuda").view(3, 1, 1)
    pixels = (((views.permute(0, 3, 1, 2).float() / 255)[:, :3] * (views.permute(0, 3, 1, 2).float() / 255)[:, 3:]) - mean) / std

    def timed(name, fwd, batch):
        parts = [pixels[i:i + batch] for i in range(0, 150, batch)]

        def run():
            with torch.inference_mode():
                for p in parts:
                    fwd(p)
        try:
            ms = gpu_ms(run, repeats=3)
            log(f"  {name:55s} {ms:7.1f} ms  {flops / ms / 1e9:5.0f} TFLOP/s")
        except Exception as e:  # noqa: BLE001
            log(f"  {name} failed: {type(e).__name__}: {str(e)[:300]}")
        return run

    for backend in ("auto", "cudnn", "flash"):
        f = FusedDinov2(model, torch.bfloat16, backend).to("cuda")
        timed(f"eager {backend} b30", f, 30)
    comp = {}
    for backend in ("auto", "cudnn"):
        comp[backend] = FusedDinov2(model, torch.bfloat16, backend, compile=True).to("cuda")
        run = timed(f"compiled {backend} b30", comp[backend], 30)
    log("  kernel table, compiled auto b30:")
    kernel_table(lambda: [comp["auto"](pixels[i:i + 30]) for i in range(0, 150, 30)])
    for b in (50,):
        timed(f"compiled auto b{b}", comp["auto"], b)
    # CUDA graph of the whole compiled forward at batch 30
    try:
        f = comp["auto"]
        static_in = pixels[:30].clone()
        with torch.inference_mode():
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    f(static_in)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                static_out = f(static_in)

        def graphed(p):
            static_in.copy_(p)
            g.replay()
            return static_out
        timed("compiled auto b30 + CUDA graph", graphed, 30)
    except Exception as e:  # noqa: BLE001
        log("  graph failed", type(e).__name__, str(e)[:300])
    # the stream's pieces, one asset, compiled default extractor
    loaded = LoadedDinov2(model, arch, "random", True)
    ex = FeatureExtractor(FeatureSettings(model="dinov2_vitl14_reg", weights="random", device="cuda", compile=False,
                                          decode_workers=os.cpu_count()), loaded)
    ex.fused = comp["auto"]
    from slatflow.features import write_features
    ex.process(jobs[0])  # compile
    job = jobs[1]
    for rep in range(2):
        t = time.perf_counter(); asset = ex._prepare(job, ex._decode_pool()); [f.result() for f in asset.images]
        t1 = time.perf_counter(); staged = ex._stage_views(asset)
        t2 = time.perf_counter()
        with torch.inference_mode():
            res = ex._enqueue(asset, staged)
            t3 = time.perf_counter()
            torch.cuda.synchronize()
            t4 = time.perf_counter()
            feats = ex._collect(asset, res)
        t5 = time.perf_counter()
        write_features(out / "w0.npz", feats, False, 0)
        t6 = time.perf_counter()
        write_features(out / "w1.npz", feats, False, 1)
        t7 = time.perf_counter()
        log(f"  pieces ms: decode(16 thr) {1e3*(t1-t):.0f}  stage/pin {1e3*(t2-t1):.0f}  enqueue(cpu) {1e3*(t3-t2):.0f}"
            f"  gpu-wait {1e3*(t4-t3):.0f}  collect {1e3*(t5-t4):.0f}  write L0 {1e3*(t6-t5):.0f}  L1 {1e3*(t7-t6):.0f}"
            f"  ({len(feats.indices)} voxels)")
    with torch.inference_mode():
        log("  kernel table, one asset's _enqueue:")
        kernel_table(lambda: ex._enqueue(asset, staged), top=10)
    # bias + GELU epilogue: max-autotune GEMM templates for the block (time-boxed)
    if time.perf_counter() - T0 < 330:
        import torch._inductor.config as ic
        torch._dynamo.reset()
        s = time.perf_counter()
        try:
            f = FusedDinov2(model, torch.bfloat16, "auto")
            f._block = torch.compile(f._block_eager, dynamic=False, mode="max-autotune-no-cudagraphs")
            f.to("cuda")
            with torch.inference_mode():
                f(pixels[:30])
            log(f"  max-autotune compile {time.perf_counter() - s:.0f} s")
            timed("max-autotune-no-cudagraphs auto b30", f, 30)
        except Exception as e:  # noqa: BLE001
            log("  max-autotune failed", type(e).__name__, str(e)[:300])


def fast_npz(path):
    """Prototype: whole-member inflate in one call (GIL released), CRC checked."""
    import struct
    import zipfile

    out = {}
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
    with open(path, "rb") as fh:
        raw = fh.read()
    for info in infos:
        off = info.header_offset
        n, m = struct.unpack("<HH", raw[off + 26:off + 30])
        start = off + 30 + n + m
        comp = memoryview(raw)[start:start + info.compress_size]
        data = zlib.decompressobj(-15).decompress(comp) if info.compress_type == 8 else comp
        if zlib.crc32(data) != info.CRC:
            raise ValueError("crc")
        import io as bio
        b = bio.BytesIO(memoryview(data)[:256])
        ver = np.lib.format.read_magic(b)
        shape, fortran, dtype = (np.lib.format.read_array_header_1_0 if ver == (1, 0) else np.lib.format.read_array_header_2_0)(b)
        out[info.filename[:-4]] = np.frombuffer(data, dtype, offset=b.tell()).reshape(shape, order="F" if fortran else "C")
    return out


@section("npz read")
def npz_read(out):
    from latents_fixtures import random_patchtokens, surface_voxels

    from slatflow import io, latents
    from concurrent.futures import ThreadPoolExecutor

    idx = surface_voxels(32768, seed=0)
    tok = random_patchtokens(len(idx), 1024, seed=0)
    for level in (0, 1):
        paths = []
        for i in range(8):
            p = out / f"r{level}_{i}.npz"
            io.save_npz_atomic(p, compresslevel=level, indices=idx, patchtokens=tok)
            paths.append(p)
        t = time.perf_counter(); latents.read_sparse_features("x", paths[0], 1024); a = time.perf_counter() - t
        t = time.perf_counter()
        with np.load(paths[0]) as d:
            d["patchtokens"]
        b = time.perf_counter() - t
        t = time.perf_counter(); r = fast_npz(paths[0]); c = time.perf_counter() - t
        assert np.array_equal(r["patchtokens"], tok)
        t = time.perf_counter(); latents._all_finite(tok); fin = time.perf_counter() - t
        with ThreadPoolExecutor(8) as pool:
            t = time.perf_counter(); list(pool.map(lambda p: latents.read_sparse_features("x", p, 1024), paths)); d8 = (time.perf_counter() - t) / 8
            t = time.perf_counter(); list(pool.map(fast_npz, paths)); f8 = (time.perf_counter() - t) / 8
        log(f"  level {level}: read_sparse_features {1e3*a:.0f} ms, np.load {1e3*b:.0f}, fast {1e3*c:.0f}, finite {1e3*fin:.0f};"
            f" 8 threads per file: read_sparse_features {1e3*d8:.1f} ms, fast {1e3*f8:.1f} ms")
        big = torch.from_numpy(np.concatenate([tok] * 4))
        t = time.perf_counter(); big.cuda(); torch.cuda.synchronize(); h = time.perf_counter() - t
        pin = big.pin_memory()
        t = time.perf_counter(); pin.cuda(); torch.cuda.synchronize(); hp = time.perf_counter() - t
        t = time.perf_counter(); np.concatenate([tok] * 4); cc = time.perf_counter() - t
        log(f"  4x32k fp16: concat {1e3*cc:.0f} ms, H2D pageable {1e3*h:.0f} ms, pinned {1e3*hp:.1f} ms")


def varlen_windowed_attention(qkv, coords, window_size, shift):
    from torch.nn.attention.varlen import varlen_attn

    coords = coords.long()
    batch, xyz = coords[:, 0], coords[:, 1:]
    side = 64
    cells = (xyz + shift) // window_size
    per_axis = (side - 1 + shift) // window_size + 1
    window = ((batch * per_axis + cells[:, 0]) * per_axis + cells[:, 1]) * per_axis + cells[:, 2]
    voxel = (xyz[:, 0] * side + xyz[:, 1]) * side + xyz[:, 2]
    order = torch.argsort(window * side**3 + voxel)
    _, lengths = torch.unique_consecutive(window[order], return_counts=True)
    cu = F.pad(torch.cumsum(lengths, 0), (1, 0)).int()
    mx = int(lengths.max())
    q, k, v = qkv[order].unbind(1)
    o = varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, mx, mx)
    out = torch.empty_like(o)
    out[order] = o
    return out


@section("slat")
def slat():
    from latents_fixtures import random_patchtokens, surface_voxels

    from slatflow import latents
    from slatflow.models import load_encoder
    from slatflow.models import slat_encoder as se

    placed = latents.place(load_encoder("random", "slat"), "slat", "cuda", "auto")
    model = placed.model
    inputs = [(surface_voxels(32768, seed=i), random_patchtokens(32768, 1024, seed=i)) for i in range(4)]
    coords = torch.from_numpy(np.concatenate([np.concatenate([np.full((len(i), 1), b), i], 1) for b, (i, _) in enumerate(inputs)]).astype(np.int64)).cuda()
    feats = torch.from_numpy(np.concatenate([t for _, t in inputs])).cuda().float()
    with torch.inference_mode():
        ref = model(feats, coords)
        ms = wall_ms(lambda: model(feats, coords), repeats=5)
        log(f"  current: {ms:.1f} ms per 4x32k forward ({ms / 4:.1f} ms/asset)")
        kernel_table(lambda: model(feats, coords), top=10)
        # varlen prototype: patch the attention module's forward
        orig = se.SparseMultiHeadAttention.forward

        def fwd(self, x, partition):
            num = x.shape[0]
            qkv = self.to_qkv(x).reshape(num, 3, self.num_heads, -1)
            h = varlen_windowed_attention(qkv, partition, 8, partition_shift[id(partition)])
            return self.to_out(h.reshape(num, -1))

        orig_block = se.SparseTransformerBlock.forward
        partition_shift = {}

        def block_fwd(self, x, partition):
            partition_shift[id(coords)] = self.shift
            x = x + fwd(self.attn, self.norm1(x), coords)
            return x + self.mlp(self.norm2(x))
        se.SparseTransformerBlock.forward = block_fwd
        orig_partition = se.window_partition
        se.window_partition = lambda *a: None
        try:
            new = model(feats, coords)
            err = ((new.float() - ref.float()).norm() / ref.float().norm()).item()
            ms = wall_ms(lambda: model(feats, coords), repeats=5)
            log(f"  varlen flash: {ms:.1f} ms per forward ({ms / 4:.1f} ms/asset), rel err vs current {err:.2e}")
            kernel_table(lambda: model(feats, coords), top=8)
        finally:
            se.window_partition = orig_partition
            se.SparseTransformerBlock.forward = orig_block
            se.SparseMultiHeadAttention.forward = orig


@section("ss")
def ss():
    from latents_fixtures import surface_voxels

    from slatflow import latents
    from slatflow.models import common, load_encoder

    placed = latents.place(load_encoder("random", "ss"), "ss", "cuda", "auto")
    model = placed.model
    occ = [latents.voxel_occupancy(surface_voxels(20000, seed=i)) for i in range(16)]
    grids = {b: torch.from_numpy(np.stack(occ[:b])).cuda() for b in (8, 16)}
    refs = {}
    with torch.inference_mode():
        for b in (8, 16):
            g = grids[b]
            log(f"  input {tuple(g.shape)} {g.dtype}")
            refs[b] = model(g).float()
            log(f"  b{b} default: {gpu_ms(lambda: model(g)) / b:.2f} ms/asset")
        torch.backends.cudnn.benchmark = True
        for b in (8, 16):
            g = grids[b]
            log(f"  b{b} cudnn.benchmark: {gpu_ms(lambda: model(g), warmup=2) / b:.2f} ms/asset")
        orig = common.ChannelLayerNorm32.forward

        def cl_forward(self, x):
            h = x.movedim(1, -1)
            h = F.layer_norm(h.float(), self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)
            return h.movedim(-1, 1)
        common.ChannelLayerNorm32.forward = cl_forward
        model.to(memory_format=torch.channels_last_3d)
        try:
            for b in (8, 16):
                g = grids[b].contiguous(memory_format=torch.channels_last_3d)
                err = ((model(g).float() - refs[b]).norm() / refs[b].norm()).item()
                log(f"  b{b} channels_last rel err {err:.2e}")
                log(f"  b{b} channels_last + benchmark: {gpu_ms(lambda: model(g), warmup=2) / b:.2f} ms/asset")
            kernel_table(lambda: model(grids[8].contiguous(memory_format=torch.channels_last_3d)), top=8)
        finally:
            common.ChannelLayerNorm32.forward = orig
        torch.backends.cudnn.benchmark = False


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=Path("/tmp/probe"))
    p.add_argument("--only", nargs="*", default=["env", "npz", "slat", "ss", "vit"])
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import logging
    logging.basicConfig(level=logging.ERROR)
    if "env" in args.only:
        env()
    if "npz" in args.only:
        npz_read(args.out)
    if "slat" in args.only:
        slat()
    if "ss" in args.only:
        ss()
    if "vit" in args.only:
        vit(args, args.out)
    log("done")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
