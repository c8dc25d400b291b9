"""slatflow.http_fetch against the loopback fixture server, with injected faults."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from download_fixtures import FixtureServer, fixture_server  # noqa: F401 - a fixture

from slatflow.errors import AccessDenied, DownloadError, HashMismatch
from slatflow.http_fetch import (
    USER_AGENT,
    HostLimiter,
    RetryPolicy,
    Transfer,
    download_file,
    download_many,
    open_stream,
)

REPO = Path(__file__).resolve().parents[1]
FAST = RetryPolicy(attempts=4, backoff_s=0.01, max_backoff_s=0.05, timeout_s=0.5)


def payload(n: int, seed: int = 0) -> bytes:
    """n bytes that differ at every offset, so a misplaced resume changes the hash."""
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:n])


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir() if p.name.startswith(dest.name + "."))


# ---------------------------------------------------------------------------------------------
# download_file


def test_plain_download_verified(fixture_server: FixtureServer, tmp_path: Path):
    body = payload(50_000)
    url = fixture_server.add("/a/b.glb", body)
    dest = tmp_path / "out" / "b.glb"
    transfer = download_file(url, dest, sha256=sha(body).upper(), policy=FAST)
    assert dest.read_bytes() == body
    assert transfer == Transfer(url, dest, len(body), sha(body), 0, 1, transfer.seconds)
    assert leftovers(dest) == []  # neither .part nor .part.json
    (request,) = fixture_server.hits("/a/b.glb")
    assert request.headers["user-agent"] == USER_AGENT
    assert "range" not in request.headers


def test_404_fails_at_once(fixture_server: FixtureServer, tmp_path: Path):
    url = fixture_server.url + "/missing.glb"
    with pytest.raises(DownloadError, match=r"^HTTP 404 Not Found: http://127\.0\.0\.1:\d+/missing\.glb$"):
        download_file(url, tmp_path / "m.glb", policy=FAST)
    assert len(fixture_server.requests) == 1
    assert list(tmp_path.iterdir()) == []


def test_500_then_success(fixture_server: FixtureServer, tmp_path: Path):
    body = payload(10_000)
    url = fixture_server.add("/x.bin", body, faults=["500"])
    transfer = download_file(url, tmp_path / "x.bin", sha256=sha(body), policy=FAST)
    assert (tmp_path / "x.bin").read_bytes() == body
    assert transfer.attempts == 2
    assert len(fixture_server.hits("/x.bin")) == 2


def test_503_twice_and_429_then_ok(fixture_server: FixtureServer, tmp_path: Path):
    body = payload(10_000)
    url = fixture_server.add("/x.bin", body, faults=["503", "429", "503", "reset"])
    transfer = download_file(
        url, tmp_path / "x.bin", sha256=sha(body), policy=RetryPolicy(5, 0.01, 0.05, 0.5)
    )
    assert transfer.attempts == 5
    assert (tmp_path / "x.bin").read_bytes() == body


def test_attempts_spent_names_cause_and_count(fixture_server: FixtureServer, tmp_path: Path):
    url = fixture_server.add("/x.bin", b"abc", faults=["503"] * 10)
    with pytest.raises(DownloadError, match=r"/x\.bin: gave up after 4 attempts; last error: HTTP 503"):
        download_file(url, tmp_path / "x.bin", policy=FAST)
    assert len(fixture_server.hits("/x.bin")) == 4


def test_connection_refused_is_retried_then_reported(tmp_path: Path):
    with FixtureServer() as server:
        url = server.url + "/x.bin"
    started = time.monotonic()
    with pytest.raises(DownloadError, match=r"gave up after 3 attempts; last error: cannot connect"):
        download_file(url, tmp_path / "x.bin", policy=RetryPolicy(3, 0.01, 0.05, 0.5))
    assert time.monotonic() - started < 5


def test_truncated_body_resumes_with_range(fixture_server: FixtureServer, tmp_path: Path):
    body = payload(40_000)
    url = fixture_server.add("/t.bin", body, faults=["truncate"])
    transfer = download_file(url, tmp_path / "t.bin", sha256=sha(body), policy=FAST)
    assert (tmp_path / "t.bin").read_bytes() == body
    first, second = fixture_server.hits("/t.bin")
    assert "range" not in first.headers
    assert second.headers["range"] == "bytes=20000-"
    assert second.headers["if-range"] == fixture_server._resources["/t.bin"].etag
    assert transfer.attempts == 2
    assert transfer.resumed_from == 0  # nothing came from an earlier run


def test_wrong_hash_leaves_nothing(fixture_server: FixtureServer, tmp_path: Path):
    body = payload(5_000)
    url = fixture_server.add("/h.bin", body)
    dest = tmp_path / "h.bin"
    wrong = "0" * 64
    with pytest.raises(
        HashMismatch, match=rf"/h\.bin: sha256 {sha(body)} does not match the expected {wrong}"
    ):
        download_file(url, dest, sha256=wrong, policy=FAST)
    assert list(tmp_path.iterdir()) == []
    assert len(fixture_server.hits("/h.bin")) == 1  # a wrong file is not retried


def test_stall_is_retried_after_timeout(fixture_server: FixtureServer, tmp_path: Path):
    body = payload(8_000)
    url = fixture_server.add("/s.bin", body, faults=["stall"])
    started = time.monotonic()
    transfer = download_file(url, tmp_path / "s.bin", sha256=sha(body), policy=FAST)
    elapsed = time.monotonic() - started
    assert (tmp_path / "s.bin").read_bytes() == body
    assert transfer.attempts == 2
    assert FAST.timeout_s <= elapsed < 5


def test_permanent_stall_fails_in_bounded_time(fixture_server: FixtureServer, tmp_path: Path):
    url = fixture_server.add("/s.bin", payload(8_000), faults=["stall"] * 10)
    policy = RetryPolicy(attempts=3, backoff_s=0.01, max_backoff_s=0.05, timeout_s=0.3)
    started = time.monotonic()
    with pytest.raises(DownloadError, match=r"gave up after 3 attempts; last error: stalled"):
        download_file(url, tmp_path / "s.bin", policy=policy)
    assert time.monotonic() - started < 3 * 0.3 + 2


def test_missing_token_and_wrong_token_are_access_denied(fixture_server: FixtureServer, tmp_path: Path):
    body = payload(1_000)
    url = fixture_server.add("/gated/x.glb", body, token="hf_right")
    with pytest.raises(AccessDenied, match=r"^HTTP 401 Unauthorized: .*/gated/x\.glb: no token was sent"):
        download_file(url, tmp_path / "x.glb", policy=FAST)
    with pytest.raises(AccessDenied, match=r"^HTTP 403 Forbidden: .*: the token was refused"):
        download_file(url, tmp_path / "x.glb", headers={"Authorization": "Bearer hf_wrong"}, policy=FAST)
    assert len(fixture_server.hits("/gated/x.glb")) == 2  # neither was retried
    download_file(url, tmp_path / "x.glb", headers={"Authorization": "Bearer hf_right"}, policy=FAST)
    assert (tmp_path / "x.glb").read_bytes() == body


def test_token_never_logged(fixture_server: FixtureServer, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    url = fixture_server.add("/gated/y.glb", payload(1_000), token="hf_secret", faults=["500"])
    with caplog.at_level("DEBUG", logger="slatflow.http_fetch"):
        download_file(url, tmp_path / "y.glb", headers={"Authorization": "Bearer hf_secret"}, policy=FAST)
    assert caplog.records  # the retry and the final line were logged
    assert "hf_secret" not in caplog.text


def test_authorization_dropped_on_redirect_to_another_host(fixture_server: FixtureServer, tmp_path: Path):
    body = payload(2_000)
    with FixtureServer() as cdn:
        target = cdn.add("/blob", body)
        url = fixture_server.add_redirect("/resolve/x.glb", target)
        download_file(
            url, tmp_path / "x.glb", sha256=sha(body), headers={"Authorization": "Bearer t"}, policy=FAST
        )
        assert fixture_server.hits("/resolve/x.glb")[0].headers["authorization"] == "Bearer t"
        assert "authorization" not in cdn.hits("/blob")[0].headers
    assert (tmp_path / "x.glb").read_bytes() == body


def test_file_changed_between_attempts_restarts(fixture_server: FixtureServer, tmp_path: Path):
    old, new = payload(30_000, seed=1), payload(36_000, seed=2)
    url = fixture_server.add("/c.bin", old, faults=["truncate"])
    dest = tmp_path / "c.bin"
    # the first run breaks off halfway and gives up; then the file changes on the server
    with pytest.raises(DownloadError, match="gave up after 1 attempt;"):
        download_file(url, dest, policy=RetryPolicy(attempts=1, timeout_s=0.5))
    assert (tmp_path / "c.bin.part").stat().st_size == 15_000
    fixture_server.replace("/c.bin", new)
    transfer = download_file(url, dest, sha256=sha(new), policy=FAST)
    assert dest.read_bytes() == new
    second = fixture_server.hits("/c.bin")[1]
    assert second.headers["range"] == "bytes=15000-"
    assert second.headers["if-range"] == f'"{sha(old)[:32]}"'  # the old ETag: no longer matches
    assert transfer.resumed_from == 0 and transfer.size == len(new)


def test_server_ignoring_ranges_restarts_from_zero(fixture_server: FixtureServer, tmp_path: Path):
    body = payload(30_000)
    url = fixture_server.add("/n.bin", body, faults=["truncate"], ranges=False)
    download_file(url, tmp_path / "n.bin", sha256=sha(body), policy=FAST)
    assert (tmp_path / "n.bin").read_bytes() == body
    assert fixture_server.hits("/n.bin")[1].headers["range"] == "bytes=15000-"


def test_part_of_another_url_is_discarded(fixture_server: FixtureServer, tmp_path: Path):
    body = payload(20_000)
    url = fixture_server.add("/p.bin", body)
    dest = tmp_path / "p.bin"
    (tmp_path / "p.bin.part").write_bytes(b"junk" * 100)
    (tmp_path / "p.bin.part.json").write_text(
        '{"url": "http://elsewhere/p.bin", "validator": null, "total": 20000}'
    )
    transfer = download_file(url, dest, sha256=sha(body), policy=FAST)
    assert dest.read_bytes() == body and transfer.resumed_from == 0
    assert "range" not in fixture_server.hits("/p.bin")[0].headers


def test_complete_part_is_finished_without_network(fixture_server: FixtureServer, tmp_path: Path):
    body = payload(20_000)
    url = fixture_server.add("/p.bin", body)
    dest = tmp_path / "p.bin"
    (tmp_path / "p.bin.part").write_bytes(body)  # a run killed between the last byte and the rename
    (tmp_path / "p.bin.part.json").write_text(f'{{"url": "{url}", "validator": "\\"v\\"", "total": 20000}}')
    transfer = download_file(url, dest, sha256=sha(body), policy=FAST)
    assert dest.read_bytes() == body
    assert (transfer.resumed_from, transfer.attempts) == (len(body), 0)
    assert fixture_server.requests == []


def test_existing_dest_with_right_hash_makes_no_request(fixture_server: FixtureServer, tmp_path: Path):
    body = payload(3_000)
    url = fixture_server.add("/e.bin", payload(3_000, seed=9))  # would differ if it were fetched
    dest = tmp_path / "e.bin"
    dest.write_bytes(body)
    transfer = download_file(url, dest, sha256=sha(body), policy=FAST)
    assert (transfer.size, transfer.resumed_from, transfer.attempts, transfer.sha256) == (
        3_000,
        3_000,
        0,
        sha(body),
    )
    transfer = download_file(url, dest, policy=FAST)  # no hash given: the file is taken as it is
    assert transfer.attempts == 0
    assert fixture_server.requests == []


def test_existing_dest_with_wrong_hash_is_fetched_again(fixture_server: FixtureServer, tmp_path: Path):
    body = payload(3_000)
    url = fixture_server.add("/e.bin", body)
    dest = tmp_path / "e.bin"
    dest.write_bytes(b"stale")
    download_file(url, dest, sha256=sha(body), policy=FAST)
    assert dest.read_bytes() == body
    dest.write_bytes(b"stale")
    fixture_server.add_faults("/e.bin", "404")
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_file(url, dest, sha256=sha(body), policy=FAST)
    assert not dest.exists(), "a file with the wrong hash does not stay under the final name"


KILLED_CHILD = textwrap.dedent(
    """
    import logging, sys
    from slatflow.http_fetch import RetryPolicy, download_file
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    t = download_file(sys.argv[1], sys.argv[2], sha256=sys.argv[3],
                      policy=RetryPolicy(attempts=3, backoff_s=0.01, timeout_s=5))
    print(t.resumed_from, t.attempts, t.sha256)
    """
)


def test_killed_run_resumes_in_a_new_process(fixture_server: FixtureServer, tmp_path: Path):
    body = payload(300_000)
    url = fixture_server.add("/big.bin", body, rate_bps=200_000)  # 1.5 s for the whole body
    dest = tmp_path / "big.bin"
    part = tmp_path / "big.bin.part"
    cmd = [sys.executable, "-c", KILLED_CHILD, url, str(dest), sha(body)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not (part.exists() and part.stat().st_size > 0) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert child.poll() is None, "the first run ended before it could be killed"
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.communicate(timeout=10)
    assert not dest.exists()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    resumed_from, attempts, digest = done.stdout.split()
    assert dest.read_bytes() == body and digest == sha(body)
    second = fixture_server.hits("/big.bin")[1]
    start = int(second.headers["range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < start < len(body)
    assert int(resumed_from) == start and attempts == "1"
    assert leftovers(dest) == []


# ---------------------------------------------------------------------------------------------
# download_many and HostLimiter


def test_download_many_returns_errors_in_place(fixture_server: FixtureServer, tmp_path: Path):
    bodies = [payload(4_000, seed=i) for i in range(4)]
    items = [
        (fixture_server.add(f"/m{i}.bin", b), tmp_path / f"m{i}.bin", sha(b)) for i, b in enumerate(bodies)
    ]
    items.insert(2, (fixture_server.url + "/nope.bin", tmp_path / "nope.bin", None))
    results = download_many(items, policy=FAST, max_workers=3)
    assert [type(r).__name__ for r in results] == [
        "Transfer",
        "Transfer",
        "DownloadError",
        "Transfer",
        "Transfer",
    ]
    assert "HTTP 404" in str(results[2]) and "/nope.bin" in str(results[2])
    for (url, dest, digest), result in zip(items, results):
        if isinstance(result, Transfer):
            assert result.url == url and result.sha256 == digest == sha(dest.read_bytes())


def test_download_many_rejects_duplicate_dests(tmp_path: Path):
    with pytest.raises(ValueError, match="appears twice"):
        download_many([("http://a/x", tmp_path / "x", None), ("http://b/x", tmp_path / "x", None)])


def test_host_limiter_caps_concurrency(fixture_server: FixtureServer, tmp_path: Path):
    items = [
        (
            fixture_server.add(f"/c{i}.bin", payload(6_000, seed=i), rate_bps=30_000),
            tmp_path / f"c{i}.bin",
            None,
        )
        for i in range(6)
    ]  # 0.2 s per body: long enough to overlap
    results = download_many(items, policy=FAST, max_workers=6, per_host=2)
    assert all(isinstance(r, Transfer) for r in results), results
    assert fixture_server.peak_in_flight == 2


def test_host_limiter_is_per_host():
    limiter = HostLimiter(per_host=1)
    with limiter.slot("http://user:pw@A.example:80/x"), limiter.slot("http://b.example/x"):
        pass  # the second host's slot was free although the first host's only one is taken
    assert set(limiter._slots) == {"a.example:80", "b.example"}


# ---------------------------------------------------------------------------------------------
# open_stream


def test_open_stream_reconnects_across_a_truncated_body(fixture_server: FixtureServer):
    body = payload(100_000)
    url = fixture_server.add("/archive.tar", body, faults=["truncate"])
    with open_stream(url, policy=FAST) as stream:
        assert stream.total == len(body)
        assert stream.etag == fixture_server._resources["/archive.tar"].etag
        head = stream.read(10)
        assert stream.tell() == 10
        rest = stream.read()
    assert head + rest == body
    second = fixture_server.hits("/archive.tar")[1]
    assert second.headers["range"] == "bytes=50000-"
    assert second.headers["if-range"] == stream.etag


def test_open_stream_from_offset(fixture_server: FixtureServer):
    body = payload(20_000)
    url = fixture_server.add("/archive.tar", body)
    with open_stream(url, offset=12_345, policy=FAST) as stream:
        assert stream.tell() == 12_345
        chunks = iter(lambda: stream.read(4096), b"")
        assert b"".join(chunks) == body[12_345:]
        assert stream.tell() == len(body)
    assert fixture_server.hits("/archive.tar")[0].headers["range"] == "bytes=12345-"


def test_open_stream_offset_without_ranges_fails(fixture_server: FixtureServer):
    url = fixture_server.add("/archive.tar", payload(1_000), ranges=False)
    with pytest.raises(DownloadError, match=r"/archive\.tar: asked for bytes 10-, the server ignores Range"):
        open_stream(url, offset=10, policy=FAST)


def test_open_stream_fails_when_the_file_changed(fixture_server: FixtureServer):
    url = fixture_server.add("/archive.tar", payload(100_000), faults=["truncate"])
    with open_stream(url, policy=FAST) as stream:
        stream.read(1_000)
        fixture_server.replace("/archive.tar", payload(100_000, seed=3))
        with pytest.raises(DownloadError, match="cannot resume"):
            stream.read()


def test_open_stream_404_and_stall(fixture_server: FixtureServer):
    with pytest.raises(DownloadError, match="HTTP 404"):
        open_stream(fixture_server.url + "/none.tar", policy=FAST)
    body = payload(5_000)
    url = fixture_server.add("/s.tar", body, faults=["stall"])
    with open_stream(url, policy=FAST) as stream:
        assert stream.read() == body


def test_open_stream_local_file_and_file_url(tmp_path: Path):
    body = payload(9_000)
    path = tmp_path / "local archive.tar"
    path.write_bytes(body)
    with open_stream(path, offset=100) as stream:
        assert (stream.tell(), stream.total, stream.etag) == (100, len(body), None)
        assert stream.read() == body[100:]
    with open_stream(path.as_uri(), offset=8_999) as stream:
        assert stream.read() == body[-1:]
    with pytest.raises(DownloadError, match="cannot open"):
        open_stream(tmp_path / "absent.tar")


def test_open_stream_feeds_tarfile(fixture_server: FixtureServer, tmp_path: Path):
    import io
    import tarfile

    members = {f"m{i}/model.glb": payload(30_000, seed=i) for i in range(3)}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    url = fixture_server.add("/abo.tar", buffer.getvalue(), faults=["truncate"])
    got = {}
    with open_stream(url, policy=FAST) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            got[member.name] = tar.extractfile(member).read()
    assert got == members


# ---------------------------------------------------------------------------------------------
# backoff and progress


def test_backoff_doubles_with_jitter_and_caps():
    from slatflow.http_fetch import _backoff_s

    policy = RetryPolicy(backoff_s=1.0, max_backoff_s=5.0)
    for retry, base in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0), (10, 5.0)]:
        waits = [_backoff_s(retry, policy, None) for _ in range(50)]
        assert all(base / 2 <= w <= base for w in waits), (retry, min(waits), max(waits))
        assert len(set(waits)) > 1  # jittered
    assert _backoff_s(1, policy, retry_after=3.0) == 3.0  # the server's Retry-After wins
    assert _backoff_s(1, policy, retry_after=3600.0) == 5.0  # but capped


def test_progress_is_logged_during_and_after(
    fixture_server: FixtureServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.setattr("slatflow.http_fetch._PROGRESS_EVERY_S", 0.05)
    url = fixture_server.add("/p.bin", payload(20_000), rate_bps=100_000)  # 0.2 s
    with caplog.at_level("INFO", logger="slatflow.http_fetch"):
        download_file(url, tmp_path / "p.bin", policy=FAST)
    messages = [r.getMessage() for r in caplog.records]
    assert any(" of 0.0 MB (" in m and "%) at " in m and "MB/s" in m for m in messages), messages
    assert messages[-1].endswith("(resumed from byte 0, 1 attempt(s))") and "20000 bytes to" in messages[-1]
