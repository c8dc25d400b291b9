"""One file of a git repository at a pinned commit, fetched without cloning the repository.

Objaverse-XL's GitHub objects are named by a blob URL pinned to a commit. TRELLIS clones
each whole repository and re-zips it per asset; here a shallow, blob-less fetch brings the
commit's trees only, and then just the blobs the asset needs: the file itself and the files
it references (an OBJ's material libraries and their textures, a glTF's buffers and images),
written under the repository's own layout so that the relative references still resolve.

The server must allow partial fetches (`uploadpack.allowFilter`, as GitHub does); one that
does not makes git fall back to a whole fetch of the commit, logged as a warning.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from subprocess import PIPE
from typing import IO

from slatflow.errors import DownloadError

logger = logging.getLogger(__name__)

# A companion list longer than this is a file referencing half its repository (or a
# crafted one): the asset keeps the first ones, the rest are not fetched.
MAX_COMPANIONS = 64

LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/v1"
_LFS_POINTER_MAX_BYTES = 1024  # pointers are ~130 bytes; a larger blob is real content

# Environment variables that would point git at another repository than the temporary one.
_REPO_ENV = (
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_INDEX_FILE",
    "GIT_OBJECT_DIRECTORY",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_COMMON_DIR",
    "GIT_NAMESPACE",
)

# Fetch named blobs into the partial repository, as git's lazy fetch does (no negotiation:
# the server sends just what is named).
_BLOB_FETCH = [
    "-c",
    "fetch.negotiationAlgorithm=noop",
    "fetch",
    "--quiet",
    "--no-tags",
    "--no-write-fetch-head",
]
_BLOB_FETCH += ["--recurse-submodules=no", "--filter=blob:none", "origin"]

_GITHUB_BLOB = re.compile(
    r"^https?://(?:www\.)?github\.com/(?P<org>[^/]+)/(?P<repo>[^/]+)/blob/(?P<commit>[^/]+)/(?P<path>.+)$"
)
_FULL_SHA = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")

# Texture statements of an MTL file are `map_*` plus these older names.
_MTL_MAP_KEYWORDS = frozenset({"bump", "disp", "decal", "refl", "norm"})
# Options that may stand before a texture's file name, with how many values each takes;
# -o, -s and -t take one to three numbers.
_MTL_MAP_OPTIONS = {
    "-blendu": 1,
    "-blendv": 1,
    "-bm": 1,
    "-boost": 1,
    "-cc": 1,
    "-clamp": 1,
    "-imfchan": 1,
    "-mm": 2,
    "-texres": 1,
    "-type": 1,
    "-o": 3,
    "-s": 3,
    "-t": 3,
}


@dataclass(frozen=True)
class GithubFile:
    """A file of a GitHub repository at a commit, as Objaverse-XL names it.

    Args:
        org: the repository's owner.
        repo: the repository's name.
        commit: the full commit sha the file is pinned to.
        path: the file's path inside the repository, posix, %-escapes decoded.
    """

    org: str
    repo: str
    commit: str
    path: str

    @property
    def repo_url(self) -> str:
        return f"https://github.com/{self.org}/{self.repo}.git"


def parse_github_identifier(file_identifier: str) -> GithubFile:
    """Split an Objaverse-XL GitHub identifier into repository, commit and path.

    Args:
        file_identifier: `https://github.com/<org>/<repo>/blob/<commit>/<path/in/repo>`; the
            path may hold spaces or %-escapes.

    Returns:
        The parts, with the path decoded.

    Raises:
        ValueError: not such a URL, a commit that is not a full sha, or a path that
            leaves the repository.
    """
    match = _GITHUB_BLOB.match(file_identifier.strip())
    if match is None:
        raise ValueError(
            f"not a GitHub blob URL (https://github.com/<org>/<repo>/blob/<commit>/<path>): {file_identifier!r}"
        )
    commit = match["commit"].lower()
    if not _FULL_SHA.match(commit):
        raise ValueError(f"GitHub URL not pinned to a full commit sha: {file_identifier!r}")
    path = urllib.parse.unquote(match["path"].split("?", 1)[0].split("#", 1)[0])
    if _unsafe_repo_path(path):
        raise ValueError(f"GitHub URL path leaves the repository: {file_identifier!r}")
    return GithubFile(org=match["org"], repo=match["repo"].removesuffix(".git"), commit=commit, path=path)


def fetch_git_file(
    repo_url: str,
    commit: str,
    path: str,
    dest_root: str | os.PathLike,
    *,
    companions: bool = True,
    timeout_s: float = 600.0,
    git: str = "git",
) -> list[Path]:
    """Fetch one file of a repository at a commit, and the files it references, into `dest_root`.

    A temporary folder beside `dest_root` (same file system) holds a git directory, which
    receives the commit's trees (a shallow, blob-less fetch) and then only the needed blobs,
    and the files as they are written; it is always removed. The files are then renamed to
    `dest_root/<path in the repo>`, the companions first and the main file last, so that the
    main file's presence means its companions are there. A companion that is absolute, leaves
    the repository or is not in the commit is logged and skipped.

    Args:
        repo_url: any URL git fetches from (https, file://, a local path).
        commit: the commit to read, a full sha (a branch or tag name also works).
        path: the file's posix path inside the repository.
        dest_root: the folder standing for the repository's root.
        companions: also fetch what an .obj (mtllib and its texture maps) or a .gltf
            (relative buffer and image URIs) references, at most MAX_COMPANIONS files.
        timeout_s: the time all git commands together may take.
        git: the git executable.

    Returns:
        The written files, the main file first.

    Raises:
        DownloadError: the repository, commit or path does not exist, git failed or timed
            out, or the file is stored with Git LFS and git-lfs could not fetch it.
    """
    where = f"{repo_url} at {commit}: {path}"
    if _unsafe_repo_path(path):
        raise DownloadError(f"{where}: not a relative path inside the repository")
    path = posixpath.normpath(path)
    dest_root = Path(dest_root)
    dest_root.mkdir(parents=True, exist_ok=True)
    # Beside dest_root, so that it shares its file system and its clean-up stays local.
    with tempfile.TemporaryDirectory(
        prefix=".git-fetch-", dir=dest_root.parent, ignore_cleanup_errors=True
    ) as tmp:
        repo = _PartialRepo(git, Path(tmp), repo_url, time.monotonic() + timeout_s, timeout_s, where)
        repo.fetch_trees(commit)
        tree = repo.list_files()
        if path not in tree:
            raise DownloadError(f"{where}: path not in the commit (or not a regular file)")
        repo.write_blobs({path: tree[path]})
        extra = _fetch_companions(repo, tree, path) if companions else []
        for repo_path in [*extra, path]:
            target = dest_root / repo_path
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(repo.staging / repo_path, target)
    logger.info("fetched %s from %s at %s (%d companions)", path, repo_url, commit, len(extra))
    return [dest_root / repo_path for repo_path in [path, *extra]]


def _unsafe_repo_path(path: str) -> bool:
    """Absolute, empty, Windows-style or leaving the root: never a path to write under a folder."""
    if not path or path.startswith("/") or "\\" in path or re.match(r"^[A-Za-z]:", path) or "\0" in path:
        return True
    normal = posixpath.normpath(path)
    return normal == "." or normal == ".." or normal.startswith("../")


class _PartialRepo:
    """A temporary bare repository with a blob-less promisor remote, driven by git commands."""

    def __init__(self, git: str, tmp: Path, url: str, deadline: float, timeout_s: float, where: str):
        self.git, self.git_dir, self.staging, self.url = git, tmp / "git", tmp / "files", url
        self.deadline, self.timeout_s, self.where = deadline, timeout_s, where
        self.env = {k: v for k, v in os.environ.items() if k not in _REPO_ENV}
        # No prompt, askpass program or credential manager may wait for a person.
        self.env.update(GIT_TERMINAL_PROMPT="0", GIT_ASKPASS="", SSH_ASKPASS="", GCM_INTERACTIVE="never")
        self.env.setdefault("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
        self.commit_ref = "FETCH_HEAD"

    def fetch_trees(self, commit: str) -> None:
        """Init the repository and fetch the commit with its trees and no blobs."""
        self.run(["init", "--bare", "--quiet", "--template=", str(self.git_dir)], git_dir=False)
        self.run(["remote", "add", "origin", self.url])
        # Missing blobs are then fetched from origin on demand, as in a partial clone.
        self.run(["config", "remote.origin.promisor", "true"])
        self.run(["config", "remote.origin.partialclonefilter", "blob:none"])
        self.run(["config", "extensions.partialClone", "origin"])
        self.run(["fetch", "--quiet", "--no-tags", "--depth", "1", "--filter=blob:none", "origin", commit])
        self.commit_ref = self.run(["rev-parse", "--verify", "FETCH_HEAD^{commit}"]).decode().strip()

    def list_files(self) -> dict[str, str]:
        """Every regular file of the commit: repo path -> blob oid (trees are local, no fetch)."""
        listing = self.run(["ls-tree", "-r", "-z", "--full-tree", self.commit_ref])
        files = {}
        for entry in listing.split(b"\0"):
            if not entry:
                continue
            meta, name = entry.split(b"\t", 1)
            mode, kind, oid = meta.split()
            if kind == b"blob" and mode in (b"100644", b"100755"):  # not symlinks, not submodules
                files[os.fsdecode(name)] = oid.decode()
        return files

    def write_blobs(self, blobs: dict[str, str], *, lfs_fatal: bool = True) -> list[str]:
        """Fetch the blobs in one request (as git's own lazy fetch does), then write each to
        staging/<path>.

        Args:
            blobs: repo path -> blob oid.
            lfs_fatal: raise for a Git LFS file git-lfs cannot fetch; else log it and skip it.

        Returns:
            the repo paths written, in the order of `blobs`.
        """
        self.run([*_BLOB_FETCH, *sorted(set(blobs.values()))])
        written = []
        for path, oid in blobs.items():
            file = self.staging / path
            file.parent.mkdir(parents=True, exist_ok=True)
            with open(file, "wb") as out:
                self.run(["cat-file", "blob", oid], stdout=out)
            try:
                if _is_lfs_pointer(file):
                    self._smudge_lfs(path, file)
            except _LfsError as error:
                file.unlink()
                if lfs_fatal:
                    raise DownloadError(str(error)) from None
                logger.warning("%s; skipped", error)
                continue
            written.append(path)
        return written

    def _smudge_lfs(self, path: str, pointer: Path) -> None:
        """Replace an LFS pointer file by its content through git-lfs, or raise saying why not."""
        message = f"{self.url} at {self.commit_ref}: {path}: stored with Git LFS"
        if shutil.which("git-lfs", path=self.env.get("PATH")) is None:
            raise _LfsError(f"{message}, and git-lfs is not installed to fetch its content")
        content = pointer.with_name(pointer.name + ".lfs")
        try:
            with open(pointer, "rb") as src, open(content, "wb") as out:
                self.run(["lfs", "smudge", "--", path], stdin=src, stdout=out)
        except DownloadError as error:
            content.unlink()
            raise _LfsError(f"{message}; git lfs smudge failed: {error}") from None
        content.replace(pointer)

    def run(
        self,
        args: list[str],
        *,
        git_dir: bool = True,
        stdin: IO[bytes] | None = None,
        stdout: IO[bytes] | int = PIPE,
    ) -> bytes:
        """Run one git command within the deadline; its stderr goes to the log.

        Returns:
            its stdout (empty when `stdout` is a file).

        Raises:
            DownloadError: it failed (with git's first fatal/error line) or ran past the deadline.
        """
        what = "git " + next(
            a for i, a in enumerate(args) if not a.startswith("-") and (i == 0 or args[i - 1] != "-c")
        )
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise DownloadError(f"{self.where}: git timed out after {self.timeout_s:g} s in all")
        cmd = [self.git, "-c", "credential.helper=", "-c", "core.askPass="]
        if git_dir:
            cmd += ["--git-dir", str(self.git_dir)]
        cmd += args
        logger.debug("running %s", " ".join(cmd))
        # Own session: no terminal to prompt on, and a timeout kills remote helpers too.
        proc = subprocess.Popen(
            cmd,
            stdin=stdin if stdin is not None else subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.PIPE,
            env=self.env,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=remaining)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise DownloadError(f"{self.where}: {what} timed out after {self.timeout_s:g} s in all") from None
        lines = err.decode(errors="replace").splitlines()
        failed = proc.returncode != 0
        for line in lines:
            # git warns, e.g., when a server ignores the blob filter and sends everything.
            level = logging.WARNING if failed or line.startswith("warning:") else logging.DEBUG
            logger.log(level, "%s: %s", what, line)
        if failed:
            raise DownloadError(f"{self.where}: {what} failed (exit {proc.returncode}): {_cause(lines)}")
        return out or b""


def _cause(stderr_lines: list[str]) -> str:
    """git's first fatal/error line (its later ones are generic advice), else its last line."""
    lines = [line.strip() for line in stderr_lines if line.strip()]
    return next(
        (line for line in lines if line.startswith(("fatal:", "error:"))),
        lines[-1] if lines else "no message",
    )


class _LfsError(Exception):
    """A Git LFS file whose content git-lfs could not fetch (missing or failed)."""


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate()


def _is_lfs_pointer(path: Path) -> bool:
    if path.stat().st_size > _LFS_POINTER_MAX_BYTES:
        return False
    with open(path, "rb") as f:
        return f.read(len(LFS_POINTER_PREFIX)) == LFS_POINTER_PREFIX


def _fetch_companions(repo: _PartialRepo, tree: dict[str, str], main_path: str) -> list[str]:
    """Fetch what the main file references, level by level (obj -> mtl -> textures), one request each.

    Returns:
        The companions' repo paths, written under `repo.staging`.
    """
    seen = {main_path}
    level = [main_path]
    written: list[str] = []
    full = False
    while level and not full:
        wanted: dict[str, str] = {}
        for repo_path in level:
            for alternatives in _references(repo_path, repo.staging / repo_path):
                target = _resolve(alternatives, posixpath.dirname(repo_path), tree, repo_path)
                if target is None or target in seen:
                    continue
                if len(seen) > MAX_COMPANIONS:
                    logger.warning(
                        "%s: more than %d companions; the rest are skipped", main_path, MAX_COMPANIONS
                    )
                    full = True
                    break
                seen.add(target)
                wanted[target] = tree[target]
            if full:
                break
        if not wanted:
            break
        level = repo.write_blobs(wanted, lfs_fatal=False)
        written += level
    return written


def _references(repo_path: str, file: Path) -> Iterator[list[str]]:
    """The files `file` refers to, each as alternative spellings to try in order."""
    reader = _READERS.get(posixpath.splitext(repo_path)[1].lower())
    if reader is not None:
        yield from reader(file)


def _resolve(alternatives: list[str], base_dir: str, tree: dict[str, str], referrer: str) -> str | None:
    """The repo path of the first spelling that is a file of the commit, or None (logged)."""
    reason = "not in the commit"
    for ref in alternatives:
        ref = ref.strip().replace("\\", "/")
        if ref.startswith("/") or re.match(r"^[A-Za-z]:", ref):
            reason = "an absolute path"
            continue
        target = posixpath.normpath(posixpath.join(base_dir, ref))
        if target == ".." or target.startswith("../"):
            reason = "outside the repository"
            continue
        if target in tree:
            return target
    logger.warning("%s refers to %r: %s; skipped", referrer, alternatives[0], reason)
    return None


def _text_lines(file: Path) -> Iterator[str]:
    # surrogateescape keeps non-UTF-8 names byte-exact, as the tree's names are decoded.
    with open(file, encoding="utf-8", errors="surrogateescape") as f:
        yield from f


def _obj_references(file: Path) -> Iterator[list[str]]:
    """`mtllib a.mtl b.mtl`: the whole rest of the line first (names with spaces), then each word."""
    for line in _text_lines(file):
        if line.startswith("mtllib"):
            rest = line[len("mtllib") :].strip()
            if rest and line[len("mtllib")].isspace():
                words = rest.split()
                yield [rest, *words] if len(words) > 1 else [rest]


def _mtl_references(file: Path) -> Iterator[list[str]]:
    """Texture statements (`map_Kd -bm 1.0 tex.png`): the file name after any options."""
    for line in _text_lines(file):
        words = line.split()
        if not words:
            continue
        keyword = words[0].lower()
        if not (keyword.startswith("map_") or keyword in _MTL_MAP_KEYWORDS):
            continue
        name = _mtl_map_name(words[1:])
        if name:
            yield [name, name.split()[-1]] if " " in name else [name]


def _mtl_map_name(words: list[str]) -> str:
    i = 0
    while i < len(words) and words[i].startswith("-") and not _is_number(words[i]):
        arity = _MTL_MAP_OPTIONS.get(words[i].lower(), 3)
        i += 1
        for _ in range(arity):
            # -o/-s/-t take one to three numbers; the others take exactly `arity` words
            if i < len(words) - 1 and (_is_number(words[i]) or arity < 3):
                i += 1
    return " ".join(words[i:])


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


def _gltf_references(file: Path) -> Iterator[list[str]]:
    """Relative `buffers[].uri` and `images[].uri` of a glTF (embedded data: URIs need nothing)."""
    try:
        doc = json.loads(file.read_bytes())
    except (ValueError, UnicodeDecodeError) as error:
        logger.warning("%s: not valid glTF JSON (%s); no companions fetched", file, error)
        return
    for key in ("buffers", "images"):
        entries = doc.get(key, []) if isinstance(doc, dict) else []
        for entry in entries if isinstance(entries, list) else []:
            uri = entry.get("uri") if isinstance(entry, dict) else None
            if not isinstance(uri, str) or uri.startswith("data:"):
                continue
            if urllib.parse.urlsplit(uri).scheme:
                logger.warning("%s refers to %r: not a relative path; skipped", file, uri)
                continue
            yield [urllib.parse.unquote(uri)]


_READERS: dict[str, Callable[[Path], Iterable[list[str]]]] = {
    ".obj": _obj_references,
    ".mtl": _mtl_references,
    ".gltf": _gltf_references,
}
