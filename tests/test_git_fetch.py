"""git_fetch against a local bare repository standing in for GitHub (file:// URLs, no network)."""

from __future__ import annotations

import http.server
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from slatflow import git_fetch
from slatflow.errors import DownloadError
from slatflow.git_fetch import GithubFile, fetch_git_file, parse_github_identifier

GIT = shutil.which("git")
BIG_BYTES = 5 << 20

CHAIR_OBJ_V1 = b"mtllib chair.mtl\nmtllib ../../../escape.mtl\nv 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n"
CHAIR_OBJ_V2 = b"mtllib chair.mtl\nv 0 0 0\nv 2 0 0\nv 0 2 0\nf 1 2 3\n"
CHAIR_MTL = (
    b"newmtl wood\n"
    b"Kd 1 1 1\n"
    b"map_Kd -bm 1.0 -o 0.5 0.5 textures/wood.png\n"
    b"map_Bump textures/normal map.png\n"
    b"map_Ks /home/artist/specular.png\n"
    b"map_d ../../../outside.png\n"
    b"map_Ns missing.png\n"
)
CAR_GLTF = (
    b'{"asset": {"version": "2.0"}, "buffers": [{"uri": "car.bin", "byteLength": 4},'
    b' {"uri": "data:application/octet-stream;base64,AAAA", "byteLength": 3}],'
    b' "images": [{"uri": "tex/car%20paint.png"}, {"uri": "https://example.com/remote.png"}]}'
)
LFS_POINTER = (
    b"version https://git-lfs.github.com/spec/v1\n"
    b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 12345\n"
)


def _git(cwd: Path, *args: str) -> str:
    env = dict(
        os.environ,
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@t",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@t",
    )
    result = subprocess.run(
        [GIT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=True
    )
    return result.stdout.strip()


def _write(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


@pytest.fixture(scope="module")
def origin(tmp_path_factory):
    """A bare repository with two commits; the first one is what the tests fetch by sha."""
    root = tmp_path_factory.mktemp("origin")
    work = root / "work"
    work.mkdir()
    _git(work, "init", "--quiet", "--initial-branch=main")
    first_files = {
        "models/chair/chair.obj": CHAIR_OBJ_V1,
        "models/chair/chair.mtl": CHAIR_MTL,
        "models/chair/textures/wood.png": b"\x89PNG wood" + os.urandom(64),
        "models/chair/textures/normal map.png": b"\x89PNG normal" + os.urandom(64),
        "scenes/car.gltf": CAR_GLTF,
        "scenes/car.bin": b"\x00\x01\x02\x03",
        "scenes/tex/car paint.png": b"\x89PNG paint",
        "big/unrelated.bin": os.urandom(BIG_BYTES),
        "lfs/model.obj": LFS_POINTER,
        "lfs/textured.obj": b"mtllib textured.mtl\n",
        "lfs/textured.mtl": b"map_Kd lfs_texture.png\nmap_Ks plain.png\n",
        "lfs/lfs_texture.png": LFS_POINTER,
        "lfs/plain.png": b"plain",
        "outside.png": b"at the repo root, but the mtl climbs above it",
    }
    _write(work, first_files)
    _git(work, "add", "-A")
    _git(work, "commit", "--quiet", "-m", "first")
    first = _git(work, "rev-parse", "HEAD")
    _write(work, {"models/chair/chair.obj": CHAIR_OBJ_V2})
    _git(work, "commit", "--quiet", "-am", "second")
    second = _git(work, "rev-parse", "HEAD")
    bare = root / "origin.git"
    _git(root, "clone", "--quiet", "--bare", str(work), str(bare))
    # What GitHub allows: partial fetches, and wants by sha (protocol v0 needs the latter).
    _git(bare, "config", "uploadpack.allowFilter", "true")
    _git(bare, "config", "uploadpack.allowAnySHA1InWant", "true")
    return {"url": bare.as_uri(), "first": first, "second": second, "files": first_files}


def test_parse_github_identifier():
    sha = "0123456789abcdef0123456789abcdef01234567"
    assert parse_github_identifier(
        f"https://github.com/org/repo/blob/{sha}/dir/my%20model.obj"
    ) == GithubFile("org", "repo", sha, "dir/my model.obj")
    parsed = parse_github_identifier(f"https://github.com/o-1/r.x/blob/{sha.upper()}/a b/c d.gltf")
    assert (parsed.org, parsed.repo, parsed.commit, parsed.path) == ("o-1", "r.x", sha, "a b/c d.gltf")
    assert parsed.repo_url == "https://github.com/o-1/r.x.git"
    for bad in [
        "https://gitlab.com/org/repo/blob/{sha}/x.obj",
        "https://github.com/org/repo/tree/{sha}/x.obj",
        "https://github.com/org/repo/blob/{sha}/",
        "https://github.com/org/repo/blob/main/x.obj",  # not pinned
        "https://github.com/org/repo/blob/0123abc/x.obj",  # short sha
        "https://github.com/org/repo/blob/{sha}/../x.obj",
        "https://github.com/org/repo/blob/{sha}/a/%2E%2E/%2E%2E/x.obj",
        "not a url",
    ]:
        with pytest.raises(ValueError, match="GitHub") as info:
            parse_github_identifier(bad.format(sha=sha))
        assert "\n" not in str(info.value)


def test_fetch_obj_at_first_commit_only_its_blobs(origin, tmp_path, monkeypatch, caplog):
    pack_trace = tmp_path / "packs.trace"
    monkeypatch.setenv("GIT_TRACE_PACKFILE", str(pack_trace))  # every pack git receives, verbatim
    dest = tmp_path / "assets" / "repo"
    with caplog.at_level(logging.WARNING, logger="slatflow.git_fetch"):
        written = fetch_git_file(origin["url"], origin["first"], "models/chair/chair.obj", dest, timeout_s=60)

    expected = [
        "models/chair/chair.obj",
        "models/chair/chair.mtl",
        "models/chair/textures/wood.png",
        "models/chair/textures/normal map.png",
    ]
    assert written == [dest / name for name in expected]
    for name in expected:
        assert (dest / name).read_bytes() == origin["files"][name], name
    assert (dest / "models/chair/chair.obj").read_bytes() == CHAIR_OBJ_V1 != CHAIR_OBJ_V2
    # Nothing else was written: not the unrelated blob, nothing outside dest.
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == sorted(expected)
    assert sorted(p.name for p in (tmp_path / "assets").iterdir()) == ["repo"]  # temp git dir removed
    assert not (tmp_path / "outside.png").exists() and not (tmp_path / "escape.mtl").exists()
    # The 5 MB random blob (incompressible) never came over the wire.
    received = pack_trace.stat().st_size
    assert 0 < received < 100_000, received
    warnings = "\n".join(r.getMessage() for r in caplog.records)
    assert "outside the repository" in warnings and "escape.mtl" in warnings and "outside.png" in warnings
    assert "an absolute path" in warnings and "missing.png" in warnings


def test_main_file_lands_last(origin, tmp_path, monkeypatch):
    """Its presence means its companions are there (a kill in between leaves no main file)."""
    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(
        os, "replace", lambda src, dst: (renamed.append(Path(dst).name), real_replace(src, dst))
    )
    fetch_git_file(origin["url"], origin["first"], "models/chair/chair.obj", tmp_path / "repo")
    assert renamed[-1] == "chair.obj" and len(renamed) == 4


def test_fetch_second_commit_and_no_companions(origin, tmp_path):
    dest = tmp_path / "repo"
    written = fetch_git_file(
        origin["url"], origin["second"], "models/chair/chair.obj", dest, companions=False
    )
    assert written == [dest / "models/chair/chair.obj"]
    assert written[0].read_bytes() == CHAIR_OBJ_V2
    assert [p.name for p in dest.rglob("*") if p.is_file()] == ["chair.obj"]


def test_fetch_gltf_companions(origin, tmp_path):
    dest = tmp_path / "repo"
    written = fetch_git_file(origin["url"], origin["first"], "scenes/car.gltf", dest)
    assert written == [dest / "scenes/car.gltf", dest / "scenes/car.bin", dest / "scenes/tex/car paint.png"]
    for path in written:
        assert path.read_bytes() == origin["files"][path.relative_to(dest).as_posix()]


def test_companion_cap(origin, tmp_path, monkeypatch):
    monkeypatch.setattr(git_fetch, "MAX_COMPANIONS", 1)
    written = fetch_git_file(origin["url"], origin["first"], "models/chair/chair.obj", tmp_path / "r")
    assert [p.name for p in written] == ["chair.obj", "chair.mtl"]


@pytest.mark.parametrize(
    ("which", "message"),
    [
        ("repo", "does not appear to be a git repository"),
        ("commit", "git fetch failed"),
        ("path", "path not in the commit"),
    ],
)
def test_missing_repo_commit_or_path(origin, tmp_path, which, message):
    url, commit, path = origin["url"], origin["first"], "models/chair/chair.obj"
    if which == "repo":
        url = (tmp_path / "nowhere.git").as_uri()
    elif which == "commit":
        commit = "1" * 40
    else:
        path = "models/chair/nope.obj"
    start = time.monotonic()
    with pytest.raises(DownloadError, match=message) as info:
        fetch_git_file(url, commit, path, tmp_path / "dest", timeout_s=30)
    assert time.monotonic() - start < 10
    text = str(info.value)
    assert url in text and commit in text and path in text and "\n" not in text
    assert not list((tmp_path / "dest").rglob("*"))
    assert [p.name for p in tmp_path.iterdir()] == ["dest"]  # temp git dir removed on failure too


def test_unsafe_path_refused(origin, tmp_path):
    with pytest.raises(DownloadError, match="not a relative path"):
        fetch_git_file(origin["url"], origin["first"], "../outside.png", tmp_path / "dest")


def _path_without_git_lfs(tmp_path: Path) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "git").symlink_to(GIT)
    return str(bin_dir)


def test_lfs_pointer_without_git_lfs(origin, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", _path_without_git_lfs(tmp_path))
    with pytest.raises(DownloadError, match="stored with Git LFS, and git-lfs is not installed") as info:
        fetch_git_file(origin["url"], origin["first"], "lfs/model.obj", tmp_path / "dest", git=GIT)
    assert "lfs/model.obj" in str(info.value)
    assert not [p for p in (tmp_path / "dest").rglob("*") if p.is_file()]  # no pointer left as the model


def test_lfs_companion_skipped_main_kept(origin, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", _path_without_git_lfs(tmp_path))
    dest = tmp_path / "dest"
    written = fetch_git_file(origin["url"], origin["first"], "lfs/textured.obj", dest, git=GIT)
    assert written == [dest / "lfs/textured.obj", dest / "lfs/textured.mtl", dest / "lfs/plain.png"]
    assert not (dest / "lfs/lfs_texture.png").exists()


def test_lfs_pointer_through_git_lfs(origin, tmp_path, monkeypatch):
    bin_dir = Path(_path_without_git_lfs(tmp_path))
    fake = bin_dir / "git-lfs"  # stands for git-lfs: `git lfs smudge` reads the pointer, prints the content
    fake.write_text(
        '#!/bin/sh\n[ "$1" = smudge ] || exit 2\ncat >/dev/null\nprintf "real content of %s" "$3"\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    written = fetch_git_file(origin["url"], origin["first"], "lfs/model.obj", tmp_path / "dest", git=GIT)
    assert written[0].read_bytes() == b"real content of lfs/model.obj"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _AuthHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="private"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


class _SilentHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        time.sleep(5)  # longer than the fetch's timeout: the server stalls

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    servers = []

    def start(handler):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        thread.start()
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.server_address[1]}/org/repo.git"

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_never_prompts(tmp_path, http_server):
    sha = "2" * 40
    for url, message in [
        (f"http://127.0.0.1:{_closed_port()}/x.git", "git fetch failed"),
        (http_server(_AuthHandler), "terminal prompts disabled"),
    ]:
        start = time.monotonic()
        with pytest.raises(DownloadError, match=message) as info:
            fetch_git_file(url, sha, "a.obj", tmp_path / "dest", timeout_s=20)
        assert time.monotonic() - start < 10
        assert url in str(info.value)


def test_stalled_server_times_out(tmp_path, http_server):
    url = http_server(_SilentHandler)
    start = time.monotonic()
    with pytest.raises(DownloadError, match="timed out after 1 s"):
        fetch_git_file(url, "3" * 40, "a.obj", tmp_path / "dest", timeout_s=1)
    assert time.monotonic() - start < 4
    assert [p.name for p in tmp_path.iterdir()] == ["dest"]


def test_server_without_filter_still_works_and_warns(origin, tmp_path, caplog):
    """A server that does not allow filters gets a whole fetch of the commit, logged as a warning."""
    bare = tmp_path / "nofilter.git"
    shutil.copytree(Path(origin["url"].removeprefix("file://")), bare)
    _git(bare, "config", "uploadpack.allowFilter", "false")
    with caplog.at_level(logging.WARNING, logger="slatflow.git_fetch"):
        written = fetch_git_file(bare.as_uri(), origin["first"], "scenes/car.bin", tmp_path / "dest")
    assert written[0].read_bytes() == origin["files"]["scenes/car.bin"]
    assert "filtering not recognized by server" in caplog.text
