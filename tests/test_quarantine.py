"""Failure records and the job glue that writes them."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from slatflow.errors import AssetError
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
