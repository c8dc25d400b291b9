"""Download stage: each TRELLIS-500K asset fetched to `raw/<subset>/<sha256>/`, verified.

One function per way a subset is served (slatflow.trellis500k says which): HTTP from the HF
hub (Sketchfab glbs of allenai/objaverse, the gated HSSD), git at the pinned commit
(Objaverse-XL GitHub), one streaming pass over a remote tar (ABO), members of a zip the
user provides (3D-FUTURE, Toys4k). Every file is checked against the listed sha256 and
appears under its final name only when complete; HTTP and the ABO pass resume after a
kill (slatflow.http_fetch, slatflow.archives).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Sequence

from slatflow.errors import AccessDenied, AssetError, ConfigError, DownloadError, HashMismatch
from slatflow.io import file_lock, sha256_of_file, write_json_atomic
from slatflow.stages import DOWNLOAD
from slatflow.trellis500k import (
    ABO,
    ABO_MEMBER_PREFIX,
    FUTURE,
    FUTURE_KEY_FILE,
    GITHUB,
    HSSD,
    SKETCHFAB,
    TOYS4K,
    TOYS4K_MEMBER_PREFIX,
    AssetSource,
    DownloadSettings,
    asset_file_name,
    asset_sources,
    hf_headers,
    local_path,
)

logger = logging.getLogger(__name__)

STAGE = DOWNLOAD.name
ABO_STAGING = "raw/ABO/.staged"


def retry_policy(settings: DownloadSettings):
    from slatflow.http_fetch import RetryPolicy

    return RetryPolicy(attempts=settings.attempts, backoff_s=settings.backoff_s, timeout_s=settings.timeout_s)


def access_denied_message(exc: AccessDenied, what: str) -> str:
    if what == HSSD:
        return (
            f"{exc}: HSSD is gated; accept its terms at https://huggingface.co/datasets/hssd/hssd-models "
            "with the account whose token is in HF_TOKEN (or `hf auth login`)"
        )
    return f"{exc}: set HF_TOKEN to a token that can read it"


def fetch_file(url: str, dest: str | os.PathLike, settings: DownloadSettings, what: str) -> Path:
    """A file with no listed hash (a subset CSV, object-paths.json.gz), over HTTP."""
    from slatflow.http_fetch import download_file

    try:
        return download_file(url, dest, headers=hf_headers(), policy=retry_policy(settings)).dest
    except AccessDenied as exc:
        raise ConfigError(access_denied_message(exc, what)) from None
    except DownloadError as exc:
        raise ConfigError(f"{what}: {exc}") from None


def verify_sha256(path: Path, expected: str, what: str) -> None:
    actual = sha256_of_file(path)
    if actual != expected:
        raise HashMismatch(f"{what}: sha256 is {actual}, the dataset lists {expected}")


def _fetch_hf(source: AssetSource, dest: Path, settings: DownloadSettings) -> None:
    from slatflow.http_fetch import download_file

    if source.subset == SKETCHFAB:
        url = settings.hf_file_url(settings.objaverse_repo, source.source_ref)
    else:
        url = settings.hf_file_url(settings.hssd_repo, source.file_identifier)
    download_file(url, dest, sha256=source.sha256, headers=hf_headers(), policy=retry_policy(settings))


def _fetch_github(source: AssetSource, dest: Path, settings: DownloadSettings) -> None:
    from slatflow.git_fetch import fetch_git_file, parse_github_identifier

    ref = parse_github_identifier(source.file_identifier)
    repo_url = f"{settings.github_url.rstrip('/')}/{ref.org}/{ref.repo}.git"
    root = dest.parents[len(Path(ref.path).parts) - 1]  # raw/<subset>/<sha256>/
    written = fetch_git_file(
        repo_url, ref.commit, ref.path, root, companions=settings.github_companions, timeout_s=settings.git_timeout_s
    )
    try:
        verify_sha256(written[0], source.sha256, f"{ref.path} of {ref.org}/{ref.repo}@{ref.commit[:12]}")
    except HashMismatch:
        for path in written:
            path.unlink(missing_ok=True)
        raise


def abo_staged_path(out_dir: str | os.PathLike, source: AssetSource) -> Path:
    """Where the ABO archive pass leaves a member until its asset's job verifies it."""
    return Path(out_dir) / ABO_STAGING / source.sha256 / asset_file_name(ABO, source.file_identifier)


def abo_final_path(out_dir: str | os.PathLike, source: AssetSource) -> Path:
    return Path(out_dir) / local_path(ABO, source.sha256, source.file_identifier)


def pending_abo_sources(out_dir: str | os.PathLike, shard: str = "0/1", retry_failed: bool = False) -> list[AssetSource]:
    """The ABO assets of this shard that are neither downloaded nor staged (nor quarantined,
    unless they are being retried): what one archive pass extracts."""
    from slatflow.ingest import in_shard, parse_shard
    from slatflow.quarantine import quarantined_sha256s

    out_dir = Path(out_dir)
    index, count = parse_shard(shard)
    failed = quarantined_sha256s(out_dir, only=["ingest"] if retry_failed else None)
    return [
        source
        for source in asset_sources(out_dir / "manifest.csv").values()
        if source.subset == ABO
        and in_shard(source.sha256, index, count)
        and source.sha256 not in failed
        and not abo_final_path(out_dir, source).is_file()
        and not abo_staged_path(out_dir, source).is_file()
    ]


def _take_abo_member(source: AssetSource, dest: Path, settings: DownloadSettings, out_dir: Path, shard: str, retry_failed: bool) -> None:
    """The asset's member of the ABO tar. The first ABO job of a run streams the archive
    once for every pending ABO asset (the others wait for it, then find theirs staged)."""
    staged = abo_staged_path(out_dir, source)
    member = ABO_MEMBER_PREFIX + source.file_identifier
    record_path = out_dir / f"raw/ABO/archive-pass-{shard.replace('/', 'of')}.json"
    if not staged.is_file():
        with file_lock(out_dir / "raw/ABO/.archive-pass.lock"):  # one stream, not one per job
            record = json.loads(record_path.read_text()) if record_path.is_file() else {}
            known_absent = record.get("archive") == settings.abo_archive and member in record.get("missing", ())
            if not staged.is_file() and not known_absent:
                pending = [s for s in pending_abo_sources(out_dir, shard, retry_failed) if s.sha256 != source.sha256]
                record = run_abo_archive_pass([source, *pending], settings, out_dir, record_path)
        if not staged.is_file():
            if member in record.get("missing", ()):
                raise DownloadError(f"{settings.abo_archive} has no member {member}")
            raise DownloadError(f"the ABO archive pass left no {member} (see {record_path})")
    try:
        verify_sha256(staged, source.sha256, member)
    except HashMismatch:
        staged.unlink()
        raise
    os.replace(staged, dest)
    staged.parent.rmdir()


def _extract_from_zip(source: AssetSource, dest: Path, settings: DownloadSettings, out_dir: Path) -> None:
    """3D-FUTURE: the instance's folder, keyed by its image.jpg; Toys4k: one .blend."""
    from slatflow.archives import extract_zip_members, zip_members_under

    archive = settings.archive_path(source.subset, out_dir)
    staging = dest.parent / ".extracting"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        if source.subset == FUTURE:
            prefix = source.file_identifier.rstrip("/") + "/"
            members = zip_members_under(archive, prefix)
            if not members:
                raise DownloadError(f"{archive} has no folder {prefix}")
            extract_zip_members(archive, members, staging, strip_prefix=prefix)
            key_file = staging / FUTURE_KEY_FILE
            if not key_file.is_file():
                raise DownloadError(f"{archive}: {prefix} has no {FUTURE_KEY_FILE}, which 3D-FUTURE's sha256 is of")
            if not (staging / dest.name).is_file():
                raise DownloadError(f"{archive}: {prefix} has no {dest.name}")
            verify_sha256(key_file, source.sha256, f"{prefix}{FUTURE_KEY_FILE}")
        else:
            member = TOYS4K_MEMBER_PREFIX + source.file_identifier
            extract_zip_members(archive, [member], staging, strip_prefix=str(Path(member).parent) + "/")
            verify_sha256(staging / dest.name, source.sha256, member)
        # companions first, the asset file last: its existence means the folder is complete
        files = sorted((p for p in staging.rglob("*") if p.is_file()), key=lambda p: p.name == dest.name)
        for path in files:
            target = dest.parent / path.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def fetch_asset(
    source: AssetSource,
    dest: str | os.PathLike,
    settings: DownloadSettings,
    out_dir: str | os.PathLike,
    shard: str = "0/1",
    retry_failed: bool = False,
) -> Path:
    """Fetch one asset to `dest` (OUT/<local_path>) with its companions, verified.

    Args:
        shard, retry_failed: the run's; an ABO asset's archive pass takes the run's other
            pending ABO assets along.

    Raises:
        AssetError: this asset cannot be had (404, a wrong hash, not in the archive, ...).
        ConfigError: no asset of its host can be had (a missing token, a gated dataset).
    """
    dest, out_dir = Path(dest), Path(out_dir)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        if source.subset in (SKETCHFAB, HSSD):
            _fetch_hf(source, dest, settings)
        elif source.subset == GITHUB:
            _fetch_github(source, dest, settings)
        elif source.subset == ABO:
            _take_abo_member(source, dest, settings, out_dir, shard, retry_failed)
        elif source.subset in (FUTURE, TOYS4K):
            _extract_from_zip(source, dest, settings, out_dir)
        else:
            raise ConfigError(f"asset {source.sha256}: unknown subset {source.subset!r}")
    except AccessDenied as exc:
        raise ConfigError(access_denied_message(exc, source.subset)) from None
    except (DownloadError, ValueError) as exc:
        raise AssetError(source.sha256, f"{source.subset} {source.file_identifier}: {exc}", STAGE) from None
    logger.info("asset %s: %s %s -> %s (%d bytes)", source.sha256, source.subset, source.file_identifier, dest, dest.stat().st_size)
    return dest


def run_abo_archive_pass(
    sources: Sequence[AssetSource], settings: DownloadSettings, out_dir: str | os.PathLike, record_path: str | os.PathLike
) -> dict:
    """One streaming pass over the ABO tar that stages the members of `sources` not yet
    downloaded; killed, it resumes at the member it was at. Writes its record (members
    extracted and missing) to `record_path`, and returns it."""
    from slatflow.archives import extract_tar_members
    from slatflow.http_fetch import open_stream

    out_dir = Path(out_dir)
    wanted = {}
    for source in sources:
        if not abo_final_path(out_dir, source).is_file():
            wanted[ABO_MEMBER_PREFIX + source.file_identifier] = abo_staged_path(out_dir, source)
    logger.info("ABO: %d of %d assets to take from %s", len(wanted), len(sources), settings.abo_archive)
    record = {"archive": settings.abo_archive, "wanted": len(wanted), "extracted": [], "missing": []}
    if wanted:
        policy = retry_policy(settings)
        result = extract_tar_members(
            lambda offset: open_stream(settings.abo_archive, offset=offset, policy=policy),
            wanted,
            Path(record_path).with_suffix(".state.json"),
            archive_id=settings.abo_archive,
        )
        record.update(
            extracted=sorted(result.extracted),
            missing=sorted(result.missing),
            bytes_read=result.bytes_read,
            resumed_from=result.resumed_from,
            complete=result.complete,
        )
        for member in result.missing:
            logger.error("ABO: %s is not in %s", member, settings.abo_archive)
    write_json_atomic(record_path, record)
    return record
