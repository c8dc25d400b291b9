"""Crash-safe file writing and the small file formats shared by the stages.

Every output is written to a temporary name in its final folder, read back and checked,
and renamed into place, so a killed run never leaves a half-written file under a final
name, and a file under a final name is readable.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator, Mapping, NamedTuple

import numpy as np

from slatflow.errors import AssetError
from slatflow.stages import stage_of_folder

# output folder under OUT -> the stage that writes it (named when a later stage cannot read it)
STAGE_OF_FOLDER = stage_of_folder()

# An array's contract: its dtype and shape, None for a free dimension.
ArrayContract = tuple[str, tuple[int | None, ...]]


class OutputCheckError(OSError):
    """An output that does not read back as written, or breaks its contract; raised before the
    rename, so nothing is left under the final name. An OSError, so the stages' `cannot write`
    handling reports it; one that reads back unlike what was written carries EIO (the machine's)."""


HASH_CHUNK = 1 << 20  # bytes read per update


def sha256_of_file(path: str | os.PathLike) -> str:
    """The hex sha256 of a file's bytes: every asset's key."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def written_by(path: str | os.PathLike) -> str:
    """`path`, with the stage that wrote it when it lies in a stage's output folder."""
    parts = Path(path).parts
    for folder in reversed(parts[-4:-1]):
        if folder in STAGE_OF_FOLDER:
            return f"{path} (written by the {STAGE_OF_FOLDER[folder]} stage)"
    return str(path)


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


# zlib level of the npz files' deflate streams (np.load reads any; np.savez_compressed
# always uses 6); the features stage stores its large float16 arrays at level 0
# (`features.deflate_level`): stored deflate blocks framed around the array's own bytes.
NPZ_DEFLATE_LEVEL = 1
# Deflate chunks compressed in parallel: each is an independent stream ended by a sync
# flush (byte-aligned, not final), so their concatenation is one valid deflate stream
# (what pigz writes); zlib releases the GIL, so threads use the job's CPUs.
_DEFLATE_CHUNK = 4 << 20
_DEFLATE_THREADS = min(8, os.cpu_count() or 1)
_STORED_BLOCK = 0xFFFF  # a stored deflate block's largest payload (RFC 1951 3.2.4: LEN is 16 bits)
_ZIP32_LIMIT = 0xFFFFFFFF  # larger members (never seen for the stages' outputs) go through zipfile's zip64


class _Member(NamedTuple):
    """One npz member on its way to the archive: its .npy bytes and their deflate stream,
    each as a list of buffers (the array's own memory, never copied into one bytes object)."""

    name: str
    raw: list  # of bytes-like: the .npy header, then the array's bytes
    deflated: list  # of bytes-like: the raw deflate stream
    crc: int


def save_npz_atomic(
    path: str | os.PathLike,
    *,
    contract: Mapping[str, ArrayContract] | None = None,
    compresslevel: int | None = None,
    **arrays: np.ndarray,
) -> None:
    """A deflate-compressed npz (what `np.savez_compressed` writes: one `<name>.npy` member
    per array, ZIP_DEFLATED) at `compresslevel`, under a temporary name, read back and
    checked, then renamed (TRELLIS reads npz).

    The archive is written here, not by `zipfile`, which compresses a member on one thread
    and copies it whole: members are deflated in parallel chunks (level >= 1) or framed as
    stored deflate blocks around the array's memory (level 0), so a 40 MB feature file
    costs no copy under the GIL (`tests/test_io.py` checks the result with zipfile's CRC
    test and against np.savez_compressed's bytes).

    Args:
        contract: key -> (dtype, shape with None for a free dimension) of the arrays the
            format requires; each must be there, as described, and not empty.
        compresslevel: zlib's level; default NPZ_DEFLATE_LEVEL.

    Raises:
        OutputCheckError: an array breaks the contract, or the file does not read back as
            written; nothing is left under `path`.
    """
    level = NPZ_DEFLATE_LEVEL if compresslevel is None else compresslevel
    arrays = {key: np.asarray(value) for key, value in arrays.items()}
    _check_contract(path, arrays, contract or {})
    raws = {f"{name}.npy": _npy_parts(value) for name, value in arrays.items()}
    sizes = {name: sum(len(part) for part in parts) for name, parts in raws.items()}
    with atomic_path(path, suffix=".npz") as tmp:
        if any(size >= _ZIP32_LIMIT for size in sizes.values()):
            _write_zip64_npz(tmp, raws, level)
        else:
            with open(tmp, "wb") as handle:
                _write_zip(handle, [_Member(name, parts, *_deflate(parts, level)) for name, parts in raws.items()])
        _check_npz_reads_back(tmp, path, sizes, arrays)


def _npy_parts(array: np.ndarray) -> list:
    """The .npy file of `array` (what np.save writes) as [header, the array's bytes], no copy
    of a C-contiguous array; any other layout goes through np.lib.format.write_array."""
    import io as bytes_io

    buffer = bytes_io.BytesIO()
    if array.dtype.hasobject or not array.flags.c_contiguous:
        np.lib.format.write_array(buffer, array, allow_pickle=False)
        return [buffer.getbuffer()]
    # version 1.0 is what write_array picks for any header under 64 KiB (all of ours)
    np.lib.format.write_array_header_1_0(buffer, np.lib.format.header_data_from_array_1_0(array))
    return [buffer.getbuffer(), memoryview(array.reshape(-1).view(np.uint8))]


def _deflate(parts: list, level: int) -> tuple[list, int]:
    """(raw deflate stream of the concatenated `parts`, as buffers; its CRC-32)."""
    import zlib

    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)  # releases the GIL on large buffers
    if level == 0:
        return _stored_blocks(parts), crc
    return _parallel_deflate(parts, level), crc


def _stored_blocks(parts: list) -> list:
    """Stored (uncompressed) deflate blocks framing `parts` in place: per block a byte-aligned
    header (BFINAL 0, BTYPE 00), LEN and its complement, then the payload; an empty final
    block ends the stream (RFC 1951 3.2.4). What zlib's level 0 writes, minus its copy."""
    import struct

    blocks = []
    for part in parts:
        view = memoryview(part).cast("B")
        for start in range(0, len(view), _STORED_BLOCK):
            payload = view[start : start + _STORED_BLOCK]
            blocks.append(struct.pack("<BHH", 0, len(payload), len(payload) ^ 0xFFFF))
            blocks.append(payload)
    blocks.append(struct.pack("<BHH", 1, 0, 0xFFFF))
    return blocks


def _parallel_deflate(parts: list, level: int) -> list:
    """The raw deflate stream of the concatenated `parts`, compressed in chunks on threads."""
    import zlib
    from concurrent.futures import ThreadPoolExecutor

    chunks = [view[i : i + _DEFLATE_CHUNK] for view in (memoryview(p).cast("B") for p in parts)
              for i in range(0, len(view), _DEFLATE_CHUNK)] or [memoryview(b"")]

    def deflate(index: int) -> bytes:
        compressor = zlib.compressobj(level, zlib.DEFLATED, -15)
        last = index == len(chunks) - 1
        return compressor.compress(chunks[index]) + compressor.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)

    if len(chunks) == 1:
        return [deflate(0)]
    with ThreadPoolExecutor(min(_DEFLATE_THREADS, len(chunks))) as pool:
        return list(pool.map(deflate, range(len(chunks))))


def _write_zip(handle, members: list[_Member]) -> None:
    """A zip archive of deflated members (APPNOTE 4.3: local headers, central directory)."""
    import struct
    import time

    now = time.localtime()
    dos_time = (now.tm_hour << 11) | (now.tm_min << 5) | (now.tm_sec // 2)
    dos_date = ((now.tm_year - 1980) << 9) | (now.tm_mon << 5) | now.tm_mday
    central = []
    for name, raw, deflated, crc in members:
        encoded = name.encode()
        offset = handle.tell()
        raw_size, deflated_size = sum(len(p) for p in raw), sum(len(p) for p in deflated)
        fields = (20, 0, 8, dos_time, dos_date, crc, deflated_size, raw_size, len(encoded), 0)
        handle.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, *fields) + encoded)
        handle.writelines(deflated)
        central.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, (3 << 8) | 20, *fields[:-1], 0, 0, 0, 0,
                                   0o644 << 16, offset) + encoded)
    start = handle.tell()
    directory = b"".join(central)
    handle.write(directory)
    handle.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(central), len(central), len(directory), start, 0))


def _write_zip64_npz(tmp: Path, raws: Mapping[str, list], level: int) -> None:
    import zipfile

    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=level) as archive:
        for name, parts in raws.items():
            with archive.open(name, "w", force_zip64=True) as member:
                for part in parts:
                    member.write(part)


def read_npz(path: str | os.PathLike, allocate=None) -> dict[str, np.ndarray]:
    """The arrays of an npz file (any deflate level, or stored members), each read into one
    buffer: np.load copies a member through zipfile in 256 KiB pieces, under the GIL for the
    most part (43 ms for a 64 MB feature file with 8 readers at once on an H200's host, 10 ms
    here); here stored deflate blocks (what level 0 writes) are copied out of a memory map and
    any other stream is inflated a few MB at a time, the CRC-32 checked as zipfile does.

    Args:
        allocate: nbytes -> a writable uint8 array to read a member into (pinned memory, say);
            default np.empty.

    Raises:
        ValueError: not a zip of .npy members, a bad CRC or stream, or a header np.load
            would refuse (object arrays); OSError: unreadable.
    """
    import mmap
    import struct
    import zipfile
    import zlib

    allocate = allocate or (lambda size: np.empty(size, np.uint8))
    arrays = {}
    with open(path, "rb") as handle:
        try:
            with zipfile.ZipFile(handle) as archive:
                members = archive.infolist()
        except zipfile.BadZipFile as exc:
            raise ValueError(f"not a zip archive: {exc}") from exc
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            for info in members:
                if not info.filename.endswith(".npy") or info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                    raise ValueError(f"member {info.filename!r} is not a stored or deflated .npy")
                if info.header_offset + 30 > len(mapped) or mapped[info.header_offset : info.header_offset + 4] != b"PK\x03\x04":
                    raise ValueError(f"member {info.filename!r}: bad local header")
                name_size, extra_size = struct.unpack_from("<HH", mapped, info.header_offset + 26)
                start = info.header_offset + 30 + name_size + extra_size
                if start + info.compress_size > len(mapped):
                    raise ValueError(f"member {info.filename!r} is truncated")
                data = allocate(info.file_size)
                if info.compress_type == zipfile.ZIP_STORED:
                    _copy_runs(mapped, [(start, info.file_size, 1)] if info.file_size else [], data)
                else:
                    _inflate_into(mapped, start, info.compress_size, data, info.filename)
                if zlib.crc32(data) != info.CRC:
                    raise ValueError(f"member {info.filename!r}: bad CRC-32")
                arrays[info.filename[: -len(".npy")]] = _npy_array(data, info.filename)
    return arrays


def _inflate_into(mapped, start: int, compressed_size: int, data: np.ndarray, name: str) -> None:
    """Inflate the raw deflate stream at `mapped[start:start + compressed_size]` into `data`.
    Stored blocks are copied out of the map, each run of equal blocks in one numpy copy (no
    GIL held, where a read per 64 KiB block would take it ~1000 times per feature file); at
    the first compressed block the whole stream goes through zlib instead."""
    blocks = _stored_blocks_of(mapped, start, compressed_size, name)
    if blocks is None:
        _inflate_chunks(memoryview(mapped)[start : start + compressed_size], memoryview(data), name)
        return
    if sum(size * count for _, size, count in blocks) != len(data):
        raise ValueError(f"member {name!r} holds {sum(s * c for _, s, c in blocks)} bytes, not {len(data)}")
    _copy_runs(mapped, blocks, data)


def _copy_runs(mapped, runs: list[tuple[int, int, int]], data: np.ndarray) -> None:
    """Copy (offset, size, count) runs of `count` payloads of `size` bytes, 5 header bytes
    apart, from the map into `data` back to back, one numpy copy per run."""
    source = np.frombuffer(mapped, np.uint8)
    target = np.frombuffer(memoryview(data), np.uint8)
    filled, payloads = 0, None
    for offset, size, count in runs:
        payloads = np.lib.stride_tricks.as_strided(source[offset:], (count, size), (size + 5, 1), writeable=False)
        target[filled : filled + size * count].reshape(count, size)[...] = payloads
        filled += size * count
    del source, target, payloads  # the map must not be exported when it closes


def _inflate_chunks(stream: memoryview, view: memoryview, name: str) -> None:
    """Inflate `stream` into `view` a few MB at a time: zlib releases the GIL while it works
    and numpy while it copies, so readers on other threads are not held up."""
    import zlib

    inflater = zlib.decompressobj(-15)
    target = np.frombuffer(view, np.uint8)
    filled = 0
    try:
        for offset in range(0, len(stream), _DEFLATE_CHUNK):
            piece = inflater.decompress(stream[offset : offset + _DEFLATE_CHUNK], len(view) + 1 - filled)
            if filled + len(piece) > len(view):
                break
            target[filled : filled + len(piece)] = np.frombuffer(piece, np.uint8)
            filled += len(piece)
        if not inflater.eof or inflater.unconsumed_tail:
            raise ValueError(f"member {name!r} inflates to more than {len(view)} bytes, or its stream is cut short")
    except zlib.error as exc:
        raise ValueError(f"member {name!r}: {exc}") from exc
    finally:
        del target, stream
    if filled != len(view):
        raise ValueError(f"member {name!r} inflates to {filled} bytes, not {len(view)}")


def _stored_blocks_of(mapped, start: int, length: int, name: str) -> list[tuple[int, int, int]] | None:
    """Runs of stored deflate blocks, (payload offset, size, count) per run of equal adjacent
    blocks, or None at the first compressed block (the stream is not all stored blocks).

    Blocks start byte-aligned while all before them are stored (what our and zlib's level 0
    write): BFINAL and BTYPE 00 in the low bits of the first byte, then LEN, NLEN."""
    import struct

    runs: list[list[int]] = []
    position, end = start, start + length
    while True:
        if position + 5 > end:
            raise ValueError(f"member {name!r} is truncated")
        header, size, complement = struct.unpack_from("<BHH", mapped, position)
        if header & 0b110:
            return None
        if size ^ complement != 0xFFFF or position + 5 + size > end:
            raise ValueError(f"member {name!r}: bad stored block at byte {position - start}")
        payload = position + 5
        if runs and runs[-1][1] == size and runs[-1][0] + (size + 5) * runs[-1][2] == payload:
            runs[-1][2] += 1
        elif size:
            runs.append([payload, size, 1])
        position = payload + size
        if header & 1:
            return [tuple(run) for run in runs]


def _npy_array(data: np.ndarray, name: str) -> np.ndarray:
    """The array of a .npy file's bytes, as a view of them."""
    import io as bytes_io

    head = bytes_io.BytesIO(memoryview(data)[: min(len(data), 1 << 16)])
    version = np.lib.format.read_magic(head)
    if version not in _NPY_HEADER_READERS:
        raise ValueError(f"member {name!r}: .npy version {version} not supported")
    shape, fortran, dtype = _NPY_HEADER_READERS[version](head)
    if dtype.hasobject:
        raise ValueError(f"member {name!r} holds Python objects")
    offset = head.tell()
    count = int(np.prod(shape, dtype=np.int64))
    if offset + count * dtype.itemsize != len(data):
        raise ValueError(f"member {name!r}: {len(data) - offset} data bytes for {dtype} {shape}")
    array = data[offset:].view(dtype) if count else np.empty(0, dtype)
    return array.reshape(shape, order="F" if fortran else "C")


def _check_contract(path, arrays: Mapping[str, np.ndarray], contract: Mapping[str, ArrayContract]) -> None:
    for key, (dtype, shape) in contract.items():
        array = arrays.get(key)
        if array is None:
            raise OutputCheckError(f"{path}: no {key!r} array")
        if array.dtype != np.dtype(dtype) or len(array.shape) != len(shape) or any(
            want is not None and got != want for got, want in zip(array.shape, shape)
        ):
            raise OutputCheckError(f"{path}: {key!r} is {array.dtype} {array.shape}, expected {dtype} {shape}")
        if array.size == 0:
            raise OutputCheckError(f"{path}: {key!r} is empty {array.shape}")


# what np.lib.format.write_array writes for the stages' arrays (3.0 only for non-latin field names)
_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _check_npz_reads_back(
    tmp: Path, path: str | os.PathLike, sizes: Mapping[str, int], arrays: Mapping[str, np.ndarray]
) -> None:
    """The archive's directory, each member's size and its npy header (dtype, shape) as written.

    Headers only: a truncated or garbled file fails on its directory (at the end of the file)
    or a header, while inflating every member again would cost as much as the write.
    """
    import zipfile
    import zlib

    try:
        with zipfile.ZipFile(tmp) as archive:
            stored = {info.filename: info.file_size for info in archive.infolist()}
            if stored != dict(sizes):
                raise ValueError(f"holds {sorted(stored)} of {sorted(stored.values())} bytes, not as written")
            for key, array in arrays.items():
                with archive.open(f"{key}.npy") as member:
                    shape, _, dtype = _NPY_HEADER_READERS[np.lib.format.read_magic(member)](member)
                if dtype != array.dtype or shape != array.shape:
                    raise ValueError(f"{key!r} reads back as {dtype} {shape}")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise OutputCheckError(
            errno.EIO, f"{path} does not read back as written (Input/output error): {type(exc).__name__}: {exc}"
        ) from exc


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
        try:
            same = np.array_equal(read_ply_points(tmp), points, equal_nan=True)
        except Exception as exc:  # noqa: BLE001 - plyfile raises many types for a bad file
            raise OutputCheckError(errno.EIO, f"{path} does not read back (Input/output error): {exc}") from exc
        if not same:
            raise OutputCheckError(errno.EIO, f"{path} reads back unlike what was written (Input/output error)")


def read_ply_points(path: str | os.PathLike) -> np.ndarray:
    """Read the vertex positions of a PLY file.

    Returns:
        float32 (N, 3).
    """
    from plyfile import PlyData

    vertex = PlyData.read(str(path))["vertex"]
    return np.stack([vertex["x"], vertex["y"], vertex["z"]], axis=-1).astype(np.float32)


def read_mesh_ply(sha256: str, path: str | os.PathLike, stage: str) -> tuple[np.ndarray, np.ndarray]:
    """Read a triangle mesh PLY (binary or ASCII, as Blender's exporter writes it).

    Extra vertex properties (normals, uv, colours) are ignored.

    Args:
        sha256: the asset, named in errors.
        path: the mesh (`renders/<sha>/mesh.ply`, `meshes/<sha>.ply`).
        stage: the stage that reads it, which its errors name (the file's writer is named
            with the path, see `written_by`).

    Returns:
        vertices float64 (V, 3) and faces int64 (F, 3).

    Raises:
        AssetError: a missing or unreadable file, no vertices, no faces, or faces that
            are not triangles.
    """
    from plyfile import PlyData, PlyElementParseError, PlyHeaderParseError

    path = Path(path)
    if not path.is_file():
        raise AssetError(sha256, f"mesh {written_by(path)} does not exist", stage)
    # Known triangle lists let plyfile memory-map the faces instead of a Python loop
    # per face; it raises when a face is not a triangle, and we re-read to say which.
    triangle_lists = {"face": {"vertex_indices": 3, "vertex_index": 3}}
    try:
        try:
            ply = PlyData.read(str(path), known_list_len=triangle_lists)
        except PlyElementParseError as exc:
            if "face" not in str(exc):
                raise
            ply = PlyData.read(str(path))
        if "vertex" not in ply:
            raise AssetError(sha256, f"mesh {path} has no vertex element", stage)
        vertex = ply["vertex"].data
        missing = [name for name in "xyz" if name not in vertex.dtype.names]
        if missing:
            raise AssetError(sha256, f"mesh {path} vertices lack {missing}", stage)
        vertices = np.stack([vertex[name] for name in "xyz"], axis=-1).astype(np.float64)  # (V, 3)
        faces = _read_faces(ply, path, sha256, stage)  # (F, 3)
    except (PlyElementParseError, PlyHeaderParseError, ValueError, OSError, EOFError) as exc:
        raise AssetError(sha256, f"cannot read mesh {written_by(path)}: {type(exc).__name__}: {exc}", stage) from exc
    if len(vertices) == 0:
        raise AssetError(sha256, f"mesh {path} has no vertices (expected a triangle mesh)", stage)
    if len(faces) == 0:
        raise AssetError(sha256, f"mesh {path} has no faces (expected a triangle mesh)", stage)
    return vertices, faces


def _read_faces(ply, path: Path, sha256: str, stage: str) -> np.ndarray:
    """The face element's index lists as int64 (F, 3), or an AssetError."""
    if "face" not in ply:
        raise AssetError(sha256, f"mesh {path} has no face element (a point cloud?)", stage)
    face = ply["face"].data
    names = [name for name in ("vertex_indices", "vertex_index") if name in face.dtype.names]
    if not names:
        raise AssetError(sha256, f"mesh {path} faces have no vertex_indices list", stage)
    lists = face[names[0]]
    if lists.dtype != object:  # memory-mapped fixed-length triangles: (F, 3)
        return np.asarray(lists, dtype=np.int64).reshape(-1, 3)
    lengths = np.fromiter((len(item) for item in lists), dtype=np.int64, count=len(lists))  # (F,)
    bad = np.flatnonzero(lengths != 3)
    if len(bad):
        raise AssetError(
            sha256,
            f"mesh {path} has {len(bad)} non-triangular faces (face {bad[0]} has "
            f"{lengths[bad[0]]} vertices); expected a triangulated mesh",
            stage,
        )
    return np.stack(list(lists)).astype(np.int64).reshape(-1, 3) if len(lists) else np.zeros((0, 3), np.int64)
