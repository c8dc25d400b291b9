"""Failure records and the job glue that writes them."""

from __future__ import annotations

import errno
import json
import os
import time
from types import SimpleNamespace

import pytest

from slatflow.errors import AssetError, TransientError
from slatflow.quarantine import failure_path, load_failures, quarantined_sha256s, record_failure
from slatflow.workflow import run_asset_job

SHA = "c" * 64


def fake_job(tmp_path):
    """The attributes of a Snakemake `script:` job object that run_asset_job reads."""
    return SimpleNamespace(
        wildcards=SimpleNamespace(sha256=SHA),
        log=[str(tmp_path / "logs" / "job.log")],
        config={"output_dir": str(tmp_path)},
    )


def test_a_failing_job_records_the_reason_and_exits_nonzero(tmp_path, capsys):
    def process():
        raise AssetError(SHA, "no mesh objects after import")

    with pytest.raises(SystemExit) as exit_info:
        run_asset_job(fake_job(tmp_path), "render", process)
    assert exit_info.value.code == 1
    record = json.loads(failure_path(tmp_path, "render", SHA).read_text())
    assert record["reason"] == "no mesh objects after import"
    assert record["log"].endswith("job.log")
    assert "no mesh objects" in (tmp_path / "logs" / "job.log").read_text()
    assert SHA in capsys.readouterr().err


def test_unexpected_exceptions_are_quarantined_with_their_type(tmp_path):
    with pytest.raises(SystemExit):
        run_asset_job(fake_job(tmp_path), "voxelize", lambda: [][1])
    assert load_failures(tmp_path)[0].reason.startswith("IndexError:")


def test_a_success_clears_a_stale_record(tmp_path):
    record_failure(tmp_path, "render", SHA, "old\nmultiline reason")
    assert load_failures(tmp_path)[0].reason == "old multiline reason"
    run_asset_job(fake_job(tmp_path), "render", lambda: None)
    assert quarantined_sha256s(tmp_path) == set()


def test_failure_summary_counts_by_stage(tmp_path):
    from slatflow.quarantine import failure_summary

    assert "no asset is quarantined" in failure_summary(tmp_path)
    record_failure(tmp_path, "render", SHA, "timeout")
    record_failure(tmp_path, "render", "d" * 64, "corrupt")
    assert "2 asset(s) quarantined (render: 2)" in failure_summary(tmp_path)


def test_a_config_error_stops_the_job_without_quarantining_the_asset(tmp_path):
    from slatflow.errors import ConfigError

    def process():
        raise ConfigError("render.device 'CUDA': no CUDA device is available")

    with pytest.raises(SystemExit) as exit_info:
        run_asset_job(fake_job(tmp_path), "render", process)
    assert exit_info.value.code == 2
    assert quarantined_sha256s(tmp_path) == set()
    assert "no CUDA device" in (tmp_path / "logs" / "job.log").read_text()


def test_a_failed_asset_prints_one_line_and_keeps_the_traceback_in_its_log(tmp_path, capsys):
    def process():
        raise AssetError(SHA, "no mesh objects after import")

    with pytest.raises(SystemExit):
        run_asset_job(fake_job(tmp_path), "render", process)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.strip()] == [
        f"slatflow: asset {SHA} failed in render: no mesh objects after import (log: {tmp_path / 'logs' / 'job.log'})"
    ]
    assert "Traceback (most recent call last)" in (tmp_path / "logs" / "job.log").read_text()


def _disk_full():
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/out/voxels/x.ply")


def _asset_error_while_disk_full():
    try:
        _disk_full()
    except OSError as exc:
        raise AssetError(SHA, f"cannot write the voxels: {exc.strerror}") from None


def _cuda_oom():
    class OutOfMemoryError(RuntimeError):  # torch.cuda.OutOfMemoryError's name, without torch
        pass

    raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.parametrize(
    "fault, cause",
    [
        (_disk_full, "No space left on device (ENOSPC)"),
        (_asset_error_while_disk_full, "No space left on device (ENOSPC)"),
        (lambda: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error")), "Input/output error (EIO)"),
        (lambda: (_ for _ in ()).throw(MemoryError()), "out of memory (MemoryError)"),
        (_cuda_oom, "CUDA out of memory"),
        (lambda: (_ for _ in ()).throw(AssetError(SHA, "RuntimeError: CUDA error: illegal address (in the model worker)")), "CUDA error"),
        (lambda: (_ for _ in ()).throw(TransientError("the model worker died while processing it")), "the model worker died"),
    ],
)
def test_a_failure_that_is_not_the_assets_is_not_quarantined(tmp_path, capsys, fault, cause):
    from slatflow.quarantine import failure_summary, transient_path

    started = time.time() - 1
    with pytest.raises(SystemExit) as exit_info:
        run_asset_job(fake_job(tmp_path), "voxelize", fault)
    assert exit_info.value.code == 1, "the job fails, so the run does not count the asset done"
    assert quarantined_sha256s(tmp_path) == set(), "the next run retries it"
    err = capsys.readouterr().err
    assert cause in err and "not quarantined, the next run retries it" in err
    assert transient_path(tmp_path, "voxelize", SHA).is_file()
    summary = failure_summary(tmp_path, since=started)
    assert "1 asset(s) failed for a reason that is not the asset's (voxelize: 1" in summary
    assert "quarantined (" not in summary
    run_asset_job(fake_job(tmp_path), "voxelize", lambda: None)  # the retry succeeds
    assert not transient_path(tmp_path, "voxelize", SHA).exists()
    assert "no asset is quarantined" in failure_summary(tmp_path, since=started)


def test_the_summary_tells_quarantined_from_transient_and_leaves_out_older_runs(tmp_path):
    from slatflow.quarantine import failure_summary, transient_path

    record_failure(tmp_path, "render", SHA, "no mesh objects")
    record_failure(tmp_path, "features", "d" * 64, "No space left on device", transient=True)
    summary = failure_summary(tmp_path, since=time.time() - 60).splitlines()
    assert summary[0].startswith("slatflow: 1 asset(s) quarantined (render: 1)")
    assert summary[1].startswith("slatflow: 1 asset(s) failed for a reason that is not the asset's (features: 1;")
    assert summary[2] == f"slatflow: asset {SHA} failed in render: no mesh objects (log: )", "this run's, each"
    os.utime(transient_path(tmp_path, "features", "d" * 64), (0, 0))  # from an earlier run
    assert not any("not the asset's" in line for line in failure_summary(tmp_path, since=time.time() - 60).splitlines())
    os.utime(failure_path(tmp_path, "render", SHA), (0, 0))
    summary = failure_summary(tmp_path, since=time.time() - 60).splitlines()
    assert summary == [summary[0]], "an earlier run's quarantine is counted, not listed"


def test_the_summary_lists_at_most_a_screenful_of_this_runs_quarantines(tmp_path):
    from slatflow.quarantine import SUMMARY_LINES, failure_summary

    for n in range(SUMMARY_LINES + 5):
        record_failure(tmp_path, "voxelize", f"{n:064x}", f"bad mesh {n}")
    summary = failure_summary(tmp_path, since=time.time() - 60).splitlines()
    assert len(summary) == 1 + SUMMARY_LINES + 1
    assert summary[-1] == "slatflow: ... and 5 more quarantined in this run (metadata.csv)"
    assert all("failed in voxelize: bad mesh" in line for line in summary[1:-1])


@pytest.mark.parametrize(
    "fault",
    [
        lambda: (_ for _ in ()).throw(AssetError(SHA, "2 vertices are not finite")),
        lambda: (_ for _ in ()).throw(OSError(errno.ENOENT, "No such file or directory")),
        lambda: (_ for _ in ()).throw(ValueError("truncated PLY")),
    ],
)
def test_an_assets_own_fault_is_still_quarantined(tmp_path, fault):
    with pytest.raises(SystemExit):
        run_asset_job(fake_job(tmp_path), "voxelize", fault)
    assert quarantined_sha256s(tmp_path) == {SHA}
