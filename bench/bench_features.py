"""Benchmark: slatflow's features stage against TRELLIS's extract_feature.py, side by side.

Both run in this one process on the same synthetic renders (a ray-cast textured sphere,
`tests/features_fixtures.py`: 150 views of 512x512 RGBA PNG, ~20k surface voxels) and the
same random DINOv2 weights in the official layout (no real weights exist here; timings do
not depend on them, and the output says so):

- TRELLIS: its loop re-implemented faithfully (8 loader threads feeding a queue of 4, each
  asset's views loaded by 16 threads with PIL resize + numpy premultiply + Normalize,
  the official-layout model in fp32 with batch 16, utils3d-style float32 projection,
  grid_sample of the stacked (V, N, D) samples + numpy mean in 8 saver threads).
- slatflow: `FeatureExtractor.run` with its defaults for the device (bf16 autocast + SDPA on
  CUDA, views resized on the device, batch 32).

Reported: seconds per asset end to end (K assets in a row, after one warm-up asset), the
ratio, model-only time and achieved TFLOP/s (FLOPs counted as below), bf16-vs-fp32 per-voxel
cosine similarity, and where slatflow's time goes (CPU decode, device resize, compression).

FLOPs of one ViT forward (T tokens = 1 + registers + patches, width D, L blocks, MLP ratio 4):
    L * (2*T*D*(3D + D + 8D) + 4*T^2*D) + 2*patches*(3*p*p)*D
i.e. qkv, attention projection and MLP matmuls, QK^T and AV, and the patch embedding
(1.017 TFLOP per 518x518 view for ViT-L/14-reg4; softmax, norms and GELU not counted).

GPU (the figures to report; the GPU machine lacks plyfile, carry it as a wheel):
    python bench/bench_features.py --device cuda
CPU smoke run (small sizes, minutes on 2 cores):
    .venv/bin/python bench/bench_features.py --device cpu --arch tiny --views 6 --resolution 128 \\
        --radius 0.3 --assets 2
Visibility-aware vs all-view mean on a sample run's renders (sample settings):
    .venv/bin/python bench/bench_features.py --device cpu --visibility-report results/sample
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from queue import Queue

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from features_fixtures import (  # noqa: E402
    TINY_ARCH,
    random_official_state_dict,
    reference_model,
    trellis_batch_tokens,
    trellis_get_view,
    trellis_indices,
    trellis_mean,
    trellis_normalize,
    trellis_reference_features,
    write_synthetic_asset,
)

from slatflow.dinov2 import ARCHITECTURES, Dinov2Arch, LoadedDinov2, model_from_official_state_dict  # noqa: E402
from slatflow.features import (  # noqa: E402
    FeatureExtractor,
    FeatureJob,
    FeatureSettings,
    decode_view,
    lanczos_resize_rgba,
)
from slatflow.io import read_ply_points  # noqa: E402

logger = logging.getLogger("bench_features")


def vit_flops(arch: Dinov2Arch, image_size: int) -> float:
    """FLOPs of one forward of one image (formula in the module docstring)."""
    patches = (image_size // arch.patch_size) ** 2
    tokens = 1 + arch.num_register_tokens + patches
    d = arch.embed_dim
    blocks = arch.depth * (2 * tokens * d * (4 * d + 2 * arch.mlp_ratio * d) + 4 * tokens**2 * d)
    return blocks + 2 * patches * 3 * arch.patch_size**2 * d


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


# ----------------------------------------------------------------------------------------------
# TRELLIS's loop (dataset_toolkits/extract_feature.py), same threads and order
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def run_trellis(model, jobs: list[FeatureJob], out_dir: Path, device: torch.device, batch_size: int = 16) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    load_queue: Queue = Queue(maxsize=4)

    def get_data(frames, render_dir):
        with ThreadPoolExecutor(max_workers=16) as executor:
            yield from executor.map(lambda frame: trellis_get_view(render_dir, frame), frames)

    def loader(job: FeatureJob):
        frames = json.loads((job.render_dir / "transforms.json").read_text())["frames"]
        data = []
        for datum in get_data(frames, job.render_dir):
            datum["image"] = trellis_normalize(datum["image"])
            data.append(datum)
        load_queue.put((job, data, read_ply_points(job.voxels_path)))

    def saver(job: FeatureJob, pack: dict, patchtokens, uv):
        pack["patchtokens"] = trellis_mean(patchtokens, uv).astype(np.float16)
        np.savez_compressed(out_dir / f"{job.sha256}.npz", **pack)

    with ThreadPoolExecutor(max_workers=8) as loader_executor, ThreadPoolExecutor(max_workers=8) as saver_executor:
        loader_executor.map(loader, jobs)
        for _ in range(len(jobs)):
            job, data, positions = load_queue.get()
            positions = torch.from_numpy(positions).float().to(device)
            pack = {"indices": trellis_indices(positions)}
            token_list, uv_list = [], []
            for i in range(0, len(data), batch_size):
                tokens, uv = trellis_batch_tokens(model, data[i : i + batch_size], positions, device)
                token_list.append(tokens)
                uv_list.append(uv)
            saver_executor.submit(saver, job, pack, torch.cat(token_list), torch.cat(uv_list))
        saver_executor.shutdown(wait=True)


# ----------------------------------------------------------------------------------------------


def make_assets(root: Path, count: int, views: int, resolution: int, radius: float) -> list[FeatureJob]:
    """Asset 0 is rendered; the others are copies under other keys (decode cost is the same)."""
    shas = [f"{i:02d}" * 32 for i in range(count)]
    render_dir, voxels = write_synthetic_asset(
        root, shas[0], num_views=views, resolution=resolution, radius=radius, workers=os.cpu_count() or 1)
    jobs = [FeatureJob(shas[0], render_dir, voxels)]
    for sha in shas[1:]:
        shutil.copytree(render_dir, root / "renders" / sha, dirs_exist_ok=True)
        shutil.copyfile(voxels, root / "voxels" / f"{sha}.ply")
        jobs.append(FeatureJob(sha, root / "renders" / sha, root / "voxels" / f"{sha}.ply"))
    return jobs


def with_outputs(jobs: list[FeatureJob], folder: Path) -> list[FeatureJob]:
    return [FeatureJob(j.sha256, j.render_dir, j.voxels_path, folder / f"{j.sha256}.npz") for j in jobs]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def model_only(extractor: FeatureExtractor, views_u8: torch.Tensor, batch: int) -> float:
    """Seconds for the model (normalize + forward) over all views in batches of `batch`."""
    def run():
        with torch.inference_mode():
            for i in range(0, len(views_u8), batch):
                extractor.patch_token_maps(views_u8[i : i + batch])

    return timed(run, extractor.device)


def visibility_report(root: Path, section: dict) -> None:
    """How much the visibility-aware mean changes the features of the assets rendered under `root`."""
    settings = FeatureSettings.from_config(section)
    plain = FeatureExtractor(settings)
    visible = FeatureExtractor(FeatureSettings.from_config({**section, "visibility": True}), plain.loaded)
    shas = sorted(p.parent.name for p in (root / "renders").glob("*/transforms.json"))
    jobs = [FeatureJob(sha, root / "renders" / sha, root / "voxels" / f"{sha}.ply") for sha in shas]
    print(f"visibility-aware vs all-view mean, {settings.model} ({settings.weights}), {len(jobs)} assets under {root}")
    print("sha256        voxels views  seen/view  cos min   cos median  rel L2")
    for a, b in zip(plain.run(jobs, keep_features=True), visible.run(jobs, keep_features=True)):
        if a.error or b.error:
            print(f"{a.sha256[:12]}  failed: {(a.error or b.error).reason}")
            continue
        cos = cosine(a.features.mean, b.features.mean)
        rel = np.linalg.norm(a.features.mean - b.features.mean) / np.linalg.norm(a.features.mean)
        seen = b.features.views_seen.mean() / b.features.num_views
        print(f"{a.sha256[:12]}  {len(cos):6d} {b.features.num_views:5d}  {seen:9.3f}  {cos.min():7.4f}  "
              f"{np.median(cos):10.4f}  {rel:6.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default="dinov2_vitl14_reg", choices=[*ARCHITECTURES, "tiny"])
    parser.add_argument("--views", type=int, default=150)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--radius", type=float, default=0.48, help="sphere radius (0.48: ~20k voxels)")
    parser.add_argument("--assets", type=int, default=3, help="assets timed per pipeline (after a warm-up one)")
    parser.add_argument("--batch-size", type=int, default=32, help="slatflow's views per forward")
    parser.add_argument("--decode-workers", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd model-only")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "features")
    parser.add_argument("--visibility-report", type=Path, metavar="OUT",
                        help="only report how the visibility mean changes the features of the "
                             "assets rendered and voxelized under OUT (with config/sample.yaml's settings)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.visibility_report:
        import yaml

        sample = yaml.safe_load((REPO / "config" / "sample.yaml").read_text())["features"]
        visibility_report(args.visibility_report, {**sample, "device": args.device})
        return
    device = torch.device(args.device)
    arch = TINY_ARCH if args.arch == "tiny" else ARCHITECTURES[args.arch]
    model_name = "dinov2_vits14_reg" if args.arch == "tiny" else args.arch  # names outputs only
    report: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "arch": args.arch, "views": args.views, "resolution": args.resolution,
                    "torch": torch.__version__, "random_weights": True}
    print(f"features benchmark on {report['device']}, torch {torch.__version__}: RANDOM WEIGHTS "
          f"(no DINOv2 weights exist here; timings do not depend on them)", flush=True)

    shutil.rmtree(args.out, ignore_errors=True)
    started = time.perf_counter()
    jobs = make_assets(args.out / "data", args.assets + 1, args.views, args.resolution, args.radius)
    warm_job, timed_jobs = jobs[0], jobs[1:]
    num_voxels = len(read_ply_points(warm_job.voxels_path))
    report["voxels"] = num_voxels
    print(f"data: {args.assets + 1} assets x {args.views} views {args.resolution}^2, {num_voxels} voxels "
          f"({time.perf_counter() - started:.1f} s)", flush=True)

    state = random_official_state_dict(arch, seed=0)
    trellis_model = reference_model(arch, state).to(device)
    loaded = LoadedDinov2(model_from_official_state_dict(state, arch), arch, "random (official layout)", True)
    del state
    base = dict(model=model_name, weights="random", device=args.device, decode_workers=args.decode_workers)
    ours = FeatureExtractor(FeatureSettings(batch_size=args.batch_size, **base), loaded)

    # end to end: one untimed warm-up asset each, then K assets in a row
    run_trellis(trellis_model, [warm_job], args.out / "trellis_warmup", device)
    trellis_s = timed(lambda: run_trellis(trellis_model, timed_jobs, args.out / "trellis", device), device)
    print(f"TRELLIS  end to end: {trellis_s / args.assets:.3f} s/asset", flush=True)
    ours.run(with_outputs([warm_job], args.out / "slatflow_warmup"))
    slatflow_s = timed(lambda: ours.run(with_outputs(timed_jobs, args.out / "slatflow")), device)
    print(f"slatflow end to end: {slatflow_s / args.assets:.3f} s/asset", flush=True)
    report["trellis_s_per_asset"] = trellis_s / args.assets
    report["slatflow_s_per_asset"] = slatflow_s / args.assets
    report["speedup"] = trellis_s / slatflow_s

    # precision: slatflow bf16 (the default on CUDA) and fp32 against each other and TRELLIS
    fp32 = FeatureExtractor(FeatureSettings(batch_size=args.batch_size, dtype="float32", **base), loaded)
    probe = timed_jobs[0]
    [out_default] = ours.run([probe], keep_features=True)
    [out_fp32] = fp32.run([probe], keep_features=True)
    cos = cosine(out_default.features.mean, out_fp32.features.mean)
    with np.load(args.out / "trellis" / f"{probe.sha256}.npz") as npz:
        trellis_tokens = npz["patchtokens"].astype(np.float32)
        assert (npz["indices"] == out_fp32.features.indices).all()
    report["default_dtype"] = str(ours.compute_dtype).replace("torch.", "")
    report["cosine_default_vs_fp32"] = {"min": float(cos.min()), "median": float(np.median(cos)),
                                        "mean": float(cos.mean())}
    report["fp32_vs_trellis_max_abs_fp16"] = float(
        np.abs(out_fp32.features.patchtokens.astype(np.float32) - trellis_tokens).max())
    _, trellis_mean32 = trellis_reference_features(trellis_model, probe.render_dir, probe.voxels_path, device=device)
    report["fp32_vs_trellis_max_abs_fp32"] = float(np.abs(out_fp32.features.mean - trellis_mean32).max())
    report["feature_abs_mean"] = float(np.abs(trellis_tokens).mean())

    # where the time goes
    views = sorted(probe.render_dir.glob("*.png"))
    decode_cpu = timed(lambda: [decode_view(probe.sha256, p, None) for p in views[:20]], device) / 20
    decode_resize_cpu = timed(lambda: [decode_view(probe.sha256, p, 518) for p in views[:20]], device) / 20
    raw = torch.from_numpy(np.stack([decode_view(probe.sha256, p, None) for p in views])).to(device)
    lanczos_resize_rgba(raw[:2], 518)  # warm-up
    resize_s = timed(lambda: lanczos_resize_rgba(raw, 518), device)
    pil = np.stack([decode_view(probe.sha256, p, 518) for p in views[:8]])
    report["device_resize_bit_exact"] = bool((lanczos_resize_rgba(raw[:8], 518).cpu().numpy() == pil).all())
    compress_s = timed(lambda: np.savez_compressed(args.out / "probe.npz", indices=out_fp32.features.indices,
                                                   patchtokens=out_fp32.features.patchtokens), device)
    report.update(decode_ms_per_view=1e3 * decode_cpu, decode_resize_pil_ms_per_view=1e3 * decode_resize_cpu,
                  device_resize_s_per_asset=resize_s, npz_compress_s=compress_s)

    # model only: the forward over all views, data already on the device
    views_u8 = lanczos_resize_rgba(raw, 518)
    flops = vit_flops(arch, 518) * len(views_u8)
    report["tflop_per_asset"] = flops / 1e12
    model_only(ours, views_u8[: args.batch_size], args.batch_size)  # warm-up
    runs = [model_only(ours, views_u8, args.batch_size) for _ in range(3)]
    report["model_s_default"] = statistics.median(runs)
    for batch in (16, 50, 75):
        model_only(ours, views_u8[:batch], batch)
        report[f"model_s_default_batch{batch}"] = model_only(ours, views_u8, batch)
    report["model_s_fp32_slatflow"] = model_only(fp32, views_u8, args.batch_size)

    def trellis_forward():
        with torch.no_grad():
            for i in range(0, len(views_u8), 16):
                batch = fp32._normalize(views_u8[i : i + 16])
                trellis_model.forward_features(batch)["x_prenorm"]

    report["model_s_trellis_fp32"] = timed(trellis_forward, device)
    if args.compile:  # full batches only, so that one shape compiles
        full = views_u8[: len(views_u8) // args.batch_size * args.batch_size]
        report["compile_views"] = len(full)
        report["model_s_eager_full_batches"] = statistics.median(
            model_only(ours, full, args.batch_size) for _ in range(3))
        try:
            compile_start = time.perf_counter()
            ours.model.encoder = torch.compile(ours.model.encoder, dynamic=False)
            model_only(ours, full[: args.batch_size], args.batch_size)
            report["compile_s"] = time.perf_counter() - compile_start
            report["model_s_compiled_full_batches"] = statistics.median(
                model_only(ours, full, args.batch_size) for _ in range(3))
        except Exception as exc:  # noqa: BLE001 - an optional measurement
            report["compile_error"] = f"{type(exc).__name__}: {exc}"[:300]

    (args.out / "results.json").write_text(json.dumps(report, indent=2))
    print_summary(report)


def print_summary(r: dict) -> None:
    tflops = lambda seconds: r["tflop_per_asset"] / seconds  # noqa: E731
    lines = [
        "",
        f"== features: {r['arch']}, {r['views']} views {r['resolution']}^2 -> 518, {r['voxels']} voxels, "
        f"{r['device']} (RANDOM WEIGHTS) ==",
        f"end to end   TRELLIS fp32 b16 {r['trellis_s_per_asset']:.3f} s/asset   "
        f"slatflow {r['default_dtype']} {r['slatflow_s_per_asset']:.3f} s/asset   speedup {r['speedup']:.1f}x",
        f"model only   ({r['tflop_per_asset']:.1f} TFLOP/asset)  TRELLIS fp32 {r['model_s_trellis_fp32']:.3f} s "
        f"({tflops(r['model_s_trellis_fp32']):.0f} TFLOP/s)   slatflow fp32 {r['model_s_fp32_slatflow']:.3f} s   "
        f"slatflow {r['default_dtype']} {r['model_s_default']:.3f} s ({tflops(r['model_s_default']):.0f} TFLOP/s)",
        "  batch sweep " + "  ".join(
            f"b{b}: {r[f'model_s_default_batch{b}']:.3f} s" for b in (16, 50, 75)),
    ]
    if "model_s_compiled_full_batches" in r:
        share = r["compile_views"] / r["views"]
        eager, compiled = r["model_s_eager_full_batches"], r["model_s_compiled_full_batches"]
        lines.append(f"  torch.compile, first {r['compile_views']} views: eager {eager:.3f} s "
                     f"({share * tflops(eager):.0f} TFLOP/s), compiled {compiled:.3f} s "
                     f"({share * tflops(compiled):.0f} TFLOP/s; compile {r['compile_s']:.0f} s)")
    if "compile_error" in r:
        lines.append(f"  compile failed: {r['compile_error']}")
    cos = r["cosine_default_vs_fp32"]
    lines += [
        f"precision    per-voxel cosine {r['default_dtype']} vs fp32: min {cos['min']:.6f} "
        f"median {cos['median']:.6f}; slatflow fp32 vs TRELLIS (float16 files) max abs "
        f"{r['fp32_vs_trellis_max_abs_fp16']:.2e}, before the float16 cast {r['fp32_vs_trellis_max_abs_fp32']:.2e} "
        f"(mean |feature| {r['feature_abs_mean']:.3f})",
        f"breakdown    PNG decode {r['decode_ms_per_view']:.1f} ms/view, decode+PIL resize "
        f"{r['decode_resize_pil_ms_per_view']:.1f} ms/view (one thread); device resize "
        f"{r['device_resize_s_per_asset'] * 1e3:.1f} ms/asset (bit-exact vs PIL: {r['device_resize_bit_exact']}); "
        f"npz compress {r['npz_compress_s']:.2f} s/asset",
    ]
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
