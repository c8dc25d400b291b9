"""Members out of archives: one streaming, resumable pass over a tar; random access into a zip.

ABO ships as one 154 GB tar. TRELLIS downloads it whole and extracts it; here one sequential
pass over the stream (remote or local) writes only the wanted members and stops as soon as
they are all in place, and a state file beside the output lets a killed pass go on from the
member it was at instead of from byte 0. 3D-FUTURE and Toys4k are zips the user provides:
their members are read by random access, no other member touched.

Member names are never used as paths as they are: a tar member goes where the caller says,
and a zip member's name is checked (no absolute path, no `..`, no link) before it becomes one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import stat
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from slatflow.errors import DownloadError
from slatflow.io import atomic_path, write_json_atomic

logger = logging.getLogger(__name__)

_STATE_VERSION = 1
# The state is saved after every wanted member, and between them at most this often: a kill
# then re-reads at most a few seconds (or a few hundred small members) of the stream.
_STATE_EVERY_S = 5.0
_STATE_EVERY_MEMBERS = 500
# tarfile's read size on the stream: with 64 KiB it skipped members at 3.1-3.7 GB/s here, with its
# default 10 KiB at 2.1 GB/s and with 1 MiB at 0.4 GB/s (its buffer slicing copies).
_STREAM_BUFFER = 1 << 16
_COPY_CHUNK = 1 << 20
_BLOCK = tarfile.BLOCKSIZE


@dataclass(frozen=True)
class TarPass:
    """What one call of `extract_tar_members` achieved.

    Args:
        extracted: wanted member name -> its destination, written by this call or an earlier one.
        missing: wanted members that are not in the archive (known once a pass reached its
            end), or are in it only as a link, a device or an unsafe name (never written).
        bytes_read: bytes read from the archive by this call.
        resumed_from: the archive offset this call started reading at (0 for a fresh pass).
        complete: every wanted member is either extracted or in `missing`; always True on
            return, since a pass that cannot finish raises (its state file keeps its progress).
    """

    extracted: dict[str, Path]
    missing: list[str]
    bytes_read: int
    resumed_from: int
    complete: bool


def extract_tar_members(
    open_at: Callable[[int], contextlib.AbstractContextManager[BinaryIO]],
    wanted: Mapping[str, str | os.PathLike],
    state_path: str | os.PathLike,
    *,
    archive_id: str = "",
) -> TarPass:
    """Write the wanted members of an uncompressed tar in one sequential pass over its stream.

    Each wanted regular file is written to its destination through a temporary name; one whose
    destination exists is not rewritten, unwanted members are read past and never written.
    The pass stops as soon as every wanted member is in place. `state_path` records the offset
    of the next member's first header (long-name and pax headers included) and the members
    still to find, so that a call after a kill reopens the archive there; on completion it
    records the missing members, and a repeated call returns without reading.

    Args:
        open_at: opens the archive from a byte offset, e.g.
            `lambda o: slatflow.http_fetch.open_stream(url, offset=o)`; only read forward.
        wanted: member name (as in the archive; a leading "./" on either side is ignored) ->
            the file to write its bytes to.
        state_path: the pass's state file (JSON), written atomically.
        archive_id: names the archive (URL, path, size or etag): a state file of another id is
            ignored. Also names the archive in messages.

    Returns:
        The members extracted and missing, and how much was read.

    Raises:
        DownloadError: the archive is truncated or corrupt (with the offset), or the stream
            failed while reading (the state keeps what was done for the next call).
    """
    destinations = {name: Path(dest) for name, dest in wanted.items()}
    pass_ = _TarPass(open_at, destinations, Path(state_path), archive_id)
    return pass_.run()


class _StreamError(Exception):
    """The archive's stream failed (not the local disk, whose OSError is the run's problem)."""


class _CountingReader:
    """A read-only view of a stream that counts the bytes it hands out and keeps the last two reads."""

    def __init__(self, stream: BinaryIO):
        self.stream = stream
        self.count = 0
        self.previous, self.last = b"", b""

    def read(self, size: int = -1) -> bytes:
        try:
            data = self.stream.read(size)
        except OSError as error:
            raise _StreamError(str(error) or type(error).__name__) from error
        self.count += len(data)
        if data:
            self.previous, self.last = self.last, data
        return data

    def recent_block(self, position: int) -> bytes | None:
        """The 512 bytes at `position` (from the stream's start) if the last two reads hold them."""
        base = self.count - len(self.last) - len(self.previous)
        if position < base or position + _BLOCK > self.count:
            return None
        start = position - base
        return (self.previous + self.last)[start : start + _BLOCK]

    def read_exactly(self, size: int) -> bytes:
        """Up to `size` bytes, fewer only at the end of the stream (a read may return less)."""
        chunks, left = [], size
        while left > 0 and (chunk := self.read(left)):
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)


class _TarPass:
    def __init__(
        self,
        open_at: Callable[[int], contextlib.AbstractContextManager[BinaryIO]],
        wanted: dict[str, Path],
        state_path: Path,
        archive_id: str,
    ):
        self.open_at, self.wanted, self.state_path, self.archive_id = open_at, wanted, state_path, archive_id
        self.name = archive_id or "tar archive"
        self.by_member = {_member_key(name): name for name in wanted}
        self.pending = {name for name, dest in wanted.items() if not dest.exists()}
        self.refused: list[str] = []
        self.bytes_read = 0
        self.last_save = time.monotonic()
        self.unsaved_members = 0
        self.verified_end = -1  # an offset seen to hold the end-of-archive block

    def run(self) -> TarPass:
        start = self._start_offset()
        if start is None:  # a complete pass covers every wanted member
            return self._result(0, self._saved_missing)
        offset = self.next_offset = start
        while self.pending:
            end = self._read_from(offset)
            if end is None:
                break  # every wanted member in place
            if end == self.verified_end or self._block_at(end) == "end":
                missing = sorted(self.refused) + sorted(self.pending)
                for name in sorted(self.pending):
                    logger.warning("%s has no member %s", self.name, name)
                self._save(end, complete=True, missing=missing)
                return self._result(start, missing)
            if end == offset:
                raise DownloadError(f"{self.name}: no valid tar header at byte {end}")
            offset = end  # the stream ended early but the archive goes on: read on from there
        self._save(self.next_offset, complete=True, missing=sorted(self.refused))
        return self._result(start, sorted(self.refused))

    def _start_offset(self) -> int | None:
        """Where to read from: a saved pass's offset if it still covers what is wanted, else 0."""
        self._saved_missing: list[str] = []
        state = self._load_state()
        if state is None:
            return 0 if self.pending else None
        if state["complete"]:
            known_missing = set(state["missing"])
            if self.pending <= known_missing:
                self._saved_missing = sorted(known_missing & set(self.wanted))
                logger.info("%s: pass already complete (%s)", self.name, self.state_path)
                return None
            return 0
        # Resume only if nothing still wanted lies before the saved offset: every member not in
        # place must be one the saved pass was still looking for.
        if self.pending <= set(state["pending"]) | set(state["refused"]):
            self.refused = [name for name in state["refused"] if name in self.wanted]
            self.pending -= set(self.refused)
            logger.info("%s: resuming the pass at byte %d (%s)", self.name, state["offset"], self.state_path)
            return int(state["offset"])
        return 0

    def _load_state(self) -> dict | None:
        try:
            state = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            logger.warning("%s: unreadable pass state (%s); starting from byte 0", self.state_path, error)
            return None
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            return None
        if state.get("archive_id") != self.archive_id:
            logger.info(
                "%s: state of another archive (%r); starting from byte 0",
                self.state_path,
                state.get("archive_id"),
            )
            return None
        return state

    def _read_from(self, offset: int) -> int | None:
        """Read members from `offset` until all are in place (None) or the stream ends (its end offset)."""
        position = offset  # the first header of the member being read (where an error is)
        try:
            with self.open_at(offset) as stream:
                reader = _CountingReader(stream)
                try:
                    with tarfile.open(fileobj=reader, mode="r|", bufsize=_STREAM_BUFFER) as archive:
                        while self.pending:
                            position = offset + archive.offset  # a header error is at the next header
                            member = archive.next()
                            archive.members.clear()  # a stream of a million members keeps none
                            if member is None:
                                # tarfile just read the block there: a zero block is the end, known
                                # without asking the server again.
                                block = reader.recent_block(archive.offset)
                                if block is not None and block.count(0) == _BLOCK:
                                    self.verified_end = offset + archive.offset
                                return offset + archive.offset
                            position = offset + member.offset
                            self._take(archive, member)
                            self._member_done(offset + archive.offset)
                    return None
                finally:
                    self.bytes_read += reader.count
        except tarfile.ReadError as error:
            if position == offset and self._block_at(offset) == "end":
                self.verified_end = offset  # resumed right at the end-of-archive blocks
                return offset
            raise DownloadError(
                f"{self.name}: truncated or corrupt tar at byte {position}: {error}"
            ) from None
        except tarfile.TarError as error:
            raise DownloadError(f"{self.name}: corrupt tar at byte {position}: {error}") from None
        except _StreamError as error:
            raise DownloadError(f"{self.name}: reading failed at byte {position}: {error}") from None

    def _take(self, archive: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        name = self.by_member.get(_member_key(member.name))
        if name is None or name not in self.pending:
            return  # unwanted, already in place, or a later copy of a member already taken
        self.pending.discard(name)
        why = _unsafe_tar_member(member)
        if why:
            logger.warning("%s: member %s is %s; not written", self.name, member.name, why)
            self.refused.append(name)
            return
        dest = self.wanted[name]
        source = archive.extractfile(member)
        with atomic_path(dest) as tmp, open(tmp, "wb") as out:
            shutil.copyfileobj(source, out, _COPY_CHUNK)
            if out.tell() != member.size:
                raise tarfile.ReadError(
                    f"member {member.name} ends after {out.tell()} of {member.size} bytes"
                )
        logger.debug("%s: %s -> %s (%d bytes)", self.name, member.name, dest, member.size)
        self.unsaved_members = _STATE_EVERY_MEMBERS  # a wanted member: save now

    def _member_done(self, next_offset: int) -> None:
        self.next_offset = next_offset
        self.unsaved_members += 1
        if self.unsaved_members >= _STATE_EVERY_MEMBERS or time.monotonic() - self.last_save > _STATE_EVERY_S:
            self._save(next_offset, complete=False, missing=[])

    def _save(self, offset: int, *, complete: bool, missing: list[str]) -> None:
        state = {
            "version": _STATE_VERSION,
            "archive_id": self.archive_id,
            "offset": offset,  # the first header of the next member, from the archive's start
            "complete": complete,
            "pending": [] if complete else sorted(self.pending),
            "refused": sorted(self.refused),
            "missing": missing,
        }
        write_json_atomic(self.state_path, state)
        self.last_save = time.monotonic()
        self.unsaved_members = 0

    def _block_at(self, offset: int) -> str:
        """What lies at `offset`: "end" (the zero block ending a tar) or else "more"; raise if nothing."""
        with self.open_at(offset) as stream:
            reader = _CountingReader(stream)
            try:
                block = reader.read_exactly(_BLOCK)
            except _StreamError as error:
                raise DownloadError(f"{self.name}: reading failed at byte {offset}: {error}") from None
        self.bytes_read += len(block)
        if len(block) < _BLOCK:
            raise DownloadError(
                f"{self.name}: truncated tar: {len(block)} bytes at byte {offset}, no end-of-archive block"
            )
        return "end" if block.count(0) == _BLOCK else "more"

    def _result(self, start: int, missing: list[str]) -> TarPass:
        extracted = {
            name: dest for name, dest in self.wanted.items() if name not in missing and dest.exists()
        }
        return TarPass(extracted, missing, self.bytes_read, start, complete=True)


def _member_key(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name


def _unsafe_tar_member(member: tarfile.TarInfo) -> str:
    """Why a member is never written ("" if it may be): only plain regular files with plain names."""
    if _unsafe_name(member.name):
        return "an unsafe name (absolute or with '..')"
    if not member.isreg() or member.issparse():
        return "not a regular file (a link, a device, a folder or sparse)"
    return ""


def _unsafe_name(name: str) -> bool:
    if not name or name.startswith("/") or "\\" in name or "\0" in name or re.match(r"^[A-Za-z]:", name):
        return True
    return ".." in name.split("/")


def extract_zip_members(
    zip_path: str | os.PathLike,
    members: Sequence[str],
    dest_dir: str | os.PathLike,
    *,
    strip_prefix: str = "",
) -> list[Path]:
    """Extract the named members of a local zip to `dest_dir/<member minus strip_prefix>`.

    Every member is checked before any is written: a missing one, a folder, a link or an unsafe
    name (absolute, `..`) is an error. Each file is written through a temporary name; zipfile
    checks its CRC as it reads.

    Args:
        zip_path: the archive.
        members: member names as in the archive, each starting with `strip_prefix`.
        dest_dir: the folder to write into.
        strip_prefix: the part of the names not kept under `dest_dir`.

    Returns:
        The written files, in the order of `members`.

    Raises:
        DownloadError: the archive is missing, unreadable or corrupt, or a member is missing,
            not a regular file, or has an unsafe name.
        ValueError: a member does not start with `strip_prefix`.
    """
    dest_dir = Path(dest_dir)
    archive = _open_zip(zip_path)
    plan = []
    for name in members:
        if not name.startswith(strip_prefix):
            raise ValueError(f"zip member {name!r} does not start with {strip_prefix!r}")
        try:
            info = archive.getinfo(name)
        except KeyError:
            raise DownloadError(f"{zip_path}: no member {name}") from None
        relative = name[len(strip_prefix) :]
        if _unsafe_name(relative) or _unsafe_name(name):
            raise DownloadError(
                f"{zip_path}: member {name}: unsafe name (absolute or with '..'); not extracted"
            )
        if not _zip_regular(info):
            raise DownloadError(f"{zip_path}: member {name}: not a regular file (a folder or a link)")
        plan.append((info, dest_dir / relative))
    written = []
    for info, dest in plan:
        try:
            with archive.open(info) as source, atomic_path(dest) as tmp, open(tmp, "wb") as out:
                shutil.copyfileobj(source, out, _COPY_CHUNK)
        except (zipfile.BadZipFile, zlib.error, EOFError) as error:
            raise DownloadError(f"{zip_path}: member {info.filename}: corrupt ({error})") from None
        written.append(dest)
    return written


def zip_members_under(zip_path: str | os.PathLike, prefix: str) -> list[str]:
    """The regular files of a zip under the folder `prefix` (e.g. `3D-FUTURE-model/<instance>/`).

    Returns:
        Their member names, in archive order.

    Raises:
        DownloadError: the archive is missing, unreadable or corrupt.
    """
    folder = prefix.rstrip("/") + "/" if prefix else ""
    archive = _open_zip(zip_path)
    return [
        info.filename
        for info in archive.infolist()
        if info.filename.startswith(folder) and _zip_regular(info)
    ]


def _open_zip(zip_path: str | os.PathLike) -> zipfile.ZipFile:
    """The zip, opened once per process while its size and mtime stay the same.

    Reading the central directory of 3D-FUTURE's zip (66k entries) takes ~0.4 s: a job that
    extracts many instances pays it once instead of twice per instance.
    """
    try:
        st = os.stat(zip_path)
    except FileNotFoundError:
        raise DownloadError(f"{zip_path}: archive not found") from None
    except OSError as error:
        raise DownloadError(f"{zip_path}: cannot read the archive ({error.strerror or error})") from None
    return _open_zip_cached(os.path.realpath(zip_path), st.st_size, st.st_mtime_ns, os.fspath(zip_path))


@functools.lru_cache(maxsize=4)
def _open_zip_cached(real_path: str, size: int, mtime_ns: int, shown_as: str) -> zipfile.ZipFile:
    # size and mtime_ns are only the cache key: a replaced archive is opened anew
    try:
        return zipfile.ZipFile(real_path)  # its reads are thread-safe (a lock on the shared file)
    except (zipfile.BadZipFile, OSError) as error:
        raise DownloadError(f"{shown_as}: not a readable zip archive ({error})") from None


def _zip_regular(info: zipfile.ZipInfo) -> bool:
    """Not a folder, and not a link (Unix mode bits in the high half of external_attr)."""
    kind = stat.S_IFMT(info.external_attr >> 16)  # 0 when the writer recorded no Unix type
    return not info.is_dir() and kind in (0, stat.S_IFREG)
