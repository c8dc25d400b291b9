"""Download stage: slatflow's fetches against TRELLIS's, side by side on the same local fixtures.

GitHub (ObjaverseXL_github): slatflow fetches one commit blob-less and then only the asset's
file and its companions; TRELLIS (through objaverse-xl) shallow-clones the repository,
fetches and checks out the pinned commit, zips the whole checkout, and unzips the whole zip
again for every asset it processes. ABO: slatflow streams the tar once and stops after the
last wanted member; TRELLIS downloads the whole archive, then extracts the members.

The repositories and archives are local (file:// and disk), so the figures are bytes moved
and local seconds; over a network the bytes dominate.

    .venv/bin/python bench/bench_downloads.py [--repo-mb 200] [--archive-mb 400]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slatflow.archives import extract_tar_members  # noqa: E402
from slatflow.git_fetch import fetch_git_file  # noqa: E402
from slatflow.http_fetch import open_stream  # noqa: E402

OBJ = "models/car/car.obj"


def git(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True, timeout=600, env=env)


def make_repo(root: Path, megabytes: int) -> tuple[Path, str]:
    """A bare repository: `megabytes` of unrelated 1 MB blobs, an obj with mtl and texture;
    the pinned commit is not the tip (as in Objaverse-XL, whose commits are old)."""
    work = root / "work"
    (work / "models/car").mkdir(parents=True)
    (work / "assets").mkdir()
    for i in range(megabytes):
        (work / "assets" / f"blob{i:04d}.bin").write_bytes(os.urandom(1 << 20))
    (work / OBJ).write_text("mtllib car.mtl\nv 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    (work / "models/car/car.mtl").write_text("newmtl m\nmap_Kd paint.png\n")
    (work / "models/car/paint.png").write_bytes(os.urandom(4096))
    ident = ["-c", "user.name=b", "-c", "user.email=b@b"]
    git("init", "-q", "-b", "main", cwd=work)
    git(*ident, "add", ".", cwd=work)
    git(*ident, "commit", "-q", "-m", "pinned", cwd=work)
    commit = git("rev-parse", "HEAD", cwd=work).stdout.strip()
    (work / "README").write_text("later\n")
    git(*ident, "add", ".", cwd=work)
    git(*ident, "commit", "-q", "-m", "later", cwd=work)
    bare = root / "repo.git"
    git("clone", "-q", "--bare", str(work), str(bare), cwd=root)
    git("config", "uploadpack.allowFilter", "true", cwd=bare)
    git("config", "uploadpack.allowAnySHA1InWant", "true", cwd=bare)
    shutil.rmtree(work)
    return bare, commit


def pack_bytes(trace: Path) -> int:
    """Bytes of pack data git received, from its GIT_TRACE_PACKFILE dump."""
    return trace.stat().st_size if trace.exists() else 0


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def slatflow_github(repo: Path, commit: str, work: Path) -> tuple[float, int]:
    trace = work / "packs"
    os.environ["GIT_TRACE_PACKFILE"] = str(trace)
    start = time.perf_counter()
    try:
        fetch_git_file(f"file://{repo}", commit, OBJ, work / "out")
    finally:
        del os.environ["GIT_TRACE_PACKFILE"]
    return time.perf_counter() - start, pack_bytes(trace)


def trellis_github(repo: Path, commit: str, work: Path) -> tuple[float, int]:
    """objaverse-xl's clone, fetch and checkout, TRELLIS's zip, then one asset's unzip."""
    trace = work / "packs"
    env = dict(os.environ, GIT_TRACE_PACKFILE=str(trace))
    start = time.perf_counter()
    checkout = work / "repo"
    git("clone", "-q", "--depth", "1", f"file://{repo}", str(checkout), cwd=work, env=env)
    git("fetch", "-q", "origin", commit, cwd=checkout, env=env)
    git("reset", "-q", "--hard", cwd=checkout)
    git("checkout", "-q", commit, cwd=checkout)
    shutil.rmtree(checkout / ".git")
    archive = work / "repo.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in checkout.rglob("*"):
            zf.write(path, path.relative_to(checkout))
    shutil.rmtree(checkout)
    with tempfile.TemporaryDirectory(dir=work) as tmp:  # foreach_instance: the whole zip per asset
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
        assert (Path(tmp) / OBJ).is_file()
    return time.perf_counter() - start, pack_bytes(trace)


def make_archive(path: Path, megabytes: int) -> dict[str, str]:
    """An ABO-like tar of 1 MB members; three wanted ones at 10%, 30% and 50% of it."""
    wanted = {}
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for i in range(megabytes):
            name = f"3dmodels/original/{i % 10}/B{i:06d}.glb"
            info = tarfile.TarInfo(name)
            info.size = 1 << 20
            tar.addfile(info, io.BytesIO(os.urandom(info.size)))
            if i in (megabytes // 10, megabytes * 3 // 10, megabytes // 2):
                wanted[name] = f"B{i:06d}.glb"
    return wanted


def slatflow_abo(archive: Path, wanted: dict[str, str], work: Path) -> tuple[float, int]:
    start = time.perf_counter()
    result = extract_tar_members(lambda offset: open_stream(str(archive), offset=offset), {m: work / n for m, n in wanted.items()}, work / "state.json")
    assert not result.missing
    return time.perf_counter() - start, result.bytes_read


def trellis_abo(archive: Path, wanted: dict[str, str], work: Path) -> tuple[float, int]:
    """wget of the whole archive (a local copy here), then tar.extract of each member."""
    start = time.perf_counter()
    copy = work / "abo-3dmodels.tar"
    shutil.copyfile(archive, copy)
    with tarfile.open(copy) as tar:
        for member in wanted:
            tar.extract(member, work / "raw", filter="data")
    return time.perf_counter() - start, copy.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo-mb", type=int, default=200, help="size of the unrelated files in the repository")
    parser.add_argument("--archive-mb", type=int, default=400, help="size of the tar archive")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_downloads") as tmp:
        root = Path(tmp)
        repo, commit = make_repo(root / "git", args.repo_mb)
        rows = []
        for name, run in (("slatflow", slatflow_github), ("TRELLIS", trellis_github)):
            work = root / f"github-{name}"
            work.mkdir()
            rows.append(("GitHub", name, *run(repo, commit, work)))
            shutil.rmtree(work)
        archive = root / "abo.tar"
        wanted = make_archive(archive, args.archive_mb)
        for name, run in (("slatflow", slatflow_abo), ("TRELLIS", trellis_abo)):
            work = root / f"abo-{name}"
            work.mkdir()
            with contextlib.suppress(FileNotFoundError):
                rows.append(("ABO", name, *run(archive, wanted, work)))
            shutil.rmtree(work)
    print(f"GitHub: repo of {args.repo_mb} MB, one obj + mtl + texture; ABO: {args.archive_mb} MB tar, 3 members wanted")
    print(f"{'subset':8} {'method':9} {'seconds':>8} {'MB moved':>9}")
    for subset, method, seconds, moved in rows:
        print(f"{subset:8} {method:9} {seconds:8.2f} {moved / 1e6:9.2f}")
    for subset in ("GitHub", "ABO"):
        ours, theirs = (r for r in rows if r[0] == subset)
        print(f"{subset}: slatflow/TRELLIS time {ours[2] / theirs[2]:.3f}, bytes {ours[3] / max(theirs[3], 1):.2g}")


if __name__ == "__main__":
    main()
