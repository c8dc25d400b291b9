"""A loopback HTTP server for the download tests, with faults injected per file.

`FixtureServer` serves byte strings at paths on 127.0.0.1 (an ephemeral port) and records
every request it sees, so a test can assert both what the client got and what it asked for
(a `Range` header after a truncated body, no request at all when the file is already there).
Faults are queued per path and consumed one per GET: "404", "500", "503", "429" (with
`Retry-After: 0`), "reset" (the connection closed before any answer), "truncate" (the full
`Content-Length` announced, half of the body sent, then the connection closed) and "stall"
(headers sent, then silence until the server closes).

Written on the stdlib `http.server`: a test dependency would buy nothing for a few headers.
"""

from __future__ import annotations

import email.utils
import hashlib
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple

import pytest

FAULTS = ("404", "500", "503", "429", "reset", "truncate", "stall")
_STALL_LIMIT_S = 60.0  # a stalled answer ends at the latest after this, even if nobody closes the server
_THROTTLE_TICK_S = 0.02  # a throttled body is sent in slices this far apart


class Request(NamedTuple):
    """One request as the server saw it; header names are lower-case."""

    method: str
    path: str
    headers: dict[str, str]


@dataclass
class _Resource:
    body: bytes
    etag: str
    last_modified: str
    token: str | None = None
    ranges: bool = True
    rate_bps: int | None = None
    faults: deque[str] = field(default_factory=deque)


def _default_etag(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


class FixtureServer:
    """A threaded HTTP server on 127.0.0.1 that serves registered byte strings.

    Attributes:
        url: "http://127.0.0.1:PORT", without a trailing slash.
        requests: every request received, in arrival order.
        peak_in_flight: the most requests in flight at once. A request counts from its
            arrival until just before its last body slice is written, so a client that
            starts its next request after reading a whole body never overlaps it.
    """

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.peak_in_flight = 0
        self._in_flight = 0
        self._redirects: dict[str, str] = {}
        self._resources: dict[str, _Resource] = {}
        self._lock = threading.Lock()
        self._closing = threading.Event()  # wakes stalled and throttled handlers at shutdown
        self._modified_counter = 0
        handler = type("_BoundHandler", (_Handler,), {"fixture": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True  # a hung handler never keeps the test process alive
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def add(
        self,
        path: str,
        body: bytes,
        *,
        faults: Sequence[str] = (),
        etag: str | None = None,
        token: str | None = None,
        ranges: bool = True,
        rate_bps: int | None = None,
    ) -> str:
        """Serve `body` at `path`.

        Args:
            path: the URL path, e.g. "/a/b.glb".
            body: the file's bytes.
            faults: answers given instead of the body, one per GET, in order (see FAULTS);
                then the body is served normally.
            etag: the ETag header, quoted; defaults to a hash of `body`.
            token: when set, GET and HEAD need "Authorization: Bearer <token>": 401 without
                one, 403 with a wrong one (what a gated HF dataset answers).
            ranges: honour "Range: bytes=N-" / "bytes=N-M" (206) and If-Range; when False the
                Range header is ignored and the whole body is sent with 200.
            rate_bps: send the body at about this many bytes per second.

        Returns:
            The file's full URL.
        """
        unknown = [f for f in faults if f not in FAULTS]
        if unknown:
            raise ValueError(f"unknown faults {unknown}; expected some of {FAULTS}")
        if not path.startswith("/"):
            raise ValueError(f"path must start with '/': {path!r}")
        with self._lock:
            self._resources[path] = _Resource(
                body=body,
                etag=etag or _default_etag(body),
                last_modified=self._next_last_modified(),
                token=token,
                ranges=ranges,
                rate_bps=rate_bps,
                faults=deque(faults),
            )
        return self.url + path

    def replace(self, path: str, body: bytes, etag: str | None = None) -> None:
        """Change the file at `path` (new bytes, new ETag and Last-Modified); faults stay queued."""
        with self._lock:
            resource = self._resources[path]
            resource.body = body
            resource.etag = etag or _default_etag(body)
            resource.last_modified = self._next_last_modified()

    def add_redirect(self, path: str, location: str) -> str:
        """Answer `path` with a 302 to `location` (a full URL, e.g. on another FixtureServer)."""
        with self._lock:
            self._redirects[path] = location
        return self.url + path

    def add_faults(self, path: str, *faults: str) -> None:
        """Queue more faults for an existing path."""
        with self._lock:
            self._resources[path].faults.extend(faults)

    def hits(self, path: str) -> list[Request]:
        """The requests for `path` (query string ignored), in arrival order."""
        with self._lock:
            return [r for r in self.requests if r.path.split("?", 1)[0] == path]

    def close(self) -> None:
        """Stop serving; stalled and throttled answers end at once. Safe to call twice."""
        if self._closing.is_set():
            return
        self._closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FixtureServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next_last_modified(self) -> str:
        # Distinct per version even within one second, so If-Range by date can tell them apart.
        self._modified_counter += 1
        return email.utils.formatdate(time.time() + self._modified_counter, usegmt=True)

    def _arrive(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)
            self._in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self._in_flight)

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _lookup(self, path: str) -> tuple[_Resource | None, bytes, str, str]:
        """The resource at `path` and a consistent snapshot of its body and validators."""
        with self._lock:
            resource = self._resources.get(path.split("?", 1)[0])
            if resource is None:
                return None, b"", "", ""
            return resource, resource.body, resource.etag, resource.last_modified

    def _take_fault(self, resource: _Resource) -> str | None:
        with self._lock:
            return resource.faults.popleft() if resource.faults else None


class _Handler(BaseHTTPRequestHandler):
    fixture: FixtureServer  # set on the per-server subclass
    protocol_version = "HTTP/1.1"  # Content-Length is honoured; every answer closes the connection

    def log_message(self, format: str, *args: object) -> None:
        pass  # the request list is the log; stderr noise would bury pytest's output

    def end_headers(self) -> None:
        self.send_header("Connection", "close")  # one answer per connection keeps faults simple
        super().end_headers()

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def _answer(self, send_body: bool) -> None:
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.close_connection = True
        self._in_flight = True
        self.fixture._arrive(Request(self.command, self.path, headers))
        try:
            self._answer_recorded(headers, send_body)
        finally:
            self._left()

    def _left(self) -> None:
        if self._in_flight:
            self._in_flight = False
            self.fixture._leave()

    def _answer_recorded(self, headers: dict[str, str], send_body: bool) -> None:
        fixture = self.fixture
        location = fixture._redirects.get(self.path)
        if location is not None:
            self.send_response(HTTPStatus.FOUND)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        resource, body, etag, last_modified = fixture._lookup(self.path)
        if resource is None:
            return self._status(HTTPStatus.NOT_FOUND)
        if resource.token is not None:
            auth = headers.get("authorization")
            if auth is None:
                return self._status(HTTPStatus.UNAUTHORIZED)
            if auth != f"Bearer {resource.token}":
                return self._status(HTTPStatus.FORBIDDEN)
        fault = fixture._take_fault(resource) if send_body else None
        if fault == "reset":
            return  # closing without an answer: the client sees the connection dropped
        if fault in ("404", "500", "503", "429"):
            return self._status(HTTPStatus(int(fault)))

        start, end = 0, len(body)
        status = HTTPStatus.OK
        range_header = headers.get("range")
        if resource.ranges and range_header and self._if_range_holds(headers, etag, last_modified):
            parsed = _parse_range(range_header, len(body))
            if parsed is None:
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start, end = parsed
            status = HTTPStatus.PARTIAL_CONTENT

        self.send_response(status)
        self.send_header("Content-Length", str(end - start))
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("ETag", etag)
        self.send_header("Last-Modified", last_modified)
        if resource.ranges:
            self.send_header("Accept-Ranges", "bytes")
        if status == HTTPStatus.PARTIAL_CONTENT:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(body)}")
        self.end_headers()
        if not send_body:
            return
        if fault == "stall":
            self.wfile.flush()
            fixture._closing.wait(_STALL_LIMIT_S)
            return
        if fault == "truncate":
            end = start + (end - start) // 2
        self._send(body[start:end], resource.rate_bps)

    def _if_range_holds(self, headers: dict[str, str], etag: str, last_modified: str) -> bool:
        """RFC 9110 If-Range: serve the range only if the validator is the current one."""
        validator = headers.get("if-range")
        return validator is None or validator in (etag, last_modified)

    def _status(self, status: HTTPStatus) -> None:
        payload = f"{status.value} {status.phrase}\n".encode()
        self.send_response(status)
        if status == HTTPStatus.TOO_MANY_REQUESTS:
            self.send_header("Retry-After", "0")
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _send(self, payload: bytes, rate_bps: int | None) -> None:
        step = len(payload) if rate_bps is None else max(1, int(rate_bps * _THROTTLE_TICK_S))
        try:
            for i in range(0, len(payload), step):
                if i:
                    time.sleep(_THROTTLE_TICK_S)
                if self.fixture._closing.is_set():
                    return
                if i + step >= len(payload):
                    self._left()  # before the last slice: see FixtureServer.peak_in_flight
                self.wfile.write(payload[i : i + step])
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout, a killed process): not the server's error


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """ "bytes=N-" or "bytes=N-M" -> [start, end) within `size`; None if not satisfiable."""
    unit, _, spec = header.partition("=")
    first, _, last = spec.strip().partition("-")
    if unit.strip() != "bytes" or "," in spec or not first.isdigit():
        return None
    start = int(first)
    end = min(size, int(last) + 1) if last.strip().isdigit() else size
    if start >= size or start >= end:
        return None
    return start, end


@pytest.fixture
def fixture_server() -> Iterator[FixtureServer]:
    """A started `FixtureServer`, closed after the test."""
    server = FixtureServer()
    try:
        yield server
    finally:
        server.close()
