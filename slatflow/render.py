"""Render stage: TRELLIS's Blender renders of each asset, one bpy subprocess per asset.

For each asset this writes `<out_root>/<sha256>/{000..V-1}.png`, `mesh.ply` (views only) and
`transforms.json` (written last; its existence means complete), as the TRELLIS contract
says. The Blender work runs in `slatflow/blender_render.py` under a Python that has bpy, in
its own process group with a timeout; everything Blender prints goes to this process's
`logging` (the rule's log), and a failure becomes an `AssetError` with a one-line reason.

Outputs are written into a staging folder beside the final one and renamed into place only
when every file is there, so a killed job never leaves a render that looks complete.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator, Literal, Mapping, NamedTuple, Sequence

import numpy as np

from slatflow import blender_render
from slatflow.cameras import camera_offset, sphere_hammersley_sequence
from slatflow.errors import AssetError, AssetOutcome, ConfigError
from slatflow.stages import RENDER, RENDER_COND

logger = logging.getLogger(__name__)
blender_logger = logging.getLogger("slatflow.blender")

STAGE = RENDER.name
COND_STAGE = RENDER_COND.name

# file extension (lower case, no dot) -> format name understood by blender_render
SUPPORTED_FORMATS = {
    "glb": "glb", "gltf": "gltf", "obj": "obj", "fbx": "fbx", "ply": "ply", "stl": "stl",
    "usd": "usd", "usda": "usda", "usdc": "usdc", "usdz": "usdz", "abc": "abc", "blend": "blend",
    "dae": "dae",
}

# RASTER: Blender imports and normalizes, slatflow.raster draws the views with OpenGL
Engine = Literal["CYCLES", "BLENDER_EEVEE_NEXT", "RASTER"]
Device = Literal["CPU", "CUDA", "OPTIX"]
ENGINES = ("CYCLES", "BLENDER_EEVEE_NEXT", blender_render.RASTER_ENGINE)
DEVICES = ("CPU", "CUDA", "OPTIX")

SIGKILL_GRACE_S = 5.0  # after SIGTERM on timeout, before SIGKILL of the whole process group
OUTPUT_TAIL_LINES = 40  # Blender lines kept in memory to explain a crash


@dataclasses.dataclass(frozen=True)
class RenderSettings:
    """How to render the views of one asset. The defaults are TRELLIS's (dataset_toolkits/render.py
    and blender_script/render.py): 150 views of 512^2, radius 2, FOV 40 degrees, Cycles at 128
    samples with OIDN, box filter width 1, bounces 1/1/3/3, Filmic.

    Attributes:
        timeout_s: wall-clock limit of one asset's Blender process; it is killed past it.
        threads: Blender's render threads; 0 = all cores (set per job from Snakemake's threads).
        python: the Python that has bpy; None = this interpreter.
    """

    num_views: int = 150
    resolution: int = 512
    radius: float = 2.0
    fov_degrees: float = 40.0
    engine: Engine = "CYCLES"
    device: Device = "CPU"
    samples: int = 128
    adaptive_threshold: float = 0.01  # Blender 3.0's default noise threshold; 0 turns it off
    denoise: bool = True
    denoiser: Literal["OPENIMAGEDENOISE", "OPTIX"] = "OPENIMAGEDENOISE"
    filter_width: float = 1.0
    diffuse_bounces: int = 1
    glossy_bounces: int = 1
    transparent_bounces: int = 3
    transmission_bounces: int = 3
    view_transform: str = "Filmic"
    persistent_data: bool = True  # only the camera moves between views: keep the BVH
    tile_size: int = 2048
    timeout_s: float = 3600.0
    threads: int = 0
    python: str | None = None
    raster_samples: int = 4  # MSAA samples of the raster engine (Mesa's llvmpipe allows 4)

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ConfigError(f"render engine {self.engine!r} is not one of {ENGINES}")
        if self.device not in DEVICES:
            raise ConfigError(f"render device {self.device!r} is not one of {DEVICES}")
        for name in ("num_views", "resolution", "samples", "raster_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"render {name} is {getattr(self, name)}, expected >= 1")
        if not 0 < self.fov_degrees < 180:
            raise ConfigError(f"render fov_degrees is {self.fov_degrees}, expected in (0, 180)")
        if self.engine == blender_render.RASTER_ENGINE and self.view_transform not in ("Filmic", "Standard"):
            raise ConfigError(f"render engine RASTER supports view_transform Filmic or Standard, "
                              f"not {self.view_transform!r}")
        if self.radius <= 0 or self.timeout_s <= 0:
            raise ConfigError(f"render radius {self.radius} and timeout_s {self.timeout_s} must be > 0")

    @classmethod
    def from_config(cls, section: Mapping | None, **overrides) -> "RenderSettings":
        """Settings from a config section (keys = field names); unknown keys are an error."""
        values = dict(section or {})
        values.update(overrides)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown render setting(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    @property
    def fov(self) -> float:
        return math.radians(self.fov_degrees)

    def output_settings(self) -> dict:
        """The settings that change the images: what must re-render an asset when it changes
        (not the device, threads, tiles, persistent data, timeout or Blender's Python)."""
        runtime_only = {"device", "threads", "tile_size", "persistent_data", "timeout_s", "python"}
        if self.engine != blender_render.RASTER_ENGINE:
            runtime_only.add("raster_samples")
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in runtime_only}

    def raster_options(self) -> dict:
        """The raster engine's settings (slatflow.raster.RasterOptions fields)."""
        return {"samples": self.raster_samples, "view_transform": self.view_transform}


@dataclasses.dataclass(frozen=True)
class CondSettings:
    """The conditioning views (TRELLIS's render_cond.py): 24 views of 1024^2, same yaw/pitch
    sequence, radius and FOV drawn jointly so the unit cube's bounding sphere fills the same part
    of the frame: k = 1/r^2 uniform, fov = 2 asin(sqrt(3)/2 / r), with fov in [10, 70] degrees.
    Every other setting comes from the `render:` section."""

    num_views: int = 24
    resolution: int = 1024
    fov_min_degrees: float = 10.0
    fov_max_degrees: float = 70.0
    timeout_s: float | None = None  # None: the render section's

    def __post_init__(self):
        if not 0 < self.fov_min_degrees <= self.fov_max_degrees < 180:
            raise ConfigError(f"render_cond FOV range [{self.fov_min_degrees}, {self.fov_max_degrees}] "
                              "must satisfy 0 < min <= max < 180 degrees")
        if self.num_views < 1 or self.resolution < 1:
            raise ConfigError("render_cond num_views and resolution must be >= 1")

    def output_settings(self) -> dict:
        """The settings that change the images (all but the timeout)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "timeout_s"}

    @classmethod
    def from_config(cls, section: Mapping | None) -> "CondSettings":
        values = dict(section or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown render_cond setting(s) {unknown}; known: {sorted(known)}")
        return cls(**values)


class View(NamedTuple):
    """One camera: yaw and pitch (radians) on a sphere of `radius` around the origin, `fov` radians."""

    yaw: float
    pitch: float
    radius: float
    fov: float


class RenderAsset(NamedTuple):
    sha256: str
    source: Path  # the asset's file (a .gltf's buffers and textures beside it)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RenderResult(AssetOutcome):
    """What happened to one asset. `error` is None when `out_dir` holds a complete render."""

    out_dir: Path
    device: str = ""
    seconds: float = 0.0  # the whole job, Blender's start included
    view_seconds: tuple[float, ...] = ()  # each view's render and PNG write
    load_seconds: float = 0.0  # Blender's start, import, normalization and setup


# ---------------------------------------------------------------------------------------------
# Cameras


def trellis_views(sha256: str, num_views: int, radius: float, fov: float) -> tuple[list[View], dict]:
    """The views of the main render: the Hammersley sphere sequence with the asset's offset.

    Returns:
        views, and the fields this adds to transforms.json (`camera_offset`).
    """
    offset = camera_offset(sha256)
    views = [View(*sphere_hammersley_sequence(i, num_views, offset), radius, fov) for i in range(num_views)]
    return views, {"camera_offset": list(offset)}


def cond_seed(sha256: str) -> int:
    """The seed of an asset's conditioning-view draw (TRELLIS draws unseeded)."""
    return int(sha256[16:32], 16)


def cond_views(sha256: str, cond: CondSettings) -> tuple[list[View], dict]:
    """The conditioning views: the same sequence, radius and FOV drawn jointly from a seeded rng.

    Returns:
        views, and the fields this adds to transforms.json (`camera_offset`, `cond_seed`).
    """
    offset = camera_offset(sha256)
    seed = cond_seed(sha256)
    rng = np.random.default_rng(seed)
    half_diagonal = math.sqrt(3) / 2  # the radius of the sphere around [-0.5, 0.5]^3
    radius_min = half_diagonal / math.sin(math.radians(cond.fov_max_degrees) / 2)
    radius_max = half_diagonal / math.sin(math.radians(cond.fov_min_degrees) / 2)
    k = rng.uniform(1 / radius_max**2, 1 / radius_min**2, size=cond.num_views)  # (V,)
    radii = 1 / np.sqrt(k)
    fovs = 2 * np.arcsin(half_diagonal / radii)
    views = [
        View(*sphere_hammersley_sequence(i, cond.num_views, offset), float(radii[i]), float(fovs[i]))
        for i in range(cond.num_views)
    ]
    extra = {"camera_offset": list(offset), "cond_seed": seed,
             "fov_range_degrees": [cond.fov_min_degrees, cond.fov_max_degrees]}
    return views, extra


# ---------------------------------------------------------------------------------------------
# Batch API


def asset_format(sha256: str, source: str | os.PathLike, stage: str = STAGE) -> str:
    """The importer format of `source`, from its extension; an AssetError if slatflow cannot read it."""
    ext = Path(source).suffix.lower().lstrip(".")
    if ext not in SUPPORTED_FORMATS:
        raise AssetError(
            sha256,
            f"unsupported file extension {Path(source).suffix or '(none)'!r} of {Path(source).name}; "
            f"expected one of {sorted(SUPPORTED_FORMATS)}",
            stage,
        )
    return SUPPORTED_FORMATS[ext]


# Renders one exported scene with the raster engine (`slatflow.raster.render_scene`'s request)
# and returns its timings; a model-worker client or the in-process default.
Rasterize = Callable[[dict], dict]


def render_views(
    assets: Sequence[RenderAsset],
    out_root: str | os.PathLike,
    settings: RenderSettings,
    rasterize: Rasterize | None = None,
) -> list[RenderResult]:
    """Render the main views (+ mesh.ply) of each asset into `out_root/<sha256>/`.

    Each asset runs in its own Blender process; one that fails does not stop the others.
    With the raster engine, Blender exports the scene and `rasterize` draws it (default: one
    GL context in this process, kept for every asset).

    Returns:
        one RenderResult per asset, in order; failures carry their AssetError.
    """
    return [
        _render_one(asset, Path(out_root), settings, *trellis_views(
            asset.sha256, settings.num_views, settings.radius, settings.fov), save_mesh=True, stage=STAGE,
            rasterize=rasterize)
        for asset in assets
    ]


def render_cond_views(
    assets: Sequence[RenderAsset],
    out_root: str | os.PathLike,
    settings: RenderSettings,
    cond: CondSettings,
    rasterize: Rasterize | None = None,
) -> list[RenderResult]:
    """Render the conditioning views of each asset into `out_root/<sha256>/` (no mesh.ply)."""
    cond_render = dataclasses.replace(
        settings, num_views=cond.num_views, resolution=cond.resolution,
        timeout_s=cond.timeout_s if cond.timeout_s is not None else settings.timeout_s,
    )
    return [
        _render_one(asset, Path(out_root), cond_render, *cond_views(asset.sha256, cond),
                    save_mesh=False, stage=COND_STAGE, rasterize=rasterize)
        for asset in assets
    ]


# ---------------------------------------------------------------------------------------------
# One asset


def _render_one(
    asset: RenderAsset,
    out_root: Path,
    settings: RenderSettings,
    views: list[View],
    transforms_extra: dict,
    save_mesh: bool,
    stage: str,
    rasterize: Rasterize | None = None,
) -> RenderResult:
    final_dir = out_root / asset.sha256
    started = time.monotonic()
    try:
        result = _render_to(asset, final_dir, settings, views, transforms_extra, save_mesh, stage, rasterize)
    except AssetError as exc:
        if exc.stage is None:
            exc = AssetError(exc.sha256, exc.reason, stage)
        logger.error("%s: %s", asset.sha256, exc.reason)
        return RenderResult(asset.sha256, exc, out_dir=final_dir, seconds=time.monotonic() - started)
    seconds = time.monotonic() - started
    views_s = result.get("view_seconds", [])
    logger.info(
        "%s: %d views rendered on %s in %.1f s (%.2f s/view rendering, %.1f s loading)",
        asset.sha256, len(views), result.get("device", "?"), seconds,
        sum(views_s) / max(len(views_s), 1), result.get("load_seconds", 0.0),
    )
    return RenderResult(asset.sha256, out_dir=final_dir, device=result.get("device", "?"), seconds=seconds,
                        view_seconds=tuple(views_s), load_seconds=result.get("load_seconds", 0.0))


def _render_to(
    asset: RenderAsset,
    final_dir: Path,
    settings: RenderSettings,
    views: list[View],
    transforms_extra: dict,
    save_mesh: bool,
    stage: str,
    rasterize: Rasterize | None = None,
) -> dict:
    sha256 = asset.sha256
    source = Path(asset.source)
    fmt = asset_format(sha256, source, stage)
    if not source.is_file():
        raise AssetError(sha256, f"source file {source} does not exist", stage)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(final_dir)
    staging = final_dir.parent / f".{final_dir.name}.staging-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix=f"slatflow-blender-{sha256[:12]}-") as work:
        job = {
            "sha256": sha256,
            "source": str(source.resolve()),
            "format": fmt,
            "output_dir": str(staging.resolve()),
            "result_path": os.path.join(work, "result.json"),
            "views": [v._asdict() for v in views],
            "resolution": settings.resolution,
            "threads": settings.threads,
            "save_mesh": save_mesh,
            "transforms_extra": transforms_extra,
            "settings": dataclasses.asdict(settings),
            "scene_path": os.path.join(work, "scene.glb"),
        }
        job_path = os.path.join(work, "job.json")
        Path(job_path).write_text(json.dumps(job))
        try:
            result = _run_blender(sha256, job_path, job["result_path"], work, settings, stage)
            if settings.engine == blender_render.RASTER_ENGINE:
                result = rasterize_exported_scene(job, result, views, settings,
                                                  rasterize or _in_process_rasterizer(settings))
            _check_outputs(sha256, staging, len(views), save_mesh, stage)
            _check_readable(sha256, staging, settings.resolution, save_mesh, stage)
            _move_into_place(staging, final_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return result


def rasterize_exported_scene(job: dict, export: dict, views: Sequence[View], settings: RenderSettings,
                             rasterize: Rasterize) -> dict:
    """The raster engine's views of the scene Blender exported, then transforms.json (last).

    Args:
        job: the Blender job (`sha256`, `scene_path`, `resolution`, `output_dir`, `transforms_extra`).
        export: Blender's result (`scale`, `offset`, `blender`).

    Returns:
        the export's result with the raster device and timings.
    """
    from slatflow.raster import raster_views

    frames = raster_views(views)
    started = time.monotonic()
    timings = rasterize({"sha256": job["sha256"], "scene": job["scene_path"], "views": frames,
                         "resolution": job["resolution"], "output_dir": job["output_dir"]}) or {}
    seconds = time.monotonic() - started
    device = timings.get("device", "raster engine")
    transforms = {"aabb": [[-0.5, -0.5, -0.5], [0.5, 0.5, 0.5]], "scale": export["scale"],
                  "offset": export["offset"], **job["transforms_extra"],
                  "renderer": {"blender": export.get("blender", "?"), "engine": settings.engine, "device": device,
                               "samples": settings.raster_samples, "resolution": job["resolution"]},
                  "frames": [{"file_path": f"{i:03d}.png", "camera_angle_x": frame["fov"],
                              "transform_matrix": frame["camera_to_world"]} for i, frame in enumerate(frames)]}
    path = Path(job["output_dir"]) / "transforms.json"
    tmp = path.with_name(".transforms.json.tmp")
    tmp.write_text(json.dumps(transforms, indent=2) + "\n")
    os.replace(tmp, path)
    # as for Cycles, the per-view figure leaves out the per-asset setup (scene upload and shadow
    # maps here, scene sync there), which counts as loading
    views_seconds = timings.get("draw", seconds) + timings.get("write", 0.0)
    setup_seconds = seconds - views_seconds
    return {**export, "device": device, "view_seconds": [views_seconds / max(len(frames), 1)] * len(frames),
            "load_seconds": export.get("load_seconds", 0.0) + setup_seconds, "raster_seconds": seconds}


_RASTERIZERS: dict = {}


def _in_process_rasterizer(settings: RenderSettings) -> Rasterize:
    """One GL context per process and options, kept for every later asset."""
    from slatflow import raster

    options = raster.RasterOptions(**settings.raster_options())
    if options not in _RASTERIZERS:
        _RASTERIZERS[options] = raster.Rasterizer(options)
    return lambda request: raster.render_scene(_RASTERIZERS[options], request)


def _remove_stale_staging(final_dir: Path) -> None:
    """Staging folders of this asset left by a killed job."""
    for stale in final_dir.parent.glob(f".{final_dir.name}.staging-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _check_outputs(sha256: str, staging: Path, num_views: int, save_mesh: bool, stage: str) -> None:
    missing = [f"{i:03d}.png" for i in range(num_views) if not (staging / f"{i:03d}.png").is_file()]
    if save_mesh and not (staging / "mesh.ply").is_file():
        missing.append("mesh.ply")
    if not (staging / "transforms.json").is_file():
        missing.append("transforms.json")
    if missing:
        raise AssetError(sha256, f"Blender exited cleanly but did not write {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}", stage)


def _check_readable(sha256: str, staging: Path, resolution: int, save_mesh: bool, stage: str) -> None:
    """Every file Blender wrote loads: the views are PNGs of the asked size, transforms.json has
    a frame per view, mesh.ply has triangles (checked before the rename, so a render under its
    final name is readable)."""
    from PIL import Image
    from plyfile import PlyData

    views = sorted(staging.glob("[0-9][0-9][0-9].png"))
    path = staging / "transforms.json"
    try:
        frames = json.loads(path.read_text())["frames"]
        if len(frames) != len(views):
            raise ValueError(f"{len(frames)} frames for {len(views)} views")
        for path in views:
            with Image.open(path) as image:
                image.verify()  # reads every chunk and checks its CRC
                if image.size != (resolution, resolution):
                    raise ValueError(f"{image.size[0]}x{image.size[1]}, not {resolution}^2")
    except (OSError, ValueError, KeyError, TypeError, SyntaxError) as exc:
        raise AssetError(
            sha256, f"Blender wrote an unreadable {path.name}: {type(exc).__name__}: {exc}", stage
        ) from exc
    if save_mesh:  # plyfile, not slatflow.voxelize (numba is not in the render env)
        try:
            # triangles (exported triangulated): plyfile memory-maps them instead of a loop per face
            ply = PlyData.read(str(staging / "mesh.ply"), known_list_len={"face": {"vertex_indices": 3}})
            faces = len(ply["face"].data) if "face" in ply else 0
        except Exception as exc:  # noqa: BLE001 - plyfile raises many types for a bad file
            raise AssetError(sha256, f"Blender wrote an unreadable mesh.ply: {type(exc).__name__}: {exc}", stage) from exc
        if faces == 0:
            raise AssetError(sha256, "Blender wrote a mesh.ply without faces", stage)


def _move_into_place(staging: Path, final_dir: Path) -> None:
    """Rename the staging folder onto the final one: it appears complete or not at all."""
    if final_dir.exists():
        # an empty folder (Snakemake makes the outputs' folder) is replaced by the rename;
        # a stale render is moved aside first so the rename can happen
        if any(final_dir.iterdir()):
            old = final_dir.parent / f".{final_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(final_dir, old)
            os.rename(staging, final_dir)
            shutil.rmtree(old, ignore_errors=True)
            return
    os.rename(staging, final_dir)


# ---------------------------------------------------------------------------------------------
# The Blender process


def _blender_env(work: str) -> dict:
    """The child's environment: bpy's caches and settings go to the job's temporary folder."""
    env = dict(os.environ)
    for name, sub in (("HOME", "home"), ("XDG_CONFIG_HOME", "config"), ("XDG_CACHE_HOME", "cache"),
                      ("XDG_DATA_HOME", "data")):
        env[name] = os.path.join(work, sub)
        os.makedirs(env[name], exist_ok=True)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _kill_with_parent() -> None:
    """In the child, before exec: its own process group, and SIGKILL when the parent dies."""
    os.setsid()
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the whole process group, then SIGKILL what is left after a grace period."""
    for sig, wait_s in ((signal.SIGTERM, SIGKILL_GRACE_S), (signal.SIGKILL, SIGKILL_GRACE_S)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM (Snakemake cancelling the job) into an exception, so the Blender process
    group is killed on the way out instead of running on orphaned."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _OutputPump(threading.Thread):
    """Forwards every line Blender prints to the log, remembering the phase and the last lines."""

    def __init__(self, stream, sha256: str):
        super().__init__(daemon=True)
        self.stream = stream
        self.prefix = sha256[:12]
        self.phase = "start"
        self.tail: collections.deque[str] = collections.deque(maxlen=OUTPUT_TAIL_LINES)

    def run(self) -> None:
        for raw in iter(self.stream.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            if line.startswith(blender_render.PHASE_MARKER):
                self.phase = line[len(blender_render.PHASE_MARKER):].strip()
            self.tail.append(line)
            blender_logger.info("[%s] %s", self.prefix, line)
        self.stream.close()


def _last_error_line(tail: Sequence[str]) -> str:
    """The most telling line of Blender's last output (a Python exception or an Error: line)."""
    for line in reversed(tail):
        text = line.strip()
        if text and (text.startswith("Error") or "Error:" in text or "error" in text.split(":")[0].lower()):
            return text[:300]
    for line in reversed(tail):
        if line.strip() and not line.startswith(blender_render.PHASE_MARKER):
            return line.strip()[:300]
    return "(no output)"


def _run_blender(sha256: str, job_path: str, result_path: str, work: str, settings: RenderSettings,
                 stage: str) -> dict:
    python = settings.python or sys.executable
    command = [python, blender_render.__file__, job_path]
    logger.info("%s: running %s (timeout %.0f s)", sha256, " ".join(command), settings.timeout_s)
    started = time.monotonic()
    with _sigterm_raises():
        try:
            proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                env=_blender_env(work), cwd=work, preexec_fn=_kill_with_parent,
            )
        except OSError as exc:
            raise ConfigError(f"cannot start the Blender Python {python!r}: {exc}") from exc
        pump = _OutputPump(proc.stdout, sha256)
        pump.start()
        timed_out = False
        try:
            proc.wait(timeout=settings.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            if proc.poll() is None:
                _kill_group(proc)
            pump.join(timeout=SIGKILL_GRACE_S)
    seconds = time.monotonic() - started
    code = proc.returncode
    if timed_out:
        raise AssetError(sha256, f"Blender did not finish within the {settings.timeout_s:g} s timeout "
                         f"(killed during {pump.phase}; raise render.timeout_s for large assets)", stage)
    result = _read_result(result_path)
    if code == blender_render.EXIT_OK:  # the outputs are checked next
        logger.info("%s: Blender finished in %.1f s", sha256, seconds)
        return result
    if code == blender_render.EXIT_SETTINGS_ERROR:
        raise ConfigError(result.get("reason", "Blender rejected the render settings"))
    if code == blender_render.EXIT_ASSET_ERROR and result.get("reason"):
        raise AssetError(sha256, result["reason"], stage)
    if code is not None and code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        cause = f"Blender crashed with {name} during {pump.phase}"
    else:
        cause = f"Blender exited with code {code} during {pump.phase}"
    raise AssetError(sha256, f"{cause}: {_last_error_line(pump.tail)}", stage)


def _read_result(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
