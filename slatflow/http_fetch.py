"""Verified, resumable HTTP downloads: the network core of the download stage.

`download_file` streams one URL to `<dest>.part`, keeping a sidecar `<dest>.part.json` (URL,
validator, total size) so that a run killed mid-transfer resumes with `Range` + `If-Range`
in a new process; the sha256 is checked before the part is renamed onto `dest`. Transient
failures (connection refused or reset, a stall longer than the timeout, HTTP 5xx/408/429, a
body shorter than announced) are retried with exponential backoff and jitter, each retry
resuming from the bytes already written. `open_stream` gives a file-like over one body (a
large tar archive read in one pass) that reconnects transparently in the middle.
`download_many` runs many downloads on a thread pool, at most `per_host` at once per host.

Written on stdlib urllib: one GET with Range/If-Range and a socket timeout is all it takes,
and neither requests nor huggingface_hub resumes across processes with a validator check.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import http.client
import importlib.metadata
import io
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

from slatflow.errors import AccessDenied, DownloadError, HashMismatch
from slatflow.io import sha256_of_file, write_json_atomic

log = logging.getLogger(__name__)

_CHUNK = 1 << 20  # largest single read; read1 returns what has arrived, so progress stays live
_PROGRESS_EVERY_S = 5.0
_MB = 1e6
# Jitter only decorrelates clients retrying together; it needs no seed and never affects output.
_JITTER = random.Random()


def _user_agent() -> str:
    try:
        version = importlib.metadata.version("slatflow")
    except importlib.metadata.PackageNotFoundError:
        version = "0+unknown"  # a source checkout that was never pip-installed
    return f"slatflow/{version}"


USER_AGENT = _user_agent()


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently one URL is tried.

    Attributes:
        attempts: tries per URL in total (the first one included).
        backoff_s: the wait before the first retry; it doubles each retry, with jitter.
        max_backoff_s: the longest wait, also the cap on a server's Retry-After.
        timeout_s: the connect timeout and the longest stall between two reads.
    """

    attempts: int = 6
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts must be >= 1, got {self.attempts}")
        if self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError(f"RetryPolicy backoffs must be >= 0, got {self.backoff_s}, {self.max_backoff_s}")
        if self.timeout_s <= 0:
            raise ValueError(f"RetryPolicy.timeout_s must be > 0, got {self.timeout_s}")


@dataclass(frozen=True)
class Transfer:
    """One finished download.

    Attributes:
        url: the URL asked for.
        dest: the final file.
        size: its size in bytes.
        sha256: its sha256 (hex), checked against the expected one when one was given.
        resumed_from: bytes a previous run had left in the part file and this one kept;
            the whole size when `dest` was already there and nothing was fetched.
        attempts: requests made (0 when nothing had to be fetched).
        seconds: wall time of the call.
    """

    url: str
    dest: Path
    size: int
    sha256: str
    resumed_from: int
    attempts: int
    seconds: float


class HostLimiter:
    """At most `per_host` concurrent transfers to one host (URL netloc), across threads.

    Args:
        per_host: the number of transfers one host gets at once.
    """

    def __init__(self, per_host: int = 4):
        if per_host < 1:
            raise ValueError(f"HostLimiter.per_host must be >= 1, got {per_host}")
        self.per_host = per_host
        self._lock = threading.Lock()
        self._slots: dict[str, threading.BoundedSemaphore] = {}

    @contextlib.contextmanager
    def slot(self, url: str) -> Iterator[None]:
        """Hold one of the URL's host's slots for the duration of the block (blocks until free)."""
        host = urllib.parse.urlsplit(str(url)).netloc.rpartition("@")[2].lower()
        with self._lock:
            semaphore = self._slots.setdefault(host, threading.BoundedSemaphore(self.per_host))
        with semaphore:
            yield


# ---------------------------------------------------------------------------------------------
# One request


class _TransientError(Exception):
    """A failure worth retrying; `cause` is a one-line description without the URL."""

    def __init__(self, cause: str, retry_after: float | None = None, restart: bool = False):
        super().__init__(cause)
        self.cause = cause
        self.retry_after = retry_after  # the server's Retry-After in seconds, if it sent one
        self.restart = restart  # the bytes kept so far are unusable (416): start again from 0


class _Response(NamedTuple):
    body: http.client.HTTPResponse
    start: int  # offset in the resource of the body's first byte
    length: int | None  # bytes this body should carry (Content-Length), if announced
    total: int | None  # size of the whole resource, if known
    etag: str | None
    validator: str | None  # what If-Range may send back: a strong ETag, else Last-Modified


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows redirects but drops Authorization when one leaves the host.

    The HF hub answers with a redirect to a CDN's signed URL; the token must not travel
    there (requests behaves the same way), and some CDNs reject a second credential.
    """

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and _host(newurl) != _host(req.full_url):
            new.remove_header("Authorization")
        return new


def _host(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc.rpartition("@")[2].lower()


_OPENER = urllib.request.build_opener(_RedirectHandler)


def _connect(
    url: str, headers: Mapping[str, str], offset: int, validator: str | None, timeout_s: float
) -> _Response:
    """Send one GET for `url` from `offset`; return the open response or raise a classified error.

    Raises:
        _TransientError: a failure worth retrying.
        AccessDenied: HTTP 401/403.
        DownloadError: any other failure that retrying cannot fix.
    """
    request_headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity", **headers}
    if offset:
        request_headers["Range"] = f"bytes={offset}-"
        if validator:
            request_headers["If-Range"] = validator
    try:
        request = urllib.request.Request(url, headers=request_headers)
        response = _OPENER.open(request, timeout=timeout_s)
    except urllib.error.HTTPError as err:
        sent_token = any(k.lower() == "authorization" for k in headers)
        error = _classify_http_error(err, url, sent_token)
        err.close()
        raise error from None
    except urllib.error.URLError as err:
        if isinstance(err.reason, OSError):  # refused, reset, timed out, name not resolved
            raise _TransientError(f"cannot connect: {err.reason}") from None
        raise DownloadError(f"{url}: {err.reason}") from None
    except (ValueError, http.client.InvalidURL) as err:
        raise DownloadError(f"{url}: not a valid URL: {err}") from None
    except (OSError, http.client.HTTPException) as err:  # a reset or timeout before the status line
        raise _TransientError(f"no answer: {type(err).__name__}: {err}") from None

    status = response.status
    length_header = response.headers.get("Content-Length")
    length = int(length_header) if length_header and length_header.isdigit() else None
    if status == 206:
        start, total = _parse_content_range(response.headers.get("Content-Range"))
        if start != offset:
            response.close()
            raise DownloadError(f"{url}: asked for bytes {offset}- but got a range starting at {start}")
    elif status == 200:
        start, total = 0, length
    else:
        response.close()
        raise DownloadError(f"{url}: unexpected HTTP {status} {response.reason}")
    etag = response.headers.get("ETag")
    strong_etag = etag if etag and not etag.startswith("W/") else None  # If-Range needs a strong one
    return _Response(
        body=response,
        start=start,
        length=length,
        total=total,
        etag=etag,
        validator=strong_etag or response.headers.get("Last-Modified"),
    )


def _classify_http_error(
    err: urllib.error.HTTPError, url: str, sent_token: bool
) -> _TransientError | DownloadError:
    what = f"HTTP {err.code} {err.reason}"
    if err.code in (401, 403):
        if sent_token:
            hint = (
                "the token was refused (expired, or a gated dataset whose terms "
                "this account has not accepted)"
            )
        else:
            hint = "no token was sent and this resource needs one"
        return AccessDenied(f"{what}: {url}: {hint}")
    if err.code == 416:  # the part is longer than the file: it can only be a stale one
        return _TransientError(what, retry_after=0.0, restart=True)
    if err.code in (408, 429) or err.code >= 500:
        return _TransientError(what, retry_after=_retry_after_s(err.headers.get("Retry-After")))
    return DownloadError(f"{what}: {url}")


def _retry_after_s(value: str | None) -> float | None:
    """Retry-After as seconds from now: either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """ "bytes START-END/TOTAL" -> (START, TOTAL); TOTAL "*" -> None."""
    try:
        _, _, spec = (value or "").partition(" ")
        span, _, total = spec.partition("/")
        start = int(span.partition("-")[0])
        return start, (int(total) if total.strip().isdigit() else None)
    except ValueError:
        return None, None


def _read_error(err: Exception, position: int) -> _TransientError:
    if isinstance(err, TimeoutError):
        return _TransientError(f"stalled: no data for the timeout after byte {position}")
    return _TransientError(f"connection lost after byte {position}: {type(err).__name__}: {err}")


class _Retrier:
    """Counts the attempts at one URL and sleeps the backoff before each retry."""

    def __init__(self, url: str, policy: RetryPolicy):
        self.url = url
        self.policy = policy
        self.attempts = 0
        self.last: _TransientError | None = None

    def next_attempt(self) -> None:
        """Wait before a retry, or raise DownloadError when the policy's attempts are spent."""
        if self.last is not None:
            if self.attempts >= self.policy.attempts:
                plural = "s" if self.attempts > 1 else ""
                raise DownloadError(
                    f"{self.url}: gave up after {self.attempts} attempt{plural}; "
                    f"last error: {self.last.cause}"
                )
            wait_s = _backoff_s(self.attempts, self.policy, self.last.retry_after)
            log.warning(
                "%s: %s; retry %d of %d in %.2f s",
                self.url,
                self.last.cause,
                self.attempts,
                self.policy.attempts - 1,
                wait_s,
            )
            time.sleep(wait_s)
        self.attempts += 1

    def failed(self, err: _TransientError) -> None:
        self.last = err


def _backoff_s(retry: int, policy: RetryPolicy, retry_after: float | None) -> float:
    """The wait before retry number `retry` (1-based): the server's wish if it said one."""
    if retry_after is not None:
        return min(retry_after, policy.max_backoff_s)
    base = min(policy.max_backoff_s, policy.backoff_s * 2 ** (retry - 1))
    return base * (0.5 + 0.5 * _JITTER.random())


class _Progress:
    """Logs a transfer's progress at most every _PROGRESS_EVERY_S seconds."""

    def __init__(self, url: str, done: int, total: int | None):
        self.url = url
        self.done = done
        self.total = total
        self._started = time.monotonic()
        self._from = done
        self._logged = self._started

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._logged < _PROGRESS_EVERY_S:
            return
        self._logged = now
        rate = (self.done - self._from) / max(now - self._started, 1e-9) / _MB
        if self.total:
            log.info(
                "%s: %.1f of %.1f MB (%.0f%%) at %.2f MB/s",
                self.url,
                self.done / _MB,
                self.total / _MB,
                100 * self.done / self.total,
                rate,
            )
        else:
            log.info("%s: %.1f MB at %.2f MB/s", self.url, self.done / _MB, rate)


# ---------------------------------------------------------------------------------------------
# download_file


class _PartFile:
    """`<dest>.part` and its sidecar `<dest>.part.json`, which says what the part is a prefix of.

    The part is not written through io.atomic_path: a resumable download needs a stable name.
    Ordering keeps the pair consistent across a kill: the part is emptied before a new sidecar
    is written, and the sidecar is written before any byte of a new body.
    """

    def __init__(self, dest: Path, url: str):
        self.path = dest.with_name(dest.name + ".part")
        self.meta_path = dest.with_name(dest.name + ".part.json")
        self.url = url
        self.validator: str | None = None
        self.total: int | None = None
        self.size = 0
        self.restarted = False  # bytes of an earlier run were thrown away
        self._digest: hashlib._Hash | None = None  # sha256 of the bytes on disk, once needed
        self._load()

    def _load(self) -> None:
        try:
            meta = json.loads(self.meta_path.read_text())
        except (FileNotFoundError, ValueError):
            meta = None
        size = self.path.stat().st_size if self.path.exists() else 0
        if not isinstance(meta, dict) or meta.get("url") != self.url:
            if size:
                log.info("%s: discarding %s: it is not a part of this URL", self.url, self.path)
            self._discard()
            return
        total = meta.get("total")
        if total is not None and size > total:
            log.info("%s: discarding %s: %d bytes, more than the file's %d", self.url, self.path, size, total)
            self._discard()
            return
        self.validator, self.total, self.size = meta.get("validator"), total, size

    def _discard(self) -> None:
        self.path.unlink(missing_ok=True)
        self.meta_path.unlink(missing_ok=True)
        self.validator, self.total, self.size = None, None, 0
        self._digest = hashlib.sha256()

    def restart(self) -> None:
        """Throw the bytes away and start again from 0."""
        if self.size:
            self.restarted = True
        self._discard()

    def begin(self, validator: str | None, total: int | None) -> None:
        """Record what the body about to be written from byte 0 is."""
        self.validator, self.total = validator, total
        write_json_atomic(self.meta_path, {"url": self.url, "validator": validator, "total": total})

    def complete(self) -> bool:
        return self.total is not None and self.size == self.total

    def digest(self) -> hashlib._Hash:
        if self._digest is None:  # a part left by an earlier run: hash it once, then on the fly
            self._digest = hashlib.sha256()
            with open(self.path, "rb") as f:
                while chunk := f.read(_CHUNK):
                    self._digest.update(chunk)
        return self._digest

    def append_from(self, response: _Response, progress: _Progress) -> None:
        """Append the response's body; raise _TransientError if it ends early or breaks."""
        digest = self.digest()
        received = 0
        with open(self.path, "ab") as f:
            while True:
                try:
                    chunk = response.body.read1(_CHUNK)
                except (OSError, http.client.HTTPException) as err:
                    raise _read_error(err, self.size) from None
                if not chunk:
                    break
                f.write(chunk)
                digest.update(chunk)
                self.size += len(chunk)
                received += len(chunk)
                progress.add(len(chunk))
            if response.length is not None and received < response.length:
                raise _TransientError(f"body ended after {received} of {response.length} bytes")
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them final

    def finish(self, dest: Path) -> None:
        os.replace(self.path, dest)
        self.meta_path.unlink(missing_ok=True)


def download_file(
    url: str,
    dest: str | os.PathLike,
    *,
    sha256: str | None = None,
    headers: Mapping[str, str] | None = None,
    policy: RetryPolicy = RetryPolicy(),
    limiter: HostLimiter | None = None,
) -> Transfer:
    """Download `url` to `dest`, resuming a part left by an earlier run, verified by sha256.

    If `dest` exists and its sha256 matches (or none was given), nothing is fetched. A part
    file is kept only if its sidecar names the same URL; the server decides by If-Range
    whether it is still a prefix of the file (a 200 answer restarts from 0). A part without a
    validator is resumed only when `sha256` is given, since then a mix of versions is caught.

    Args:
        url: an http(s) URL.
        dest: the final file; its folder is created.
        sha256: the expected hex sha256 of the whole file, or None to skip the check.
        headers: extra request headers (e.g. Authorization); their values are never logged.
        policy: attempts, backoff and timeout.
        limiter: when given, each request holds one of the URL host's slots.

    Returns:
        The finished Transfer.

    Raises:
        AccessDenied: HTTP 401/403 (the message says whether a token was sent).
        HashMismatch: the complete body has another sha256; the part is deleted.
        DownloadError: HTTP 404 and other permanent errors, or the attempts were spent.
    """
    started = time.monotonic()
    dest = Path(dest)
    expected = sha256.lower() if sha256 else None
    headers = dict(headers or {})
    if dest.exists():
        actual = sha256_of_file(dest)
        size = dest.stat().st_size
        if expected is None or actual == expected:
            log.info("%s: %s is already there (%d bytes); nothing to fetch", url, dest, size)
            return Transfer(url, dest, size, actual, size, 0, time.monotonic() - started)
        log.warning("%s: %s has sha256 %s, not %s; downloading it again", url, dest, actual, expected)
        dest.unlink()  # a wrong file must not stay under the final name if the download fails
    dest.parent.mkdir(parents=True, exist_ok=True)

    part = _PartFile(dest, url)
    if part.size and part.validator is None and expected is None:
        part.restart()  # nothing could tell a changed file from the one the part began
    kept = part.size
    if kept:
        log.info("%s: resuming %s from byte %d", url, part.path, kept)
    progress = _Progress(url, part.size, part.total)
    retrier = _Retrier(url, policy)
    while not part.complete():
        retrier.next_attempt()
        try:
            with limiter.slot(url) if limiter else contextlib.nullcontext():
                _fetch_once(part, url, headers, policy, progress)
        except _TransientError as err:
            if err.restart:
                part.restart()
            retrier.failed(err)
            continue
        if part.total is None:  # no size announced: the body that ended cleanly is the file
            break

    actual = part.digest().hexdigest()
    if expected is not None and actual != expected:
        part.restart()
        raise HashMismatch(f"{url}: sha256 {actual} does not match the expected {expected}")
    part.finish(dest)
    resumed_from = 0 if part.restarted else kept
    seconds = time.monotonic() - started
    log.info(
        "%s: %d bytes to %s in %.2f s (resumed from byte %d, %d attempt(s))",
        url,
        part.size,
        dest,
        seconds,
        resumed_from,
        retrier.attempts,
    )
    return Transfer(url, dest, part.size, actual, resumed_from, retrier.attempts, seconds)


def _fetch_once(
    part: _PartFile, url: str, headers: Mapping[str, str], policy: RetryPolicy, progress: _Progress
) -> None:
    """One request: append the body to the part, from its current size."""
    response = _connect(url, headers, part.size, part.validator, policy.timeout_s)
    with contextlib.closing(response.body):
        if part.size and response.start == 0:
            log.info(
                "%s: the server sent the whole file instead of bytes %d- (changed, or no ranges); "
                "starting again from 0",
                url,
                part.size,
            )
            part.restart()
        if part.size == 0:
            part.begin(response.validator, response.total)
        elif response.total is not None and part.total is not None and response.total != part.total:
            part.restart()
            raise _TransientError(f"the file's size changed from {part.total} to {response.total}")
        progress.total = part.total
        progress.done = part.size
        part.append_from(response, progress)
    if part.total is not None and part.size != part.total:
        raise _TransientError(f"got {part.size} of {part.total} bytes")


# ---------------------------------------------------------------------------------------------
# download_many


def download_many(
    items: Sequence[tuple[str, str | os.PathLike, str | None]],
    *,
    headers: Mapping[str, str] | None = None,
    policy: RetryPolicy = RetryPolicy(),
    max_workers: int = 8,
    per_host: int = 4,
) -> list[Transfer | DownloadError]:
    """Download many files on a thread pool; one failing item never stops the others.

    Args:
        items: (url, dest, sha256 or None) per file; every dest must be distinct.
        headers: request headers sent with every item.
        policy: the retry policy of each item.
        max_workers: threads in the pool.
        per_host: concurrent transfers per host (URL netloc).

    Returns:
        Per item, in order: its Transfer, or the DownloadError that ended it (a local write
        failure such as a full disk is wrapped in a DownloadError naming the URL and dest).
    """
    items = [(url, Path(dest), sha) for url, dest, sha in items]
    seen: set[Path] = set()
    for _, dest, _ in items:
        key = dest.resolve()
        if key in seen:
            raise ValueError(f"download_many: {dest} appears twice; two downloads cannot share one part file")
        seen.add(key)
    limiter = HostLimiter(per_host)

    def one(item: tuple[str, Path, str | None]) -> Transfer | DownloadError:
        url, dest, sha = item
        try:
            return download_file(url, dest, sha256=sha, headers=headers, policy=policy, limiter=limiter)
        except DownloadError as err:
            log.error("%s", err)
            return err
        except OSError as err:
            log.error("%s: writing %s failed: %s", url, dest, err)
            return DownloadError(f"{url}: writing {dest} failed: {err}")

    with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="download") as pool:
        results = list(pool.map(one, items))
    failed = sum(isinstance(r, DownloadError) for r in results)
    log.info("downloaded %d of %d files (%d failed)", len(results) - failed, len(results), failed)
    return results


# ---------------------------------------------------------------------------------------------
# open_stream


def open_stream(
    url: str | os.PathLike,
    *,
    offset: int = 0,
    headers: Mapping[str, str] | None = None,
    policy: RetryPolicy = RetryPolicy(),
) -> contextlib.AbstractContextManager[BinaryIO]:
    """Open a read-only binary stream over a resource from `offset`, for one sequential pass.

    An http(s) stream reconnects on a transient error with `Range: bytes=<pos>-` and
    `If-Range: <first response's validator>`, within the retry policy. A local path or a
    file:// URL is opened and seeked, so local archive copies go through the same code.
    The stream has `.tell()` (the position in the whole resource), `.total` (the resource's
    size, or None if unknown) and `.etag` (None for local files).

    Args:
        url: an http(s) URL, a file:// URL or a local path.
        offset: the first byte to read.
        headers: extra request headers (e.g. Authorization).
        policy: attempts (connection and reconnections together), backoff and timeout.

    Returns:
        The stream, also a context manager that closes it.

    Raises:
        DownloadError: the resource cannot be opened, the server ignores a Range when
            `offset > 0`, or (while reading) it cannot resume after an interruption.
        AccessDenied: HTTP 401/403.
    """
    if offset < 0:
        raise ValueError(f"open_stream: offset must be >= 0, got {offset}")
    url = os.fspath(url)
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        return _HttpStream(url, offset, dict(headers or {}), policy)
    if scheme == "file":
        return _LocalStream(urllib.request.url2pathname(urllib.parse.urlsplit(url).path), offset)
    if scheme == "" or len(scheme) == 1:  # a plain path (or a Windows drive letter)
        return _LocalStream(url, offset)
    raise DownloadError(f"{url}: unsupported URL scheme {scheme!r} (expected http, https, file or a path)")


class _LocalStream(io.FileIO):
    """A local file opened at `offset`, with the attributes of a remote stream."""

    def __init__(self, path: str, offset: int):
        try:
            super().__init__(path, "rb")
        except OSError as err:
            raise DownloadError(f"{path}: cannot open: {err.strerror or err}") from None
        self.total: int | None = os.fstat(self.fileno()).st_size
        self.etag: str | None = None
        if offset > self.total:
            self.close()
            raise DownloadError(f"{path}: offset {offset} is past the end ({self.total} bytes)")
        self.seek(offset)


class _HttpStream(io.RawIOBase):
    """The body of an http(s) resource from an offset; reconnects where a transfer broke."""

    def __init__(self, url: str, offset: int, headers: dict[str, str], policy: RetryPolicy):
        super().__init__()
        self.url = url
        self.total: int | None = None
        self.etag: str | None = None
        self._headers = headers
        self._policy = policy
        self._pos = offset
        self._validator: str | None = None
        self._response: _Response | None = None
        self._remaining: int | None = None  # bytes the current response still owes
        self._retrier = _Retrier(url, policy)
        self._first = True
        self._reconnect()

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer) -> int:
        """Fill `buffer` as far as the body goes; 0 only at the end of the resource."""
        view = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(view):
            if self._response is None:
                raise ValueError("read from a closed stream")
            try:
                n = self._response.body.readinto(view[filled:])
            except (OSError, http.client.HTTPException) as err:
                self._retry(_read_error(err, self._pos))
                continue
            if n:
                filled += n
                self._pos += n
                if self._remaining is not None:
                    self._remaining -= n
                continue
            if self._remaining or (self.total is not None and self._pos < self.total):
                self._retry(_TransientError(f"body ended at byte {self._pos} of {self.total}"))
                continue
            break  # the end of the resource
        return filled

    def close(self) -> None:
        if self._response is not None:
            self._response.body.close()
            self._response = None
        super().close()

    def _retry(self, err: _TransientError) -> None:
        self._retrier.failed(err)
        self._reconnect()

    def _reconnect(self) -> None:
        if self._response is not None:
            self._response.body.close()
            self._response = None
        while True:
            self._retrier.next_attempt()
            try:
                response = _connect(
                    self.url, self._headers, self._pos, self._validator, self._policy.timeout_s
                )
            except _TransientError as err:
                self._retrier.failed(err)
                continue
            break
        if response.start != self._pos:
            response.body.close()
            why = (
                "ignores Range requests" if self._first else "cannot resume (the file changed, or no ranges)"
            )
            raise DownloadError(f"{self.url}: asked for bytes {self._pos}-, the server {why}")
        if self._first:
            self.total, self.etag, self._validator = response.total, response.etag, response.validator
            self._first = False
        elif response.total is not None and self.total is not None and response.total != self.total:
            response.body.close()
            raise DownloadError(f"{self.url}: the file's size changed from {self.total} to {response.total}")
        if self._pos:
            log.info("%s: reading from byte %d", self.url, self._pos)
        self._response = response
        self._remaining = response.length
