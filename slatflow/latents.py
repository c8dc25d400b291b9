"""Latent stage: sparse-structure latents, structured latents (SLat) and their statistics.

Per asset, with TRELLIS's encoders (`slatflow.models`, strict-loaded official checkpoints):
- `ss_latents/<ss_enc>/<sha>.npz`: `mean` float32 (8, 16, 16, 16), the sparse-structure
  encoder's posterior mean of the 64^3 occupancy built from `voxels/<sha>.ply`;
- `latents/<feat>_<slat_enc>/<sha>.npz`: `feats` float32 (N, 8) and `coords` uint8 (N, 3),
  the SLat encoder's posterior mean per voxel of `features/<feat>/<sha>.npz`, same order;
- `latents/<name>/stats.json`: `{"mean": [8], "std": [8]}` over assets (TRELLIS's `stat_latent`).

Every latent file carries an extra 0-d bool `random_weights`: True when the encoder, or the
model that made its input features, had random weights. TRELLIS's loaders read only the
keys they need by name, so the files still load unchanged.

Batch-first: `encode_ss_latents` / `encode_slat_latents` take many assets, load the model
once, read inputs ahead on a thread, pack several assets into one forward pass (windows and
convolutions never mix assets), and return the assets that failed, each with its reason.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
import zipfile
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Literal, Sequence, TypeVar

import numpy as np

from slatflow.errors import AssetError, AssetOutcome, ConfigError, outcomes_in_order
from slatflow.grid import TRELLIS_RESOLUTION, outside_grid, voxel_indices
from slatflow.io import read_npz, save_npz_atomic, write_json_atomic, written_by
from slatflow.logs import warn_random_weights
from slatflow.precision import exact_fp32  # noqa: F401 - re-exported for tests and benchmarks
from slatflow.models.checkpoint import LoadedEncoder, load_encoder
from slatflow.models.names import DEFAULT_SPECS, RANDOM_SPEC, EncoderKind, encoder_name, random_config
from slatflow.quarantine import record_failure
from slatflow.stages import LATENT_STATS, SLAT_LATENT, SS_LATENT

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "cuda"]
# "auto": TRELLIS's numerics, the fp16 torso on GPU for `use_fp16` checkpoints, fp32 on CPU.
Precision = Literal["auto", "fp32", "fp16", "bf16"]

SS_STAGE = SS_LATENT.name
SLAT_STAGE = SLAT_LATENT.name
STATS_STAGE = LATENT_STATS.name

# The released encoders' grid: voxelize.resolution must be it (slatflow.config checks).
VOXEL_RESOLUTION = TRELLIS_RESOLUTION
# TRELLIS's training filter on num_voxels; encoding more works, it is only a sizing hint.
TRAINING_VOXEL_CAP = 32768
# Assets per forward pass: a 64^3 x 32-channel fp16 activation is 16 MB, so 8 assets stay
# far below an H100's memory; on CPU a batch gains nothing over one asset at a time.
SS_BATCH = {"cuda": 8, "cpu": 1}
# Voxels per SLat forward pass: 4 assets at the training cap on GPU (about 3 GB of fp16
# activations); on CPU one capped asset (its float32 MLP activation is 400 MB).
SLAT_VOXELS_PER_BATCH = {"cuda": 4 * TRAINING_VOXEL_CAP, "cpu": TRAINING_VOXEL_CAP}
# Assets read ahead of the model by the loader thread.
PREFETCH_ASSETS = 8
# Requests a latent model worker serves at once (their inputs are batched together): as
# many as a GPU forward pass packs, so jobs running side by side fill one.
WORKER_REQUESTS_AT_ONCE = 8
# Latents are stored in stored deflate blocks (np.load reads them as any npz): deflate saves
# 7-8% of float32 latents at level 1 for ~30 ms of CPU per MB (2-core dev machine); a SLat
# latent's write took 56 ms of a model worker's time on an H200's host at level 1
# (bench/probe_gpu_stages.py --only timeline).
LATENT_DEFLATE_LEVEL = 0

FEATURE_KEYS = ("indices", "patchtokens")

T = TypeVar("T")


@dataclass(frozen=True)
class LatentJob:
    """One asset to encode.

    Attributes:
        sha256: the asset's key.
        source: `voxels/<sha>.ply` (SS) or `features/<feat>/<sha>.npz` (SLat).
        output: the latent `.npz` to write.
    """

    sha256: str
    source: Path
    output: Path

    def to_request(self) -> dict:
        """The job as a model worker's request (JSON)."""
        return {"sha256": self.sha256, "source": str(self.source), "output": str(self.output)}

    @classmethod
    def from_request(cls, request: dict) -> "LatentJob":
        return cls(request["sha256"], Path(request["source"]), Path(request["output"]))


@dataclass(frozen=True)
class SparseFeatures:
    """The voxels of one asset with their features.

    Attributes:
        indices: uint8 (N, 3) voxel indices (x, y, z) in [0, 64).
        patchtokens: float16 or float32 (N, C) features, C the encoder's in_channels.
        random_weights: the feature file says its model had random weights.
        finite_checked: whether the reader checked `patchtokens` for NaN and inf (a CUDA
            encoder checks them on the device instead: ~40 ms per 32k voxels on one CPU).
    """

    sha256: str
    indices: np.ndarray
    patchtokens: np.ndarray
    random_weights: bool = False
    finite_checked: bool = True


@dataclass(frozen=True)
class LatentStats:
    """Per-channel statistics of structured latents over assets.

    Attributes:
        mean: float64 (C,) mean over assets of each asset's mean latent.
        std: float64 (C,) sqrt(E[x^2] - mean^2), E[x^2] averaged over assets the same way.
        num_assets: how many latent files went in.
        random_weights: some latent came from a random-weight encoder.
    """

    mean: np.ndarray
    std: np.ndarray
    num_assets: int
    random_weights: bool


@dataclass(frozen=True)
class LatentSettings:
    """The `latents:` config section.

    Attributes:
        ss_encoder, slat_encoder: checkpoint specs: a hub path
            `<org>/<repo>/<file path>`, a local path without suffix, or "random".
        random_ss_args, random_slat_args: with "random", constructor args replacing the
            released architecture's (a test setting for fast runs).
        device: "auto", "cpu" or "cuda".
        precision: the torso dtype; "auto" is TRELLIS's numerics.
        threads: torch CPU threads of a job (a CPU run's speed; idle beside a GPU).
        compile: `torch.compile` the SS encoder on a GPU in a model worker (its first batch
            pays it; a job run in-process does not compile).
    """

    ss_encoder: str = DEFAULT_SPECS["ss"]
    slat_encoder: str = DEFAULT_SPECS["slat"]
    random_ss_args: dict[str, Any] | None = None
    random_slat_args: dict[str, Any] | None = None
    device: Device = "auto"
    precision: Precision = "auto"
    threads: int = 4
    compile: bool = True

    @classmethod
    def from_config(cls, section: dict[str, Any]) -> "LatentSettings":
        known = set(cls.__dataclass_fields__)
        unknown = set(section) - known
        if unknown:
            raise ConfigError(f"latents: unknown keys {sorted(unknown)}; expected some of {sorted(known)}")
        return cls(**{k: (v or None) if k.startswith("random_") else v for k, v in section.items()})

    def spec(self, kind: EncoderKind) -> str:
        return self.ss_encoder if kind == "ss" else self.slat_encoder

    def random_args(self, kind: EncoderKind) -> dict[str, Any] | None:
        return self.random_ss_args if kind == "ss" else self.random_slat_args

    def output_settings(self, kind: EncoderKind) -> dict[str, Any]:
        """What re-runs the `kind` encoder's outputs (its rule's params): the checkpoint spec
        (two folders may hold files of one name), a random architecture, the torso precision;
        the encoder's name is in the output path."""
        return {"spec": self.spec(kind), "random_args": self.random_args(kind), "precision": self.precision}

    def name(self, kind: EncoderKind) -> str:
        """The output folder name of the `kind` encoder (`<ss_enc>`, `<slat_enc>`)."""
        return encoder_name(self.spec(kind), kind, self.random_args(kind))

    def load(self, kind: EncoderKind) -> LoadedEncoder:
        return load_encoder(self.spec(kind), kind, self.random_args(kind))

    def check_feature_channels(self, channels: int, feature_model: str) -> None:
        """Fail early when a random SLat encoder cannot read the configured features.

        (A checkpoint's width is known once its json is read; each asset then fails with
        the widths named.)
        """
        if self.slat_encoder != RANDOM_SPEC:
            return
        expected = random_config("slat", self.random_slat_args)["args"]["in_channels"]
        if expected != channels:
            raise ConfigError(
                f"latents.random_slat_args.in_channels is {expected} but features.model {feature_model} "
                f"writes {channels} channels; set latents.random_slat_args.in_channels: {channels}"
            )


# --- inputs -------------------------------------------------------------------------------


def voxel_indices_from_points(sha256: str, points: np.ndarray, resolution: int = VOXEL_RESOLUTION) -> np.ndarray:
    """Voxel indices of voxel-centre positions, as TRELLIS's `encode_ss_latent` computes them.

    Args:
        points: float (N, 3) voxel centres `(i + 0.5) / resolution - 0.5`, normalized frame.

    Returns:
        int64 (N, 3) indices (slatflow.grid.voxel_indices).

    Raises:
        AssetError: no points, non-finite points, or indices outside [0, resolution).
    """
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] != 3 or len(points) == 0:
        raise AssetError(sha256, f"voxel positions have shape {points.shape}, expected (N>0, 3)", SS_STAGE)
    if not np.isfinite(points).all():
        raise AssetError(sha256, "voxel positions contain NaN or inf", SS_STAGE)
    indices = voxel_indices(points, resolution)  # (N, 3)
    bad = outside_grid(indices, resolution)  # (N,)
    if bad.any():
        row = int(np.argmax(bad))
        raise AssetError(
            sha256,
            f"{int(bad.sum())} voxel positions fall outside the {resolution}^3 grid, "
            f"e.g. {points[row].tolist()} (expected centres in [-0.5, 0.5])",
            SS_STAGE,
        )
    return indices


# the TRELLIS contract's arrays of the latent files, checked before each is renamed into place
LATENT_CONTRACT = {
    "mean": ("float32", (None, None, None, None)),
    "feats": ("float32", (None, None)),
    "coords": ("uint8", (None, 3)),
}


def read_voxel_indices(sha256: str, path: str | Path, resolution: int = VOXEL_RESOLUTION) -> np.ndarray:
    """Read `voxels/<sha>.ply` and return int64 (N, 3) voxel indices (see voxel_indices_from_points)."""
    from slatflow.io import read_ply_points

    try:
        points = read_ply_points(path)  # (N, 3) float32
    except Exception as exc:  # noqa: BLE001 - plyfile raises many types for a bad file
        raise AssetError(sha256, f"unreadable voxel file {written_by(path)}: {type(exc).__name__}: {exc}", SS_STAGE) from exc
    return voxel_indices_from_points(sha256, points, resolution)


def voxel_occupancy(indices: np.ndarray, resolution: int = VOXEL_RESOLUTION) -> np.ndarray:
    """The dense occupancy grid of voxel indices.

    Args:
        indices: integer (N, 3) in [0, resolution).

    Returns:
        float32 (1, R, R, R), 1 at [x, y, z] of every voxel (the encoder's channel axis first).
    """
    grid = np.zeros((1, resolution, resolution, resolution), dtype=np.float32)
    grid[0, indices[:, 0], indices[:, 1], indices[:, 2]] = 1.0
    return grid


NON_FINITE_FEATURES = "patchtokens contain NaN or inf"


def _all_finite(array: np.ndarray) -> bool:
    if array.dtype == np.float16:  # exponent bits all ones is inf or NaN; numpy's float16 isfinite is 4x slower
        return bool(((array.view(np.uint16) & 0x7C00) != 0x7C00).all())
    return bool(np.isfinite(array).all())


def read_sparse_features(
    sha256: str,
    path: str | Path,
    in_channels: int | None,
    resolution: int = VOXEL_RESOLUTION,
    *,
    allocate: Callable[[int], np.ndarray] | None = None,
    check_finite: bool = True,
) -> SparseFeatures:
    """Read and check `features/<feat>/<sha>.npz` (`indices` uint8 (N, 3), `patchtokens` (N, C)).

    Args:
        in_channels: the encoder's feature width; None: any (checked where the encoder is).
        allocate: where to read the arrays (slatflow.io.read_npz); default fresh numpy memory.
        check_finite: check the features for NaN and inf here (a caller that does not must).

    Raises:
        AssetError: unreadable file, missing keys, wrong shapes or dtypes, no voxels,
            indices outside the grid or repeated, non-finite features.
    """

    def bad(reason: str) -> AssetError:
        return AssetError(sha256, f"{path}: {reason}", SLAT_STAGE)

    try:
        data = read_npz(path, allocate)
    except (OSError, ValueError) as exc:
        raise AssetError(
            sha256, f"unreadable feature file {written_by(path)}: {type(exc).__name__}: {exc}", SLAT_STAGE
        ) from exc
    missing = [key for key in FEATURE_KEYS if key not in data]
    if missing:
        raise bad(f"missing {missing}, found {sorted(data)}")
    indices, tokens = data["indices"], data["patchtokens"]
    random_weights = bool(data["random_weights"]) if "random_weights" in data else False

    if indices.ndim != 2 or indices.shape[1] != 3:
        raise bad(f"indices have shape {indices.shape}, expected (N, 3)")
    if indices.dtype.kind not in "ui":
        raise bad(f"indices have dtype {indices.dtype}, expected uint8")
    if tokens.dtype not in (np.float16, np.float32):
        raise bad(f"patchtokens have dtype {tokens.dtype}, expected float16")
    if tokens.ndim != 2 or len(tokens) != len(indices):
        width = "channels" if in_channels is None else in_channels
        raise bad(f"patchtokens have shape {tokens.shape}, expected ({len(indices)}, {width})")
    if in_channels is not None:
        _check_feature_width(sha256, path, tokens, in_channels)
    if len(indices) == 0:
        raise bad("no voxels (empty indices)")
    if indices.min() < 0 or indices.max() >= resolution:
        raise bad(f"indices span [{indices.min()}, {indices.max()}], expected [0, {resolution})")
    linear = (indices.astype(np.int64) * [resolution * resolution, resolution, 1]).sum(axis=1)  # (N,)
    if len(np.unique(linear)) != len(linear):
        raise bad(f"{len(linear) - len(np.unique(linear))} repeated voxel indices")
    if check_finite and not _all_finite(tokens):
        raise bad(NON_FINITE_FEATURES)
    return SparseFeatures(sha256, indices.astype(np.uint8), tokens, random_weights, finite_checked=check_finite)


def _check_feature_width(sha256: str, path: str | Path, tokens: np.ndarray, in_channels: int) -> None:
    if tokens.shape[1] != in_channels:
        raise AssetError(
            sha256,
            f"{path}: patchtokens have shape {tokens.shape}, expected ({len(tokens)}, {in_channels}): "
            "the SLat encoder's in_channels (does the features model match the encoder?)",
            SLAT_STAGE,
        )


# --- model placement -----------------------------------------------------------------------


def resolve_device(device: Device | str) -> "torch.device":
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


def resolve_torso_dtype(precision: Precision, device: "torch.device", use_fp16: bool) -> "torch.dtype":
    """The dtype of the encoder's torso: fp16 on GPU for `use_fp16` checkpoints under "auto"."""
    import torch

    if precision == "auto":
        return torch.float16 if device.type == "cuda" and use_fp16 else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def place_encoder(encoder: LoadedEncoder, device: "torch.device", dtype: "torch.dtype") -> Any:
    """A copy of the encoder's model on `device` with its torso in `dtype` (the original stays fp32)."""
    import torch

    model = encoder.model
    if device.type != "cpu" or dtype != torch.float32:
        model = copy.deepcopy(model).to(device)
        model.set_torso_dtype(dtype)
    if device.type == "cuda" and encoder.kind == "ss":  # its forward runs channels-last on CUDA
        model = model.to(memory_format=torch.channels_last_3d)
    return model.eval()


# --- the batch loop ------------------------------------------------------------------------


def _read_ahead(jobs: Sequence[LatentJob], read: Callable[[LatentJob], T], depth: int) -> Iterator[tuple[LatentJob, T | AssetError]]:
    """Yield (job, read(job) or its AssetError) in order, reading up to `depth` jobs ahead."""

    def guarded(job: LatentJob) -> T | AssetError:
        try:
            return read(job)
        except AssetError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: deque[tuple[LatentJob, Future]] = deque()
        queue = iter(jobs)
        for job in queue:
            pending.append((job, pool.submit(guarded, job)))
            if len(pending) >= depth:
                break
        while pending:
            job, future = pending.popleft()
            following = next(queue, None)
            if following is not None:
                pending.append((following, pool.submit(guarded, following)))
            yield job, future.result()


def _batches(items: Iterable[tuple[LatentJob, T]], size_of: Callable[[T], int], budget: int) -> Iterator[list[tuple[LatentJob, T]]]:
    """Group items in order into batches whose sizes sum to at most `budget` (one oversize item alone)."""
    batch: list[tuple[LatentJob, T]] = []
    used = 0
    for item in items:
        size = size_of(item[1])
        if batch and used + size > budget:
            yield batch
            batch, used = [], 0
        batch.append(item)
        used += size
    if batch:
        yield batch


def _run_split_on_oom(
    batch: list[tuple[LatentJob, T]],
    forward: Callable[[list[tuple[LatentJob, T]]], list[np.ndarray]],
    stage: str,
    describe: Callable[[T], str],
) -> list[np.ndarray | AssetError]:
    """forward(batch), halving the batch when the GPU runs out of memory."""
    import torch

    try:
        return list(forward(batch))
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        if len(batch) == 1:
            job, item = batch[0]
            return [AssetError(job.sha256, f"out of GPU memory encoding {describe(item)}", stage)]
        half = len(batch) // 2
        return _run_split_on_oom(batch[:half], forward, stage, describe) + _run_split_on_oom(
            batch[half:], forward, stage, describe
        )


@dataclass(frozen=True)
class _Codec:
    """How one encoder reads, batches, runs and packs its assets (SS or SLat)."""

    stage: str
    read: Callable[[LatentJob], Any]  # -> the asset's input; raises AssetError
    size_of: Callable[[Any], int]  # an input's share of `budget`
    budget: int  # per forward pass
    forward: Callable[[list[tuple[LatentJob, Any]]], list[np.ndarray]]
    pack: Callable[[Any, np.ndarray], dict[str, np.ndarray]]  # input, result -> the npz arrays
    describe: Callable[[Any], str]
    random_weights: bool
    unpack: Callable[[LatentJob, dict], Any] | None = None  # a worker request's arrays -> the input

    def check(self, job: LatentJob, item: Any, result: np.ndarray | AssetError) -> np.ndarray | AssetError:
        if not isinstance(result, AssetError) and not np.isfinite(result).all():
            return AssetError(job.sha256, f"non-finite latent from {self.describe(item)}", self.stage)
        return result

    def arrays(self, item: Any, result: np.ndarray) -> dict[str, np.ndarray]:
        """The latent file's arrays."""
        arrays = self.pack(item, result)
        arrays["random_weights"] = np.bool_(self.random_weights or bool(arrays.get("random_weights", False)))
        return arrays

    def write(self, job: LatentJob, item: Any, result: np.ndarray) -> None:
        save_latent(job, self.arrays(item, result))


def save_latent(job: LatentJob, arrays: dict[str, np.ndarray]) -> None:
    """Write a latent file (checked against the contract, renamed into place)."""
    contract = {key: LATENT_CONTRACT[key] for key in arrays if key in LATENT_CONTRACT}
    save_npz_atomic(job.output, contract=contract, compresslevel=LATENT_DEFLATE_LEVEL, **arrays)


def _encode_all(jobs: Sequence[LatentJob], codec: _Codec) -> dict[str, AssetError]:
    """Read, batch, encode, check and write every job; return the failures by sha256."""
    failures: dict[str, AssetError] = {}
    stage = codec.stage

    def record(sha256: str, error: AssetError) -> None:
        logger.error("%s", error)
        failures[sha256] = error

    def keep_readable(stream):
        for job, item in stream:
            if isinstance(item, AssetError):
                record(job.sha256, item)
            else:
                yield job, item

    with ThreadPoolExecutor(max_workers=2) as writer:
        writes: list[tuple[LatentJob, Future]] = []
        readable = keep_readable(_read_ahead(jobs, codec.read, PREFETCH_ASSETS))
        for batch in _batches(readable, codec.size_of, codec.budget):
            start = time.perf_counter()
            results = _run_split_on_oom(batch, codec.forward, stage, codec.describe)
            for (job, item), result in zip(batch, results):
                result = codec.check(job, item, result)
                if isinstance(result, AssetError):
                    record(job.sha256, result)
                else:
                    writes.append((job, writer.submit(codec.write, job, item, result)))
            logger.info(
                "%s: encoded %d assets (%s) in %.2f s",
                stage,
                len(batch),
                ", ".join(codec.describe(item) for _, item in batch),
                time.perf_counter() - start,
            )
        for job, future in writes:
            try:
                future.result()
            except OSError as exc:
                record(job.sha256, AssetError(job.sha256, f"cannot write {job.output}: {exc}", stage))
    logger.info("%s: %d of %d assets written", stage, len(jobs) - len(failures), len(jobs))
    return failures


class _RequestBatcher:
    """Encodes the assets of a model worker's concurrent requests together.

    Each request thread reads its own input (in parallel), hands it here and waits; one
    device thread takes whatever has arrived, up to the codec's budget, as one forward pass.
    So jobs running side by side share forward passes, as a batch run's assets do.
    """

    def __init__(self, codec: _Codec):
        import queue

        self.codec = codec
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._loop, name=f"{codec.stage}-device", daemon=True).start()

    def encode(self, job: LatentJob, item: Any) -> np.ndarray | AssetError:
        future: Future = Future()
        self._queue.put((job, item, future))
        return future.result()

    def _loop(self) -> None:
        import queue

        held = None  # an arrival that did not fit the previous batch
        while True:
            first = held or self._queue.get()
            held = None
            batch, used = [first], self.codec.size_of(first[1])
            while True:
                try:
                    following = self._queue.get_nowait()
                except queue.Empty:
                    break
                size = self.codec.size_of(following[1])
                if used + size > self.codec.budget:
                    held = following
                    break
                batch.append(following)
                used += size
            try:
                results = _run_split_on_oom([(job, item) for job, item, _ in batch], self.codec.forward,
                                            self.codec.stage, self.codec.describe)
            except Exception as exc:  # noqa: BLE001 - each request re-raises it (the worker retires)
                for _, _, future in batch:
                    future.set_exception(exc)
                continue
            for (_, _, future), result in zip(batch, results):
                future.set_result(result)


@dataclass(frozen=True)
class PlacedEncoder:
    """An encoder's model on its device with its torso dtype, ready for many calls."""

    encoder: LoadedEncoder
    device: "torch.device"
    dtype: "torch.dtype"
    model: Any


def place(encoder: LoadedEncoder | str, kind: EncoderKind, device: Device | str, precision: Precision,
          compile: bool = False) -> PlacedEncoder:
    """Load (from a spec) and place an encoder once, for a model worker or a long batch.

    Args:
        compile: on CUDA, `torch.compile` the SS encoder (its float32 channel norms and SiLUs
            over 64^3 grids become fused kernels: 3.6 -> 1.3 ms per asset on an H200 at 8
            per forward, bench/probe_gpu_stages.py). The SLat encoder's voxel counts change
            every batch, so it runs as it is.
    """
    encoder = encoder if isinstance(encoder, LoadedEncoder) else load_encoder(encoder, kind)
    dev = resolve_device(device)
    dtype = resolve_torso_dtype(precision, dev, encoder.config["args"].get("use_fp16", False))
    logger.info("%s encoder %s on %s, torso %s", kind, encoder.name, dev, dtype)
    model = place_encoder(encoder, dev, dtype)
    if compile and kind == "ss" and dev.type == "cuda":
        model = CompiledBatchForward(model, f"{kind} encoder")
    return PlacedEncoder(encoder, dev, dtype, model)


class CompiledBatchForward:
    """A model's forward through `torch.compile`, one graph for any batch size, falling back
    to the model itself (with a warning) where the build cannot compile (no C compiler for
    Triton, say)."""

    def __init__(self, model, name: str):
        import torch

        self.model = model
        self.name = name
        self._compiled = torch.compile(model)  # called from one device thread (a worker's batcher, a batch loop)

    def __call__(self, batch: "torch.Tensor") -> "torch.Tensor":
        import torch

        if self._compiled is None:
            return self.model(batch)
        if len(batch) == 1:  # a batch of 1 would specialise a graph of its own: pad it to 2
            return self(torch.cat([batch, batch]))[:1]
        torch._dynamo.mark_dynamic(batch, 0)
        try:
            return self._compiled(batch)
        except Exception as exc:  # noqa: BLE001 - an unusable compiler must not fail the assets
            logger.warning("torch.compile of the %s failed (%s: %s); it runs uncompiled", self.name,
                           type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            self._compiled = None
            return self.model(batch)


def _placed_encoder(
    encoder: LoadedEncoder | PlacedEncoder | str, kind: EncoderKind, device: Device | str, precision: Precision
) -> tuple[LoadedEncoder, "torch.device", "torch.dtype", Any]:
    """(encoder, device, torso dtype, model placed there) for an encoder, its spec or its placement."""
    placed = encoder if isinstance(encoder, PlacedEncoder) else place(encoder, kind, device, precision)
    return placed.encoder, placed.device, placed.dtype, placed.model


def encode_ss_latents(
    jobs: Sequence[LatentJob],
    encoder: LoadedEncoder | PlacedEncoder | str,
    device: Device | str = "auto",
    precision: Precision = "auto",
    batch_size: int | None = None,
) -> list[AssetOutcome]:
    """Encode `voxels/<sha>.ply` files into `ss_latents/<ss_enc>/<sha>.npz` (`mean` (8, 16, 16, 16)).

    Args:
        jobs: (sha256, voxel PLY, output npz) per asset.
        encoder: a loaded SparseStructureEncoder, its placement (`place`), or its spec
            (see slatflow.models.checkpoint).
        device: "auto" (CUDA when available), "cpu" or "cuda[:i]".
        precision: torso dtype; "auto" is TRELLIS's (fp16 on GPU, fp32 on CPU).
        batch_size: assets per forward pass; default SS_BATCH[device type].

    Returns:
        One outcome per job, in order: its AssetError naming the cause, or written.
    """
    failed = _encode_all(jobs, _ss_codec(encoder, device, precision, batch_size))
    return outcomes_in_order([job.sha256 for job in jobs], failed)


def _ss_codec(
    encoder: LoadedEncoder | PlacedEncoder | str,
    device: Device | str = "auto",
    precision: Precision = "auto",
    batch_size: int | None = None,
) -> _Codec:
    """The codec of `encode_ss_latents` (also a model worker's)."""
    import torch

    encoder, dev, dtype, model = _placed_encoder(encoder, "ss", device, precision)
    resolution = VOXEL_RESOLUTION

    def read(job: LatentJob) -> np.ndarray:
        return read_voxel_indices(job.sha256, job.source, resolution)

    def forward(batch: list[tuple[LatentJob, np.ndarray]]) -> list[np.ndarray]:
        grids = torch.from_numpy(np.stack([voxel_occupancy(idx, resolution) for _, idx in batch]))
        with torch.inference_mode(), exact_fp32(dev, dtype):
            mean = model(grids.to(dev))  # (B, 8, 16, 16, 16)
        return list(mean.float().cpu().numpy())

    return _Codec(
        SS_STAGE,
        read,
        size_of=lambda _: 1,
        budget=batch_size or SS_BATCH[dev.type],
        forward=forward,
        pack=lambda _, mean: {"mean": mean.astype(np.float32)},
        describe=lambda idx: f"{len(idx)} voxels",
        random_weights=encoder.random_weights,
        unpack=lambda job, request: _request_array(job, request, "indices", SS_STAGE),
    )


def encode_slat_latents(
    jobs: Sequence[LatentJob],
    encoder: LoadedEncoder | PlacedEncoder | str,
    device: Device | str = "auto",
    precision: Precision = "auto",
    max_voxels_per_batch: int | None = None,
) -> list[AssetOutcome]:
    """Encode `features/<feat>/<sha>.npz` files into `latents/<feat>_<slat_enc>/<sha>.npz`.

    Each output holds `feats` float32 (N, 8) and `coords` uint8 (N, 3), row i for the
    feature file's voxel i.

    Args:
        jobs: (sha256, feature npz, output npz) per asset.
        encoder: a loaded SLatEncoder, its placement (`place`), or its spec
            (see slatflow.models.checkpoint).
        device: "auto" (CUDA when available), "cpu" or "cuda[:i]".
        precision: torso dtype; "auto" is TRELLIS's (fp16 on GPU, fp32 on CPU).
        max_voxels_per_batch: voxels packed into one forward pass (several assets; one
            larger asset runs alone); default SLAT_VOXELS_PER_BATCH[device type].

    Returns:
        One outcome per job, in order: its AssetError naming the cause, or written.
    """
    failed = _encode_all(jobs, _slat_codec(encoder, device, precision, max_voxels_per_batch))
    return outcomes_in_order([job.sha256 for job in jobs], failed)


def _slat_codec(
    encoder: LoadedEncoder | PlacedEncoder | str,
    device: Device | str = "auto",
    precision: Precision = "auto",
    max_voxels_per_batch: int | None = None,
) -> _Codec:
    """The codec of `encode_slat_latents` (also a model worker's)."""
    import torch

    encoder, dev, dtype, model = _placed_encoder(encoder, "slat", device, precision)
    args = encoder.config["args"]
    resolution = args.get("resolution", VOXEL_RESOLUTION)

    def read(job: LatentJob) -> SparseFeatures:
        # on CUDA the reading thread reads the features into pinned memory, so the device
        # thread only starts an asynchronous copy of 64 MB per 32k-voxel asset, and their
        # NaN check is left to the device
        on_cuda = dev.type == "cuda"
        return read_sparse_features(job.sha256, job.source, args["in_channels"], resolution,
                                    allocate=_pinned_if_large if on_cuda else None, check_finite=not on_cuda)

    def forward(batch: list[tuple[LatentJob, SparseFeatures]]) -> list[np.ndarray | AssetError]:
        sizes = [len(item.indices) for _, item in batch]
        coords = np.concatenate(
            [np.concatenate([np.full((n, 1), b), item.indices], axis=1) for b, (n, (_, item)) in enumerate(zip(sizes, batch))]
        )  # (N, 4): batch index, x, y, z
        spans = np.cumsum([0] + sizes)
        with torch.inference_mode(), exact_fp32(dev, dtype):
            # from pinned memory (CUDA) the copies queue behind the device's work
            feats = torch.cat([torch.from_numpy(item.patchtokens).to(dev, non_blocking=True) for _, item in batch])  # (N, C)
            all_finite = [True] * len(batch)
            if not all(item.finite_checked for _, item in batch):
                finite = torch.isfinite(feats).all(dim=1)  # (N,); an asset's NaN stays in its own windows, zeroed anyway
                feats = torch.where(finite[:, None], feats, 0)
                all_finite = torch.stack([finite[a:b].all() for a, b in zip(spans[:-1], spans[1:])]).cpu().tolist()
            mean = model(feats, torch.from_numpy(coords.astype(np.int64)).to(dev))  # (N, 8)
        means = np.split(mean.float().cpu().numpy(), spans[1:-1])
        return [
            latent if ok else AssetError(job.sha256, f"{job.source}: {NON_FINITE_FEATURES}", SLAT_STAGE)
            for (job, _), latent, ok in zip(batch, means, all_finite)
        ]

    return _Codec(
        SLAT_STAGE,
        read,
        size_of=lambda item: len(item.indices),
        budget=max_voxels_per_batch or SLAT_VOXELS_PER_BATCH[dev.type],
        forward=forward,
        pack=lambda item, mean: {
            "feats": mean.astype(np.float32),
            "coords": item.indices,
            "random_weights": np.bool_(item.random_weights),
        },
        describe=lambda item: f"{len(item.indices)} voxels",
        random_weights=encoder.random_weights,
        unpack=lambda job, request: _requested_features(job, request, args["in_channels"]),
    )


def _request_array(job: LatentJob, request: dict, key: str, stage: str) -> np.ndarray:
    if not isinstance(request.get(key), np.ndarray):  # a path-only request (a job of another slatflow)
        raise AssetError(job.sha256, f"the worker's request carries no {key!r} array (read by the job)", stage)
    return request[key]


def _requested_features(job: LatentJob, request: dict, in_channels: int) -> SparseFeatures:
    """A SLat request's features (read and checked by the job, but for their width, which the
    encoder's checkpoint sets, and their finiteness, which the device checks)."""
    tokens = _request_array(job, request, "patchtokens", SLAT_STAGE)
    _check_feature_width(job.sha256, job.source, tokens, in_channels)
    return SparseFeatures(job.sha256, _request_array(job, request, "indices", SLAT_STAGE), tokens,
                          bool(request.get("random_features", False)), finite_checked=False)


def latent_request(kind: EncoderKind, job: LatentJob) -> dict:
    """What a latent job sends its model worker: the job, with its input read and checked here,
    in the job's own process (the worker, shared by the jobs side by side, only runs the model).

    Raises:
        AssetError: the input is unreadable or malformed (see read_voxel_indices,
            read_sparse_features).
    """
    if kind == "ss":
        return {**job.to_request(), "indices": read_voxel_indices(job.sha256, job.source).astype(np.uint8)}
    # the finiteness check is the device's (a float16 pass over 64 MB costs a CPU ~40 ms)
    features = read_sparse_features(job.sha256, job.source, None, check_finite=False)
    return {**job.to_request(), "indices": features.indices, "patchtokens": features.patchtokens,
            "random_features": features.random_weights}


def run_latent_job(kind: EncoderKind, job: LatentJob, submit: Callable[[dict], dict]) -> None:
    """A latent job: read its input, `submit` it (to the model worker, or a handler in-process)
    and write the latent that comes back."""
    save_latent(job, submit(latent_request(kind, job)))


def _pinned_if_large(size: int) -> np.ndarray:
    """Page-locked memory for a large array (the feature matrix: the copy to the GPU runs
    asynchronously from it), ordinary memory for the small ones."""
    import torch

    if size < 1 << 20:
        return np.empty(size, np.uint8)
    return torch.empty(size, dtype=torch.uint8, pin_memory=True).numpy()


def _worker_service(kind: EncoderKind, settings: dict) -> Callable[[dict], None]:
    """Requests are served at once (WORKER_REQUESTS_AT_ONCE): each reads its input and writes
    its output in its own thread; the encoder runs the inputs that arrived together as one batch."""
    import torch

    from slatflow import worker

    latent_settings = LatentSettings.from_config(settings["latents"])
    torch.set_num_threads(settings["threads"] or latent_settings.threads)
    # a job that runs its one asset in-process (workers disabled) would pay the compile for one forward
    compile = latent_settings.compile and worker.serving()
    return request_handler(place(latent_settings.load(kind), kind, latent_settings.device, latent_settings.precision,
                                 compile))


def request_handler(placed: PlacedEncoder) -> Callable[[dict], None]:
    """A latent worker's handler around a placed encoder (thread-safe: `concurrency` at once)."""
    codec = (_ss_codec if placed.encoder.kind == "ss" else _slat_codec)(placed)
    batcher = _RequestBatcher(codec)

    def handle(request: dict) -> dict[str, np.ndarray]:
        if placed.encoder.random_weights:  # said in every asset's log
            warn_random_weights(logger, placed.encoder.name)
        job = LatentJob.from_request(request)
        item = codec.unpack(job, request)
        result = codec.check(job, item, batcher.encode(job, item))
        if isinstance(result, AssetError):
            raise result
        logger.info("%s: %s encoded for %s", codec.stage, codec.describe(item), job.output)
        return codec.arrays(item, result)

    handle.concurrency = WORKER_REQUESTS_AT_ONCE
    if placed.device.type == "cuda":  # a request's features land in page-locked memory (async copy)
        handle.allocate = _pinned_if_large
    return handle


def ss_worker_service(settings: dict) -> Callable[[dict], None]:
    """A model worker's handler (slatflow.worker) for the SS encoder: settings are
    `{"latents": <config section>, "threads": n}`, requests `{"sha256", "source", "output"}`."""
    return _worker_service("ss", settings)


def slat_worker_service(settings: dict) -> Callable[[dict], None]:
    """As `ss_worker_service`, for the SLat encoder (sources are feature npz files)."""
    return _worker_service("slat", settings)


# --- statistics ----------------------------------------------------------------------------


def compute_latent_stats(paths: Sequence[str | Path]) -> LatentStats:
    """Per-channel mean and std of structured latents (TRELLIS's `stat_latent`).

    Each asset counts once: mean = average over assets of the asset's mean latent,
    std = sqrt(average of the assets' mean squared latent - mean^2), in float64.

    Args:
        paths: `latents/<name>/<sha>.npz` files with `feats` float (N, C).

    Raises:
        AssetError: a file without a readable float (N>0, C) `feats`, or whose C differs.
        ValueError: no paths.
    """
    if not paths:
        raise ValueError("no latent files to compute statistics from")
    means, mean_squares = [], []
    random_weights = False
    for path in paths:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                feats = data["feats"]
                random_weights |= bool(data["random_weights"]) if "random_weights" in data.files else False
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise AssetError(path.stem, f"unreadable latent {path}: {type(exc).__name__}: {exc}", STATS_STAGE) from exc
        if feats.ndim != 2 or len(feats) == 0 or feats.dtype.kind != "f":
            raise AssetError(path.stem, f"{path}: feats {feats.dtype} {feats.shape}, expected float (N>0, C)", STATS_STAGE)
        if means and feats.shape[1] != len(means[0]):
            raise AssetError(path.stem, f"{path}: {feats.shape[1]} channels, others have {len(means[0])}", STATS_STAGE)
        feats = feats.astype(np.float64)
        means.append(feats.mean(axis=0))  # (C,)
        mean_squares.append((feats**2).mean(axis=0))  # (C,)
    mean = np.mean(means, axis=0)  # (C,)
    variance = np.mean(mean_squares, axis=0) - mean**2
    std = np.sqrt(np.maximum(variance, 0.0))  # rounding can make a zero variance negative
    return LatentStats(mean=mean, std=std, num_assets=len(means), random_weights=random_weights)


def write_latent_stats(paths: Sequence[str | Path], out_path: str | Path) -> LatentStats:
    """Compute the statistics of `paths` and write `{"mean", "std", "num_assets", "random_weights"}`."""
    stats = compute_latent_stats(paths)
    write_json_atomic(
        out_path,
        {
            "mean": stats.mean.tolist(),
            "std": stats.std.tolist(),
            "num_assets": stats.num_assets,
            "random_weights": stats.random_weights,
        },
    )
    if stats.random_weights:
        logger.warning("latent stats %s come from random-weight latents (random_weights: true)", out_path)
    logger.info("latent stats over %d assets -> %s", stats.num_assets, out_path)
    return stats


def latent_stats_job(paths: Sequence[str | Path], out_path: str | Path, out_dir: str | Path, log_path: str = "") -> None:
    """Write the statistics of one latent folder; quarantine a latent file that cannot be read.

    A broken latent quarantines its asset (stage `slat_latent`), so the next run, which
    leaves quarantined assets out, computes the statistics without it.

    Raises:
        AssetError: the broken latent.
    """
    try:
        write_latent_stats(paths, out_path)
    except AssetError as exc:
        record_failure(out_dir, SLAT_STAGE, exc.sha256, exc.reason, log_path)
        raise
