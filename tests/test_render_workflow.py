"""The render rules in the real workflow: bad assets are quarantined, the others finish."""

from __future__ import annotations

import hashlib
import json
import stat
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import make_small_assets, run_workflow

# light settings: the point is the workflow, not the images
TINY_RENDER = {"num_views": 2, "resolution": 32, "samples": 1, "denoise": False, "threads": 1}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _hanging_python(folder: Path) -> Path:
    """Blender's Python, except that it hangs on any asset whose file name says `hang`."""
    path = folder / "python_that_hangs.sh"
    path.write_text(
        "#!/bin/sh\n"
        '# called as: python blender_render.py JOB.json\n'
        f'if grep -q \'"source": "[^"]*hang\' "$2"; then exec sleep 600; fi\n'
        f'exec {sys.executable} "$@"\n'
    )
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


@pytest.mark.blender
def test_corrupt_unsupported_and_hanging_assets_are_quarantined_while_the_others_render(tmp_path):
    assets = make_small_assets(tmp_path / "assets")
    good = [assets["box.obj"], assets["nested/ball.glb"], assets["cone.stl"]]
    corrupt = tmp_path / "assets" / "corrupt.glb"
    corrupt.write_bytes(b"glTF\x02\x00\x00\x00" + bytes(range(256)) * 4)
    unsupported = tmp_path / "assets" / "model.3ds"
    unsupported.write_bytes(b"MM" + bytes(100))
    hanging = tmp_path / "assets" / "hang.stl"
    hanging.write_bytes(assets["cone.stl"].read_bytes() + b"\0")  # a valid STL with other bytes
    files = [*good, corrupt, unsupported, hanging]
    rows = [
        {"sha256": _sha256(p), "file_identifier": p.name, "aesthetic_score": 5.0, "captions": "[]",
         "local_path": str(p)}
        for p in files
    ]
    csv = tmp_path / "assets.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    out = tmp_path / "out"
    config = {
        "output_dir": str(out),
        "source": {"type": "csv", "path": str(csv)},
        "render": {**TINY_RENDER, "timeout_s": 40, "python": str(_hanging_python(tmp_path))},
    }
    result = run_workflow(config, ["renders"], "--cores", "2", config_dir=tmp_path, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode != 0, "failed jobs make the run fail (after the others finished)"

    for path in good:
        render_dir = out / "renders" / _sha256(path)
        assert (render_dir / "transforms.json").is_file(), output
        assert sorted(p.name for p in render_dir.iterdir()) == ["000.png", "001.png", "mesh.ply", "transforms.json"]

    def reason(stage: str, path: Path) -> str:
        record = out / "failed" / stage / f"{_sha256(path)}.json"
        assert record.is_file(), f"no {stage} record for {path.name}:\n{output}"
        return json.loads(record.read_text())["reason"]

    assert "could not import corrupt.glb as glb" in reason("render", corrupt)
    assert "unsupported file type '.3ds'" in reason("ingest", unsupported)
    assert "did not finish within the 40 s timeout" in reason("render", hanging)
    for path in (corrupt, hanging):
        assert not (out / "renders" / _sha256(path) / "transforms.json").exists()
    corrupt_log = (out / "logs" / "render_views" / f"{_sha256(corrupt)}.log").read_text()
    assert "Blender 4.5" in corrupt_log and "Error: Bad GLB" in corrupt_log, "Blender's own output is in the log"
    good_log = (out / "logs" / "render_views" / f"{_sha256(good[0])}.log").read_text()
    assert "on CPU (1 threads)" in good_log and "Saved:" in good_log

    # the next run leaves the quarantined assets out and completes
    again = run_workflow(config, ["renders"], "--cores", "2", config_dir=tmp_path, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    table = pd.read_csv(out / "metadata.csv").set_index("sha256")
    assert table.loc[[_sha256(p) for p in good], "rendered"].all()


@pytest.mark.blender
def test_render_cond_target_and_nothing_to_do_after(tmp_path):
    make_small_assets(tmp_path / "assets")
    config = {
        "output_dir": str(tmp_path / "out"),
        "source": {"type": "local", "path": str(tmp_path / "assets")},
        "render": TINY_RENDER,
        "render_cond": {"num_views": 3, "resolution": 32},
    }
    result = run_workflow(config, ["renders_cond"], "--cores", "2", config_dir=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    table = pd.read_csv(tmp_path / "out" / "metadata.csv")
    assert table["cond_rendered"].all() and not table["rendered"].any()
    for sha in table["sha256"]:
        transforms = json.loads((tmp_path / "out" / "renders_cond" / sha / "transforms.json").read_text())
        assert len(transforms["frames"]) == 3 and "cond_seed" in transforms
    again = run_workflow(config, ["renders_cond"], "-n", config_dir=tmp_path)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
