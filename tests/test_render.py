"""The render stage: cameras, settings, the Blender subprocess, and real renders of every format.

Tests without bpy use a stand-in executable for Blender's Python (render.python) to check the
subprocess handling (timeout, crash, missing outputs); the others run bpy 4.5 at light
settings and check the images against the geometry through the contract's camera math.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from render_fixtures import (
    EXTRA_FORMATS,
    SAMPLE_ASSETS,
    SAMPLE_FILES,
    alpha_geometry_agreement,
    fast_settings,
    make_extra_format_assets,
    read_alpha,
    sha256_of,
)
from slatflow.cameras import camera_offset, camera_position, look_at_c2w
from slatflow.errors import AssetError, ConfigError, raise_first_failure
from slatflow.io import read_ply_points
from slatflow.render import (
    SUPPORTED_FORMATS,
    CondSettings,
    RenderAsset,
    RenderSettings,
    asset_format,
    cond_views,
    render_cond_views,
    render_views,
    trellis_views,
)

SHA_A = "3f" * 32
SHA_B = "a1b2c3d4e5f60718" * 4


# ---------------------------------------------------------------------------------------------
# Cameras and settings (no Blender)


def _contract_yaw_pitch(n: int, num: int, offset: tuple[float, float]) -> tuple[float, float]:
    """The contract's formula, written out here: u, v = hammersley(2, n, N) ..."""
    v, base, k = 0.0, 0.5, n
    while k:
        v += (k & 1) * base
        k >>= 1
        base /= 2
    u = n / num + offset[0] / num
    v += offset[1]
    u = 2 * u if u < 0.25 else 2 / 3 * u + 1 / 3
    return 2 * math.pi * v, math.acos(1 - 2 * u) - math.pi / 2


@pytest.mark.parametrize("num_views", [8, 150])
def test_views_follow_the_hammersley_formula_with_the_assets_offset(num_views):
    views, extra = trellis_views(SHA_A, num_views, 2.0, math.radians(40))
    offset = camera_offset(SHA_A)
    assert extra == {"camera_offset": list(offset)}
    assert len(views) == num_views
    for n, view in enumerate(views):
        assert (view.yaw, view.pitch) == pytest.approx(_contract_yaw_pitch(n, num_views, offset), abs=1e-12)
        assert view.radius == 2.0 and view.fov == pytest.approx(math.radians(40))


def test_views_are_reproducible_per_asset_and_differ_between_assets():
    first, _ = trellis_views(SHA_A, 24, 2.0, 0.7)
    again, _ = trellis_views(SHA_A, 24, 2.0, 0.7)
    other, _ = trellis_views(SHA_B, 24, 2.0, 0.7)
    assert first == again
    assert first != other


def test_cond_views_draw_radius_and_fov_jointly_from_the_sha256():
    cond = CondSettings()
    views, extra = cond_views(SHA_A, cond)
    again, _ = cond_views(SHA_A, cond)
    other, _ = cond_views(SHA_B, cond)
    assert views == again and views != other
    assert len(views) == 24 and extra["cond_seed"] == int(SHA_A[16:32], 16)
    radii = np.array([v.radius for v in views])
    fovs = np.array([v.fov for v in views])
    # the unit cube's bounding sphere exactly fills the field of view
    assert np.allclose(np.sin(fovs / 2) * radii, math.sqrt(3) / 2)
    assert np.all((fovs >= math.radians(10) - 1e-9) & (fovs <= math.radians(70) + 1e-9))
    assert radii.min() >= 1.51 and radii.max() <= 9.95
    assert len(set(np.round(radii, 6))) == 24, "one draw per view"
    offset = camera_offset(SHA_A)
    for n, view in enumerate(views):
        assert (view.yaw, view.pitch) == pytest.approx(_contract_yaw_pitch(n, 24, offset), abs=1e-12)


def test_default_settings_are_trellis():
    s = RenderSettings()
    assert (s.num_views, s.resolution, s.radius, s.fov_degrees) == (150, 512, 2.0, 40.0)
    assert (s.engine, s.samples, s.denoise, s.denoiser, s.filter_width) == (
        "CYCLES", 128, True, "OPENIMAGEDENOISE", 1.0)
    assert (s.diffuse_bounces, s.glossy_bounces, s.transparent_bounces, s.transmission_bounces) == (1, 1, 3, 3)
    assert s.view_transform == "Filmic"
    c = CondSettings()
    assert (c.num_views, c.resolution, c.fov_min_degrees, c.fov_max_degrees) == (24, 1024, 10.0, 70.0)


def test_settings_reject_unknown_keys_and_bad_values():
    with pytest.raises(ConfigError, match="unknown render setting.*'sampels'"):
        RenderSettings.from_config({"sampels": 4})
    with pytest.raises(ConfigError, match="device 'METAL'"):
        RenderSettings.from_config({"device": "METAL"})
    with pytest.raises(ConfigError, match="fov_degrees"):
        RenderSettings(fov_degrees=180)
    with pytest.raises(ConfigError, match="render_cond FOV range"):
        CondSettings(fov_min_degrees=80, fov_max_degrees=70)
    assert RenderSettings.from_config({"samples": 4}, threads=3).threads == 3


def test_supported_formats_are_the_ones_ingest_collects():
    from slatflow.ingest import ASSET_EXTENSIONS

    assert {f".{ext}" for ext in SUPPORTED_FORMATS} == set(ASSET_EXTENSIONS)


def test_an_unsupported_extension_is_an_asset_error_naming_it(tmp_path):
    source = tmp_path / "model.3ds"
    source.write_bytes(b"\0" * 64)
    with pytest.raises(AssetError, match=r"unsupported file extension '\.3ds' of model\.3ds"):
        asset_format(SHA_A, source)
    [result] = render_views([RenderAsset(SHA_A, source)], tmp_path / "renders", fast_settings())
    assert result.error is not None and result.error.stage == "render"
    assert "unsupported file extension" in result.error.reason
    assert not (tmp_path / "renders" / SHA_A).exists()
    assert asset_format(SHA_A, tmp_path / "x.USDZ") == "usdz"


def test_a_missing_source_file_is_an_asset_error(tmp_path):
    [result] = render_views([RenderAsset(SHA_A, tmp_path / "gone.glb")], tmp_path / "renders", fast_settings())
    assert "does not exist" in result.error.reason


# ---------------------------------------------------------------------------------------------
# The subprocess: a stand-in for Blender's Python (render.python)


def _stand_in(tmp_path: Path, body: str) -> str:
    """An executable called as `python blender_render.py job.json`, doing `body` instead."""
    path = tmp_path / "fake_python.sh"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def _asset(tmp_path: Path) -> RenderAsset:
    source = tmp_path / "thing.glb"
    source.write_bytes(b"glTF")
    return RenderAsset(SHA_A, source)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie has exited
        return f.read().split(")")[-1].split()[0] != "Z"


def test_a_timeout_kills_the_whole_process_group_and_quarantines_the_asset(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    python = _stand_in(tmp_path, f"echo SLATFLOW_PHASE import\nsleep 300 &\necho $! > {pid_file}\nsleep 300")
    started = time.monotonic()
    [result] = render_views([_asset(tmp_path)], tmp_path / "renders", fast_settings(python=python, timeout_s=2))
    assert time.monotonic() - started < 30
    assert "did not finish within the 2 s timeout" in result.error.reason
    assert "killed during import" in result.error.reason
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild), "a process Blender started outlived the timeout"
    assert not (tmp_path / "renders" / SHA_A).exists()
    assert not list((tmp_path / "renders").glob(".*staging*")), "the staging folder was left behind"


def test_a_crash_names_the_signal_and_the_phase(tmp_path, caplog):
    python = _stand_in(tmp_path, "echo SLATFLOW_PHASE render view 7\necho 'Error: EXCEPTION_ACCESS_VIOLATION'\nkill -SEGV $$")
    with caplog.at_level(logging.INFO):
        [result] = render_views([_asset(tmp_path)], tmp_path / "renders", fast_settings(python=python))
    assert "Blender crashed with SIGSEGV during render view 7" in result.error.reason
    assert "EXCEPTION_ACCESS_VIOLATION" in result.error.reason
    assert "EXCEPTION_ACCESS_VIOLATION" in caplog.text, "Blender's output goes to the log"


def test_a_clean_exit_without_outputs_is_not_a_render(tmp_path):
    python = _stand_in(tmp_path, "exit 0")
    [result] = render_views([_asset(tmp_path)], tmp_path / "renders", fast_settings(python=python))
    assert "did not write" in result.error.reason and "000.png" in result.error.reason
    with pytest.raises(AssetError):
        raise_first_failure([result])


_WRITE_OUTPUTS = """
import json, os, sys
import trimesh
from PIL import Image
job = json.load(open(sys.argv[2]))
out = job["output_dir"]
os.makedirs(out, exist_ok=True)
for i in range(len(job["views"])):
    Image.new("RGBA", (job["resolution"],) * 2).save(os.path.join(out, f"{i:03d}.png"))
trimesh.creation.box().export(os.path.join(out, "mesh.ply"))
json.dump({"frames": [{}] * len(job["views"])}, open(os.path.join(out, "transforms.json"), "w"))
DAMAGE = None
if DAMAGE:
    name, keep = DAMAGE
    path = os.path.join(out, name)
    open(path, "r+b").truncate(keep)
"""


@pytest.mark.parametrize("damage", [("001.png", 60), ("mesh.ply", 200), ("transforms.json", 5)])
def test_a_render_that_does_not_load_is_never_moved_into_place(tmp_path, damage):
    (tmp_path / "writer.py").write_text(_WRITE_OUTPUTS.replace("DAMAGE = None", f"DAMAGE = {damage!r}"))
    python = _stand_in(tmp_path, f'exec {sys.executable} {tmp_path / "writer.py"} "$@"')
    [result] = render_views([_asset(tmp_path)], tmp_path / "renders", fast_settings(python=python, num_views=2))
    assert result.error is not None and damage[0] in result.error.reason, result.error
    assert list((tmp_path / "renders").iterdir()) == [], "nothing under the final name, no staging left"


def test_a_new_render_replaces_a_stale_one_whole(tmp_path):
    (tmp_path / "writer.py").write_text(_WRITE_OUTPUTS)
    python = _stand_in(tmp_path, f'exec {sys.executable} {tmp_path / "writer.py"} "$@"')
    stale = tmp_path / "renders" / SHA_A
    stale.mkdir(parents=True)
    for name in ("000.png", "149.png", "transforms.json"):
        (stale / name).write_text("stale")
    [result] = render_views([_asset(tmp_path)], tmp_path / "renders", fast_settings(python=python, num_views=2))
    assert result.error is None
    assert sorted(p.name for p in stale.iterdir()) == ["000.png", "001.png", "mesh.ply", "transforms.json"]
    assert (stale / "000.png").read_bytes() != b"stale"
    assert [p.name for p in (tmp_path / "renders").iterdir()] == [SHA_A], "no staging or old folder left"


def test_a_crash_after_writing_everything_leaves_no_render(tmp_path):
    (tmp_path / "writer.py").write_text(_WRITE_OUTPUTS)
    python = _stand_in(tmp_path, f'{sys.executable} {tmp_path / "writer.py"} "$@"\nkill -KILL $$')
    [result] = render_views([_asset(tmp_path)], tmp_path / "renders", fast_settings(python=python, num_views=2))
    assert "Blender crashed with SIGKILL" in result.error.reason
    assert list((tmp_path / "renders").iterdir()) == []


_DRIVER = """
import sys
from pathlib import Path
from slatflow.render import RenderAsset, render_views
sys.path.insert(0, {tests!r})
from render_fixtures import fast_settings
render_views([RenderAsset({sha!r}, Path({source!r}))], {out!r}, fast_settings(python={python!r}, timeout_s=600))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_blender_dies_with_the_job_that_started_it(tmp_path, sig):
    """Snakemake cancelling a job (SIGTERM), or the job being killed outright, ends Blender too."""
    pid_file = tmp_path / "blender.pid"
    python = _stand_in(tmp_path, f"echo $$ > {pid_file}\nexec sleep 300")
    asset = _asset(tmp_path)
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER.format(tests=str(Path(__file__).parent), sha=SHA_A, source=str(asset.source),
                                     out=str(tmp_path / "renders"), python=python))
    job = subprocess.Popen([sys.executable, str(driver)], cwd=Path(__file__).parents[1])
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.is_file() and pid_file.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.1)
        blender = int(pid_file.read_text())
        job.send_signal(sig)
        job.wait(timeout=30)
        deadline = time.monotonic() + 15
        while _alive(blender) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(blender), f"Blender outlived its job killed by {sig.name}"
    finally:
        job.kill()
        if pid_file.is_file() and pid_file.read_text().strip():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)  # leave nothing behind if it failed


def test_a_python_that_cannot_start_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot start the Blender Python"):
        render_views([_asset(tmp_path)], tmp_path / "renders", fast_settings(python=str(tmp_path / "nope")))


# ---------------------------------------------------------------------------------------------
# Real renders (bpy)

FORMAT_SETTINGS = dict(num_views=4, resolution=96, samples=64)


@pytest.fixture(scope="module")
def format_assets(tmp_path_factory) -> dict[str, Path]:
    """One file per supported format: the bundled sample plus bpy-exported usda/usdc/abc/dae."""
    folder = tmp_path_factory.mktemp("extra_formats")
    assets = {fmt: SAMPLE_ASSETS / name for fmt, name in SAMPLE_FILES.items()}
    missing = [str(p) for p in assets.values() if not p.is_file()]
    assert not missing, f"the bundled sample is incomplete: {missing}"
    assets.update(make_extra_format_assets(folder))
    return assets


@pytest.fixture(scope="module")
def format_renders(format_assets, tmp_path_factory) -> dict[str, Path]:
    """Every format rendered in one batch (one Blender process per asset)."""
    out = tmp_path_factory.mktemp("renders")
    fmts = sorted(format_assets)
    assets = [RenderAsset(sha256_of(format_assets[f]), format_assets[f]) for f in fmts]
    results = render_views(assets, out, fast_settings(**FORMAT_SETTINGS))
    return {f: r for f, r in zip(fmts, results)}


@pytest.mark.blender
@pytest.mark.parametrize("fmt", sorted(set(SAMPLE_FILES) | set(EXTRA_FORMATS)))
def test_alpha_masks_agree_with_the_mesh_through_the_cameras(fmt, format_renders):
    result = format_renders[fmt]
    assert result.error is None, result.error
    render_dir = result.out_dir
    transforms = json.loads((render_dir / "transforms.json").read_text())
    assert transforms["aabb"] == [[-0.5, -0.5, -0.5], [0.5, 0.5, 0.5]]
    assert [f["file_path"] for f in transforms["frames"]] == ["000.png", "001.png", "002.png", "003.png"]
    vertices = read_ply_points(render_dir / "mesh.ply")
    # TRELLIS's box is the AABB of each object's local box corners in world space, looser than
    # the geometry's own AABB when an object is rotated (the abc monkey): inside, not touching
    assert np.all(np.abs(vertices) <= 0.5 + 1e-4), "normalized into [-0.5, 0.5]^3"
    assert (vertices.max(axis=0) - vertices.min(axis=0)).max() > 0.75
    for frame in transforms["frames"]:
        assert read_alpha(render_dir / frame["file_path"]).shape == (96, 96)
    agreement = alpha_geometry_agreement(render_dir, vertices)
    on_alpha = sum(a.on_alpha * a.in_image for a in agreement) / sum(a.in_image for a in agreement)
    assert on_alpha >= 0.99, f"{fmt}: only {on_alpha:.3%} of projected vertices on alpha > 0: {agreement}"
    assert all(a.bbox_error_px <= 2 for a in agreement), f"{fmt}: mask and projection boxes differ: {agreement}"


@pytest.mark.blender
def test_normalization_is_recorded_and_hidden_blend_objects_are_dropped(format_renders, format_assets):
    glb = json.loads((format_renders["glb"].out_dir / "transforms.json").read_text())
    # the sample's torus: 30 units across, built in Blender at (40, -25, 12), stored Y-up in
    # the glb; the importer brings it back to Blender's Z-up frame
    assert 1 / 40 < glb["scale"] < 1 / 30  # TRELLIS's box of the tilted torus is looser than 30
    centre = -np.array(glb["offset"]) / glb["scale"]
    assert centre == pytest.approx([40, -25, 12], abs=0.5)
    blend = json.loads((format_renders["blend"].out_dir / "transforms.json").read_text())
    assert blend["scale"] > 0.1, "the .blend's hidden 400-unit plane and 300-unit cube were kept"


@pytest.mark.blender
def test_cameras_are_blenders_track_to_and_the_hammersley_sequence(format_renders):
    result = format_renders["obj"]
    transforms = json.loads((result.out_dir / "transforms.json").read_text())
    views, extra = trellis_views(result.sha256, 4, 2.0, math.radians(40))
    assert transforms["camera_offset"] == extra["camera_offset"]
    for view, frame in zip(views, transforms["frames"]):
        assert frame["camera_angle_x"] == pytest.approx(math.radians(40))
        expected = look_at_c2w(camera_position(view.yaw, view.pitch, view.radius))
        assert np.allclose(frame["transform_matrix"], expected, atol=1e-5)


@pytest.mark.blender
def test_a_view_straight_from_below_matches_blender(tmp_path, format_assets):
    """sha256 00000000... has offset 0: view 0 looks straight up from under the asset."""
    sha = "0" * 64
    [result] = render_views([RenderAsset(sha, format_assets["stl"])], tmp_path,
                            fast_settings(num_views=2, resolution=32, samples=1))
    assert result.error is None, result.error
    frame = json.loads((result.out_dir / "transforms.json").read_text())["frames"][0]
    view = trellis_views(sha, 2, 2.0, math.radians(40))[0][0]
    assert view.pitch == pytest.approx(-math.pi / 2)
    assert np.allclose(frame["transform_matrix"], look_at_c2w(camera_position(view.yaw, view.pitch, 2.0)),
                       atol=1e-5)


@pytest.mark.blender
def test_two_renders_of_one_asset_are_identical(tmp_path, format_assets):
    asset = RenderAsset(sha256_of(format_assets["glb"]), format_assets["glb"])
    settings = fast_settings(num_views=3, resolution=64, samples=16, denoise=True, adaptive_threshold=0.01)
    first, second = (render_views([asset], tmp_path / name, settings)[0] for name in ("a", "b"))
    assert first.error is None and second.error is None
    names = sorted(p.name for p in first.out_dir.iterdir())
    assert names == ["000.png", "001.png", "002.png", "mesh.ply", "transforms.json"]
    assert names == sorted(p.name for p in second.out_dir.iterdir())
    for name in names:
        assert (first.out_dir / name).read_bytes() == (second.out_dir / name).read_bytes(), name


@pytest.mark.blender
def test_bad_assets_fail_alone_with_clear_reasons(tmp_path, format_assets, caplog):
    rng = np.random.default_rng(0)
    corrupt_glb = tmp_path / "corrupt.glb"
    corrupt_glb.write_bytes(b"glTF" + rng.bytes(2000))
    corrupt_blend = tmp_path / "corrupt.blend"
    corrupt_blend.write_bytes(rng.bytes(2000))
    points = tmp_path / "points.ply"
    points.write_bytes(b"ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\n"
                       b"property float z\nend_header\n0 0 0\n1 0 0\n0 1 0\n")
    good = format_assets["stl"]
    assets = [RenderAsset(sha256_of(p), p) for p in (corrupt_glb, corrupt_blend, points, good)]
    with caplog.at_level(logging.INFO):
        results = render_views(assets, tmp_path / "renders", fast_settings(num_views=2, resolution=32, samples=1))
    glb, blend, ply, ok = results
    assert "could not import corrupt.glb as glb" in glb.error.reason
    assert "could not open corrupt.blend" in blend.error.reason
    assert "no faces" in ply.error.reason and "3 vertices" in ply.error.reason
    assert ok.error is None and (ok.out_dir / "transforms.json").is_file()
    for failed in (glb, blend, ply):
        assert "\n" not in failed.error.reason and failed.error.sha256 in str(failed.error)
        assert not failed.out_dir.exists()
    assert "Blender 4.5" in caplog.text and "rendering 2 views at 32^2 with CYCLES on CPU" in caplog.text


@pytest.mark.blender
def test_a_gpu_that_is_absent_is_an_error_not_a_cpu_render(tmp_path, format_assets):
    asset = RenderAsset(sha256_of(format_assets["stl"]), format_assets["stl"])
    with pytest.raises(ConfigError, match="device CUDA was asked for but Cycles found no CUDA device"):
        render_views([asset], tmp_path, fast_settings(device="CUDA", num_views=1, resolution=16, samples=1))
    assert not (tmp_path / asset.sha256).exists()


@pytest.mark.blender
def test_a_real_blender_past_its_timeout_is_killed(tmp_path, format_assets):
    asset = RenderAsset(sha256_of(format_assets["obj"]), format_assets["obj"])
    started = time.monotonic()
    [result] = render_views([asset], tmp_path, fast_settings(num_views=150, timeout_s=1))
    assert time.monotonic() - started < 20
    assert "did not finish within the 1 s timeout" in result.error.reason
    assert not (tmp_path / asset.sha256).exists() and not list(tmp_path.glob(".*"))


@pytest.mark.blender
def test_conditioning_views(tmp_path, format_renders, format_assets):
    views_render = format_renders["fbx"]
    asset = RenderAsset(views_render.sha256, format_assets["fbx"])
    cond = CondSettings(num_views=3, resolution=96)
    [result] = render_cond_views([asset], tmp_path / "renders_cond", fast_settings(samples=64), cond)
    assert result.error is None, result.error
    assert sorted(p.name for p in result.out_dir.iterdir()) == ["000.png", "001.png", "002.png", "transforms.json"]
    transforms = json.loads((result.out_dir / "transforms.json").read_text())
    views_transforms = json.loads((views_render.out_dir / "transforms.json").read_text())
    assert transforms["scale"] == views_transforms["scale"] and transforms["offset"] == views_transforms["offset"]
    views, extra = cond_views(asset.sha256, cond)
    assert transforms["cond_seed"] == extra["cond_seed"]
    for view, frame in zip(views, transforms["frames"]):
        assert frame["camera_angle_x"] == pytest.approx(view.fov)
        assert np.linalg.norm(np.array(frame["transform_matrix"])[:3, 3]) == pytest.approx(view.radius, rel=1e-5)
    # same normalized frame as the main render: its mesh.ply lands on the masks too
    agreement = alpha_geometry_agreement(result.out_dir, read_ply_points(views_render.out_dir / "mesh.ply"))
    assert all(a.bbox_error_px <= 2 for a in agreement), agreement


@pytest.mark.blender
@pytest.mark.slow
def test_eevee_renders_headless(tmp_path, format_assets):
    """EEVEE through EGL (Mesa llvmpipe here): about a minute for one tiny view on 2 cores."""
    asset = RenderAsset(sha256_of(format_assets["stl"]), format_assets["stl"])
    [result] = render_views([asset], tmp_path, fast_settings(engine="BLENDER_EEVEE_NEXT", num_views=1,
                                                             resolution=48, samples=4, timeout_s=600))
    assert result.error is None, result.error
    assert result.device.startswith("EEVEE on ")
    [agreement] = alpha_geometry_agreement(result.out_dir)
    assert agreement.on_alpha >= 0.95 and agreement.bbox_error_px <= 2


def _nonfinite_assets(folder: Path) -> dict[str, Path]:
    """A triangle pair with one NaN and one infinite vertex, in each format the check reads."""
    import trimesh

    folder.mkdir(parents=True, exist_ok=True)
    mesh = trimesh.Trimesh(
        vertices=[[0, 0, 0], [1, 0, 0], [0.5, 1, 0], [0, 0, 1]], faces=[[0, 1, 2], [0, 1, 3]], process=False
    )
    paths = {"obj": folder / "nan.obj"}
    paths["obj"].write_text("v 0 0 0\nv 1 0 0\nv nan 1 0\nv 0 0 inf\nf 1 2 3\nf 1 2 4\n")
    for fmt in ("ply", "stl", "glb"):
        data = bytearray(mesh.export(file_type=fmt))
        # the binary float32 0.5 of vertex 2 becomes NaN (in the glb's buffer, not its JSON bounds)
        half = struct.pack("<f", 0.5)
        at = data.index(half, 84 if fmt == "stl" else 0)
        data[at : at + 4] = struct.pack("<f", float("nan"))
        paths[fmt] = folder / f"nan.{fmt}"
        paths[fmt].write_bytes(bytes(data))
    return paths


@pytest.mark.blender
def test_vertices_that_are_not_finite_quarantine_the_asset(tmp_path):
    """Blender's importers would turn them into 0: the source is checked before the import."""
    assets = _nonfinite_assets(tmp_path / "src")
    results = render_views(
        [RenderAsset(sha256_of(p), p) for p in assets.values()], tmp_path / "renders", fast_settings()
    )
    for fmt, result in zip(assets, results):
        assert result.error is not None, fmt
        assert "vertices are not finite (NaN or infinite coordinates)" in result.error.reason, (fmt, result.error)
    assert not [p for p in (tmp_path / "renders").iterdir() if not p.name.startswith(".")]
