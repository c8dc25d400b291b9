"""archives: the streaming, resumable tar pass and zip member extraction, on fixture archives."""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from slatflow import archives
from slatflow.archives import extract_tar_members, extract_zip_members, zip_members_under
from slatflow.errors import DownloadError

TAIL_BYTES = 3 << 20  # more than the pass's read-ahead (1 MiB)
LONG_DIR = "3dmodels/original/" + "d" * 90  # member names past tar's 100-character field


def _members(rng: np.random.Generator) -> list[tuple[str, bytes | None]]:
    """~30 regular members (some with long names), a symlink, unsafe names, a folder, a big tail."""
    members: list[tuple[str, bytes | None]] = [("3dmodels/", None)]
    for i in range(28):
        name = f"{LONG_DIR}/item_{i:02d}.glb" if i % 4 == 1 else f"3dmodels/original/item_{i:02d}.glb"
        members.append((name, rng.bytes(int(rng.integers(100, 20_000)))))
    members.append(("3dmodels/link.glb", b"-> item_00"))  # written as a symlink, see _make_tar
    members.append(("../evil.glb", b"evil"))
    members.append(("/abs/evil.glb", b"evil"))
    members.append(("3dmodels/tail.bin", rng.bytes(TAIL_BYTES)))  # never wanted: what stop-early skips
    return members


def _make_tar(path: Path, members: list[tuple[str, bytes | None]], fmt: int) -> dict[str, int]:
    """Write the tar; returns each member's first-header offset (tarfile's random-access view)."""
    with tarfile.open(path, "w", format=fmt) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if data is None:
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
            elif name.endswith("link.glb"):
                info.type, info.linkname = tarfile.SYMTYPE, "original/item_00.glb"
                archive.addfile(info)
            else:
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as archive:
        return {m.name: m.offset for m in archive.getmembers()}


class _Opener:
    """open_at over a local file; records the offsets asked for; optional injected failures."""

    def __init__(self, path: Path, fail_after: int | None = None, eof_after: int | None = None):
        self.path, self.fail_after, self.eof_after = path, fail_after, eof_after
        self.offsets: list[int] = []

    @contextlib.contextmanager
    def __call__(self, offset: int):
        self.offsets.append(offset)
        with open(self.path, "rb") as f:
            f.seek(offset)
            if self.fail_after is not None:
                yield _Failing(f, self.fail_after, OSError("connection reset (simulated kill)"))
                self.fail_after = None
            elif self.eof_after is not None:
                yield _Failing(f, self.eof_after, None)
                self.eof_after = None
            else:
                yield f


class _Failing:
    """Gives `limit` bytes, then raises `error` (or, with None, ends early as if at EOF)."""

    def __init__(self, stream, limit: int, error: Exception | None):
        self.stream, self.left, self.error = stream, limit, error

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            if self.error is not None:
                raise self.error
            return b""
        data = self.stream.read(self.left if size < 0 else min(size, self.left))
        self.left -= len(data)
        return data


@pytest.fixture(scope="module")
def members():
    return _members(np.random.default_rng(0))


@pytest.fixture(scope="module", params=[tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["gnu", "pax"])
def tar(request, tmp_path_factory, members):
    path = tmp_path_factory.mktemp("tar") / "archive.tar"
    offsets = _make_tar(path, members, request.param)
    return path, offsets


def _data(members) -> dict[str, bytes]:
    return {name: data for name, data in members if data is not None}


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_extracts_wanted_only(tar, members, tmp_path):
    path, _ = tar
    data = _data(members)
    names = [name for name in data if "item_" in name]
    good = [names[1], names[5], names[12], names[27]]  # two of them with long names
    assert sum(len(n) > 100 for n in good) == 2
    wanted = {name: tmp_path / "out" / f"{i}.glb" for i, name in enumerate(good)}
    wanted.update(
        {
            "3dmodels/link.glb": tmp_path / "out" / "link.glb",
            "../evil.glb": tmp_path / "out" / "evil1.glb",
            "/abs/evil.glb": tmp_path / "out" / "evil2.glb",
            "3dmodels/not_there.glb": tmp_path / "out" / "nope.glb",
        }
    )
    state = tmp_path / "pass.json"
    result = extract_tar_members(_Opener(path), wanted, state, archive_id="abo.tar")

    assert result.complete and result.resumed_from == 0
    assert sorted(result.missing) == sorted(
        ["3dmodels/link.glb", "../evil.glb", "/abs/evil.glb", "3dmodels/not_there.glb"]
    )
    assert result.extracted == {name: wanted[name] for name in good}
    for name in good:
        assert wanted[name].read_bytes() == data[name]
    assert _files(tmp_path / "out") == sorted(f"{i}.glb" for i in range(4))  # nothing unwanted or unsafe
    assert not list(tmp_path.parent.glob("evil*"))
    saved = json.loads(state.read_text())
    assert (
        saved["complete"]
        and saved["archive_id"] == "abo.tar"
        and sorted(saved["missing"]) == sorted(result.missing)
    )
    assert result.bytes_read >= path.stat().st_size - 2 * 10240  # read to the end, to know what is missing
    assert result.bytes_read <= path.stat().st_size  # and the end block was not read twice


def test_stops_once_all_wanted_are_in_place(tar, members, tmp_path):
    path, _ = tar
    data = _data(members)
    front = [name for name in data if "item_" in name][:3]
    wanted = {name: tmp_path / f"{i}.glb" for i, name in enumerate(front)}
    opener = _Opener(path)
    result = extract_tar_members(opener, wanted, tmp_path / "state.json")
    assert result.complete and result.missing == [] and set(result.extracted) == set(front)
    assert opener.offsets == [0]
    assert result.bytes_read < path.stat().st_size - TAIL_BYTES // 2  # most of the tail unread


def test_resume_after_a_kill(tar, members, tmp_path):
    path, offsets = tar
    data = _data(members)
    items = [name for name in data if "item_" in name]
    wanted = {name: tmp_path / "out" / f"{i:02d}.glb" for i, name in enumerate(items)}
    wanted["3dmodels"] = tmp_path / "out" / "folder"  # the first member, a folder: refused, then missing
    state = tmp_path / "state.json"
    kill_at = offsets[items[14]] + 700  # inside the 15th member, after several long-name ones
    with pytest.raises(DownloadError, match="simulated kill"):
        extract_tar_members(_Opener(path, fail_after=kill_at), wanted, state, archive_id="a")
    saved = json.loads(state.read_text())
    assert not saved["complete"] and 0 < saved["offset"] <= kill_at
    assert saved["offset"] in offsets.values()  # a member's first header (long-name/pax ones included)
    done = {name: wanted[name].stat() for name in items if wanted[name].exists()}
    assert len(done) >= 10
    assert all(offsets[name] < saved["offset"] for name in done)

    opener = _Opener(path)
    result = extract_tar_members(opener, wanted, state, archive_id="a")
    assert opener.offsets[0] == saved["offset"] == result.resumed_from
    assert result.complete and result.missing == ["3dmodels"] and set(result.extracted) == set(items)
    for name in items:
        assert wanted[name].read_bytes() == data[name]
    for name, before in done.items():
        after = wanted[name].stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), name
    assert result.bytes_read <= path.stat().st_size - saved["offset"] + 1024

    # A third call: complete, so nothing is read (open_at is not even called).
    def never(offset):
        raise AssertionError(f"open_at({offset}) called on a complete pass")

    again = extract_tar_members(never, wanted, state, archive_id="a")
    assert again.complete and again.bytes_read == 0 and set(again.extracted) == set(items)
    assert again.missing == ["3dmodels"] and not wanted["3dmodels"].exists()


def test_resume_rules(tar, members, tmp_path):
    """A state is used only for its archive, and only if nothing still wanted lies before its offset."""
    path, offsets = tar
    data = _data(members)
    items = [name for name in data if "item_" in name]
    wanted = {name: tmp_path / "out" / f"{i:02d}.glb" for i, name in enumerate(items[:20])}
    state = tmp_path / "state.json"
    with pytest.raises(DownloadError):
        extract_tar_members(_Opener(path, fail_after=offsets[items[8]] + 10), wanted, state, archive_id="a")
    saved_offset = json.loads(state.read_text())["offset"]
    assert saved_offset > 0

    killed_state = state.read_text()

    other = _Opener(path)  # a state from another archive: start again from byte 0
    extract_tar_members(other, {items[25]: tmp_path / "x.glb"}, state, archive_id="b")
    assert other.offsets[0] == 0

    # Fewer members than the killed pass wanted (the lead moved the finished ones away): resume.
    state.write_text(killed_state)
    done = [name for name, dest in wanted.items() if dest.exists()]
    assert done
    fewer = {name: dest for name, dest in wanted.items() if name not in done}
    for name in done:
        wanted[name].rename(tmp_path / f"moved{len(name)}-{done.index(name)}.glb")
    opener = _Opener(path)
    result = extract_tar_members(opener, fewer, state, archive_id="a")
    assert opener.offsets[0] == saved_offset and result.complete and set(result.extracted) == set(fewer)

    # A member before the offset that is wanted again but not in place: from byte 0.
    state.write_text(killed_state)
    opener = _Opener(path)
    result = extract_tar_members(opener, wanted, state, archive_id="a")
    assert opener.offsets[0] == 0 and result.complete
    assert wanted[done[0]].read_bytes() == data[done[0]]


def test_stream_ending_early_reads_on(tar, members, tmp_path):
    """A stream that ends before the archive does (no error) is reopened where it stopped."""
    path, offsets = tar
    data = _data(members)
    items = [name for name in data if "item_" in name]
    wanted = {name: tmp_path / f"{i:02d}.glb" for i, name in enumerate(items)}
    opener = _Opener(path, eof_after=offsets[items[10]])
    result = extract_tar_members(opener, wanted, tmp_path / "s.json")
    assert result.complete and set(result.extracted) == set(items)
    assert len(opener.offsets) >= 2 and opener.offsets[0] == 0 and opener.offsets[-1] > 0


@pytest.mark.parametrize("where", ["in a member", "in a header", "at a header boundary"])
def test_truncated_archive(tar, members, tmp_path, where):
    path, offsets = tar
    items = [name for name in _data(members) if "item_" in name]
    cut = {
        "in a member": offsets[items[6]] + 512 + 5,
        "in a header": offsets[items[6]] + 100,
        "at a header boundary": offsets[items[6]],
    }[where]
    truncated = tmp_path / "cut.tar"
    truncated.write_bytes(path.read_bytes()[:cut])
    wanted = {name: tmp_path / "out" / f"{i:02d}.glb" for i, name in enumerate(items)}
    with pytest.raises(DownloadError, match=r"cut\.tar.*(truncated|corrupt).*byte \d+") as info:
        extract_tar_members(_Opener(truncated), wanted, tmp_path / "s.json", archive_id="cut.tar")
    assert "\n" not in str(info.value)
    # Never a half file: what is there is whole.
    for name, dest in wanted.items():
        if dest.exists():
            assert dest.read_bytes() == _data(members)[name]
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_not_a_tar(tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar archive at all" * 100)
    with pytest.raises(DownloadError, match=r"junk\.tar.*byte 0"):
        extract_tar_members(_Opener(junk), {"a": tmp_path / "a"}, tmp_path / "s.json", archive_id="junk.tar")


def test_through_fixture_server_with_truncated_body(tar, members, tmp_path):
    """The real remote path: open_stream over HTTP, the body cut in the middle once."""
    from slatflow.http_fetch import RetryPolicy, open_stream
    from tests.download_fixtures import FixtureServer

    path, _ = tar
    data = _data(members)
    items = [name for name in data if "item_" in name]
    wanted = {name: tmp_path / f"{i:02d}.glb" for i, name in enumerate(items)}
    wanted["3dmodels/absent.glb"] = tmp_path / "absent.glb"  # makes the pass read to the end
    policy = RetryPolicy(attempts=4, backoff_s=0.01, max_backoff_s=0.05, timeout_s=5)
    with FixtureServer() as server:
        url = server.add("/abo.tar", path.read_bytes(), faults=["truncate"])
        result = extract_tar_members(
            lambda offset: open_stream(url, offset=offset, policy=policy),
            wanted,
            tmp_path / "s.json",
            archive_id=url,
        )
        ranges = [r.headers.get("range") for r in server.hits("/abo.tar")]
    assert result.complete and result.missing == ["3dmodels/absent.glb"]
    for name in items:
        assert wanted[name].read_bytes() == data[name]
    # one GET, one resumed after the cut; the end of the archive is seen in the stream, not asked for
    assert len(ranges) == 2 and ranges[0] is None and ranges[1].startswith("bytes=")


# zip


def _make_zip(path: Path, files: dict[str, bytes], links: dict[str, str] = {}) -> None:  # noqa: B006 (read only)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        folders = sorted({name.rsplit("/", 1)[0] + "/" for name in files if "/" in name})
        for folder in folders:
            archive.writestr(folder, b"")
        for name, data in files.items():
            archive.writestr(name, data)
        for name, target in links.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o120777 << 16
            archive.writestr(info, target)


@pytest.fixture(scope="module")
def future_zip(tmp_path_factory):
    rng = np.random.default_rng(1)
    files = {}
    for instance in ["0a1b2c3d-0000-4000-8000-000000000001", "0a1b2c3d-0000-4000-8000-000000000002"]:
        for name in ["raw_model.obj", "model.mtl", "texture.png", "image.jpg"]:
            files[f"3D-FUTURE-model/{instance}/{name}"] = rng.bytes(int(rng.integers(50, 5000)))
    path = tmp_path_factory.mktemp("zip") / "3D-FUTURE-model.zip"
    _make_zip(
        path, files, links={"3D-FUTURE-model/0a1b2c3d-0000-4000-8000-000000000002/link.png": "/etc/passwd"}
    )
    return path, files


def test_zip_members_under_and_extract_3d_future(future_zip, tmp_path):
    path, files = future_zip
    prefix = "3D-FUTURE-model/0a1b2c3d-0000-4000-8000-000000000001/"
    members = zip_members_under(path, prefix.rstrip("/"))  # with or without the trailing slash
    assert members == [prefix + n for n in ["raw_model.obj", "model.mtl", "texture.png", "image.jpg"]]
    assert zip_members_under(path, "3D-FUTURE-model/0a1b2c3d") == []  # a folder, not a name prefix
    written = extract_zip_members(path, members, tmp_path / "asset", strip_prefix=prefix)
    assert written == [
        tmp_path / "asset" / n for n in ["raw_model.obj", "model.mtl", "texture.png", "image.jpg"]
    ]
    for member, file in zip(members, written):
        assert file.read_bytes() == files[member]
    assert _files(tmp_path / "asset") == sorted(p.name for p in written)
    # The link is not a regular file: not listed.
    other = zip_members_under(path, "3D-FUTURE-model/0a1b2c3d-0000-4000-8000-000000000002")
    assert len(other) == 4 and not any(m.endswith("link.png") for m in other)


def test_extract_toys4k_blend(tmp_path):
    path = tmp_path / "toys4k_blend_files.zip"
    member = "toys4k_blend_files/airplane/airplane_000/airplane_000.blend"
    _make_zip(
        path,
        {member: b"BLENDER-v293" + os.urandom(100), "toys4k_blend_files/cat/cat_001/cat_001.blend": b"x"},
    )
    written = extract_zip_members(
        path, [member], tmp_path / "out", strip_prefix="toys4k_blend_files/airplane/airplane_000/"
    )
    assert written == [tmp_path / "out" / "airplane_000.blend"]
    with zipfile.ZipFile(path) as archive:
        assert written[0].read_bytes() == archive.read(member)
    assert _files(tmp_path / "out") == ["airplane_000.blend"]


def test_zip_errors(future_zip, tmp_path):
    path, _ = future_zip
    prefix = "3D-FUTURE-model/0a1b2c3d-0000-4000-8000-000000000001/"
    out = tmp_path / "out"
    with pytest.raises(DownloadError, match=r"3D-FUTURE-model\.zip: no member .*/nope\.obj"):
        extract_zip_members(path, [prefix + "raw_model.obj", prefix + "nope.obj"], out, strip_prefix=prefix)
    assert not out.exists() or _files(out) == []  # checked before anything is written
    link = "3D-FUTURE-model/0a1b2c3d-0000-4000-8000-000000000002/link.png"
    with pytest.raises(DownloadError, match="not a regular file"):
        extract_zip_members(path, [link], out, strip_prefix="3D-FUTURE-model/")
    with pytest.raises(DownloadError, match="archive not found"):
        extract_zip_members(tmp_path / "absent.zip", [prefix + "raw_model.obj"], out)
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"PK not really" * 50)
    with pytest.raises(DownloadError, match=r"junk\.zip: not a readable zip"):
        zip_members_under(junk, "x/")
    with pytest.raises(ValueError, match="does not start with"):
        extract_zip_members(path, [prefix + "raw_model.obj"], out, strip_prefix="other/")


def test_zip_slip_refused(tmp_path):
    path = tmp_path / "slip.zip"
    _make_zip(path, {"pack/../../evil.txt": b"evil", "/abs/evil.txt": b"evil", "pack/ok.txt": b"ok"})
    out = tmp_path / "deep" / "out"
    for member in ["pack/../../evil.txt", "/abs/evil.txt"]:
        with pytest.raises(DownloadError, match="unsafe name"):
            extract_zip_members(path, [member], out, strip_prefix="")
    assert not list(tmp_path.rglob("evil.txt"))
    assert extract_zip_members(path, ["pack/ok.txt"], out, strip_prefix="pack/") == [out / "ok.txt"]


def test_zip_corrupt_member(tmp_path):
    path = tmp_path / "bad.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("a/model.obj", b"v 0 0 0\n" * 100)
    raw = bytearray(path.read_bytes())
    raw[raw.index(b"v 0 0 0") + 3] ^= 0xFF  # flip a byte of the stored data: its CRC no longer holds
    path.write_bytes(bytes(raw))
    with pytest.raises(DownloadError, match=r"bad\.zip: member a/model\.obj: corrupt"):
        extract_zip_members(path, ["a/model.obj"], tmp_path / "out", strip_prefix="a/")
    assert _files(tmp_path / "out") == []


def test_state_is_not_written_every_member(tar, members, tmp_path, monkeypatch):
    """Unwanted members save the state at most every N members (here N=5), wanted ones always."""
    path, _ = tar
    writes = []
    real = archives.write_json_atomic
    monkeypatch.setattr(archives, "_STATE_EVERY_MEMBERS", 5)
    monkeypatch.setattr(
        archives, "write_json_atomic", lambda p, obj: (writes.append(obj["offset"]), real(p, obj))
    )
    data = _data(members)
    last = [name for name in data if "item_" in name][-1]
    extract_tar_members(_Opener(path), {last: tmp_path / "last.glb"}, tmp_path / "s.json")
    # ~30 members before the wanted one: about 6 periodic saves, one after it, one at completion
    assert 5 <= len(writes) <= 9, writes
    assert writes == sorted(writes)


def test_resume_right_at_the_end_of_the_archive(tar, members, tmp_path):
    """Killed after the last member but before the pass was recorded complete: it ends at once."""
    path, offsets = tar
    end = max(offsets.values()) + 512 + TAIL_BYTES  # the tail is the last member, one plain header
    state = tmp_path / "s.json"
    state.write_text(
        json.dumps(
            {
                "version": 1,
                "archive_id": "",
                "offset": end,
                "complete": False,
                "pending": ["absent"],
                "refused": [],
                "missing": [],
            }
        )
    )
    opener = _Opener(path)
    result = extract_tar_members(opener, {"absent": tmp_path / "absent"}, state)
    assert opener.offsets[0] == end and result.complete and result.missing == ["absent"]
    assert result.bytes_read <= path.stat().st_size - end + 512  # and its first block read again


def test_zip_replaced_between_calls_is_reread(tmp_path):
    """The opened zip is reused within a process only while the file is unchanged."""
    path = tmp_path / "toys4k_blend_files.zip"
    member = "toys4k_blend_files/cat/cat_001/cat_001.blend"
    prefix = "toys4k_blend_files/cat/cat_001/"
    _make_zip(path, {member: b"first"})
    assert (
        extract_zip_members(path, [member], tmp_path / "a", strip_prefix=prefix)[0].read_bytes() == b"first"
    )
    _make_zip(path, {member: b"second, longer"})
    assert (
        extract_zip_members(path, [member], tmp_path / "b", strip_prefix=prefix)[0].read_bytes()
        == b"second, longer"
    )
