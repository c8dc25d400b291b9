"""Crash-safe file writing and the small file formats shared by the stages.

Every output is written to a temporary name in its final folder and renamed into
place, so a killed run never leaves a half-written file under a final name.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np


def _file_mode() -> int:
    """The mode a plain open() would give a new file (mkstemp's is 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` if the block succeeds.

    Args:
        path: the final file.
        suffix: the temporary file's ending; defaults to `path`'s, since some writers
            (np.savez, PIL) pick the format from it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix if suffix is None else suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, _FILE_MODE)  # readable by the group, as on a shared cluster it must be
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if absent): one holder across processes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, obj: object) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


# zlib level of the npz files' deflate streams. np.savez_compressed always uses 6, which
# costs ~4x level 1's CPU time for a few percent smaller float16 features
# (bench/bench_pipeline_gpu.py --npz-levels); np.load reads any level.
NPZ_DEFLATE_LEVEL = 1


def save_npz_atomic(path: str | os.PathLike, *, compresslevel: int = NPZ_DEFLATE_LEVEL, **arrays: np.ndarray) -> None:
    """A deflate-compressed npz (what `np.savez_compressed` writes, at `compresslevel`)
    under a temporary name, then renamed (TRELLIS reads npz).

    numpy offers no level argument, so the archive is written here as numpy does: one
    `<name>.npy` member per array (`np.lib.format.write_array`), ZIP_DEFLATED, zip64 allowed.
    zlib releases the GIL, so writers in threads compress in parallel.
    """
    import zipfile

    with atomic_path(path, suffix=".npz") as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=compresslevel) as archive:
            for name, value in arrays.items():
                with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)


def write_points_ply(path: str | os.PathLike, points: np.ndarray) -> None:
    """Write a vertex-only binary little-endian PLY with float32 x, y, z.

    Args:
        points: float (N, 3); written as float32.
    """
    from plyfile import PlyData, PlyElement

    points = np.asarray(points, dtype=np.float32).reshape(-1, 3)
    vertex = np.zeros(len(points), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4")])
    vertex["x"], vertex["y"], vertex["z"] = points.T
    ply = PlyData([PlyElement.describe(vertex, "vertex")], text=False, byte_order="<")
    with atomic_path(path) as tmp:
        ply.write(str(tmp))


def read_ply_points(path: str | os.PathLike) -> np.ndarray:
    """Read the vertex positions of a PLY file.

    Returns:
        float32 (N, 3).
    """
    from plyfile import PlyData

    vertex = PlyData.read(str(path))["vertex"]
    return np.stack([vertex["x"], vertex["y"], vertex["z"]], axis=-1).astype(np.float32)
