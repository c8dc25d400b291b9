"""The raster render engine (slatflow.raster), on the CPU through Mesa's llvmpipe."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from render_fixtures import (
    SAMPLE_ASSETS,
    SAMPLE_FILES,
    alpha_geometry_agreement,
    blender_env,
    fast_settings,
    sha256_of,
)
from slatflow import raster
from slatflow.cameras import camera_position, look_at_c2w
from slatflow.errors import AssetError
from slatflow.render import RenderAsset, RenderSettings, render_views, trellis_views

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def _glb(path: Path, mesh) -> Path:
    mesh.export(path)
    return path


def test_png_encoder_round_trips_through_pillow():
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (37, 53, 4), dtype=np.uint8)
    pixels[:10] = 0  # a flat region, as a render's background
    decoded = Image.open(io.BytesIO(raster.encode_png_rgba(pixels)))
    assert decoded.mode == "RGBA" and decoded.size == (53, 37)
    assert np.array_equal(np.asarray(decoded), pixels)


def test_top_light_table_is_the_square_lights_irradiance():
    table = raster.top_light_irradiance_table()
    # straight up, a 25 m square 10 m overhead subtends most of the sky: E/pi close to, but
    # below, the radiance of a full upper hemisphere; facing down, it sees none of it
    assert 0.6 * raster.TOP_LIGHT_RADIANCE < table[-1] < raster.TOP_LIGHT_RADIANCE
    assert table[0] == 0.0
    assert np.all(np.diff(table) >= 0)


def test_settings_the_raster_engine_cannot_draw_are_config_errors():
    from slatflow.errors import ConfigError

    with pytest.raises(ConfigError, match="Filmic or Standard"):
        RenderSettings(engine="RASTER", view_transform="AgX")
    assert RenderSettings(engine="RASTER").output_settings()["raster_samples"] == 4
    assert "raster_samples" not in RenderSettings().output_settings()  # Cycles' renders stay valid


def test_bad_scenes_are_asset_errors(tmp_path):
    import trimesh

    box = trimesh.creation.box()
    box.vertices[3] = np.nan
    nan_glb = _glb(tmp_path / "nan.glb", box)
    with pytest.raises(AssetError, match="1 vertices are not finite"):
        raster.load_scene("a" * 64, nan_glb)
    corrupt = tmp_path / "corrupt.glb"
    corrupt.write_bytes(b"glTF" + bytes(range(256)) * 4)
    with pytest.raises(AssetError, match="does not load"):
        raster.load_scene("b" * 64, corrupt)
    points = tmp_path / "points.glb"
    trimesh.Scene([trimesh.PointCloud(np.random.default_rng(0).random((10, 3)))]).export(points)
    with pytest.raises(AssetError, match="no triangles"):
        raster.load_scene("c" * 64, points)


@pytest.fixture(scope="module")
def rasterizer():
    engine = raster.Rasterizer()
    yield engine
    engine.close()


def test_straight_alpha_transparent_background_and_antialiased_edges(rasterizer, tmp_path):
    import trimesh
    from PIL import Image

    glb = _glb(tmp_path / "ball.glb", trimesh.creation.icosphere(subdivisions=3, radius=0.4))
    primitives = raster.load_scene("d" * 64, glb)
    c2w = look_at_c2w(camera_position(0.3, 0.2, 2.0))
    rasterizer.render("d" * 64, primitives, [{"camera_to_world": c2w, "fov": math.radians(40)}], 64, tmp_path / "out")
    image = np.asarray(Image.open(tmp_path / "out" / "000.png"))
    assert image.shape == (64, 64, 4) and image.dtype == np.uint8
    alpha = image[..., 3]
    assert np.all(image[0, 0] == 0) and np.all(image[:, 0] == 0)  # transparent background
    assert alpha[32, 32] == 255
    edge = (alpha > 0) & (alpha < 255)
    assert edge.sum() > 20  # MSAA's partial coverage at the silhouette
    # straight alpha: an edge pixel keeps the surface's colour instead of fading to black
    inside_grey = image[(alpha == 255)][:, :3].astype(float).mean()
    edge_grey = image[edge & (alpha < 128)][:, :3].astype(float).mean()
    assert edge_grey > 0.5 * inside_grey


def test_context_lives_across_assets_and_a_bad_one_does_not_break_it(rasterizer, tmp_path):
    import trimesh

    good = _glb(tmp_path / "box.glb", trimesh.creation.box(extents=(0.8, 0.5, 0.3)))
    bad = tmp_path / "bad.glb"
    bad.write_bytes(b"not a glb")
    view = {"camera_to_world": look_at_c2w(camera_position(1.0, 0.5, 2.0)), "fov": math.radians(40)}
    request = {"sha256": "e" * 64, "scene": str(good), "views": [view], "resolution": 32}
    first = raster.render_scene(rasterizer, {**request, "output_dir": str(tmp_path / "first")})
    with pytest.raises(AssetError):
        raster.render_scene(rasterizer, {**request, "scene": str(bad), "output_dir": str(tmp_path / "bad")})
    second = raster.render_scene(rasterizer, {**request, "output_dir": str(tmp_path / "second")})
    assert first["device"] == second["device"]
    assert (tmp_path / "first" / "000.png").read_bytes() == (tmp_path / "second" / "000.png").read_bytes()


@pytest.mark.blender
def test_filmic_table_is_blenders(tmp_path):
    fresh = tmp_path / "filmic.png"
    subprocess.run([sys.executable, "-m", "slatflow.raster", "--write-filmic-lut", str(fresh)], check=True,
                   cwd=REPO, capture_output=True, timeout=120, env=blender_env(tmp_path))
    assert np.array_equal(raster.read_filmic_lut(fresh), raster.read_filmic_lut())
    lut = raster.read_filmic_lut()
    middle = round((math.log2(1.0) - raster.FILMIC_LOG2_MIN) / (raster.FILMIC_LOG2_MAX - raster.FILMIC_LOG2_MIN) * 32)
    assert np.all(np.abs(lut[middle, middle, middle].astype(int) - 128) <= 1)  # Filmic maps 0.18 to ~0.5


@pytest.mark.blender
def test_raster_render_has_the_cycles_paths_form(tmp_path):
    source = SAMPLE_ASSETS / SAMPLE_FILES["obj"]
    asset = RenderAsset(sha256_of(source), source)
    settings = fast_settings(engine="RASTER")
    [result] = render_views([asset], tmp_path / "renders", settings)
    assert result.error is None, result.error
    out = result.out_dir
    transforms = json.loads((out / "transforms.json").read_text())
    assert transforms["renderer"]["engine"] == "RASTER"
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i:03d}.png" for i in range(settings.num_views)]
    assert (out / "mesh.ply").is_file()
    views, extra = trellis_views(asset.sha256, settings.num_views, settings.radius, settings.fov)
    assert transforms["camera_offset"] == extra["camera_offset"]
    for frame, view in zip(transforms["frames"], views):
        assert np.allclose(frame["transform_matrix"], look_at_c2w(camera_position(view.yaw, view.pitch, view.radius)))
        assert frame["camera_angle_x"] == pytest.approx(settings.fov)
    agreement = alpha_geometry_agreement(out)  # the masks sit on mesh.ply's projection
    on_alpha = sum(a.on_alpha * a.in_image for a in agreement) / sum(a.in_image for a in agreement)
    # below Cycles' 0.99: a silhouette corner that clips a pixel's corner misses all 4 MSAA
    # sample points, where Cycles' box filter integrates the whole pixel (seen: 2-3 of 130)
    assert on_alpha >= 0.97, agreement
    assert all(a.bbox_error_px <= 2 for a in agreement), agreement


@pytest.mark.blender
@pytest.mark.parametrize("fmt", ["glb", "obj", "gltf"])
def test_raster_images_approximate_cycles(tmp_path, fmt):
    """Against Cycles at TRELLIS's settings on the same cameras (small images: the full
    comparison is bench/bench_render_fidelity.py)."""
    from bench_render_fidelity import compare, read_rgba

    source = SAMPLE_ASSETS / SAMPLE_FILES[fmt]
    asset = RenderAsset(sha256_of(source), source)
    images = {}
    for engine in ("CYCLES", "RASTER"):
        settings = RenderSettings(num_views=1, resolution=128, engine=engine, threads=2, timeout_s=600)
        [result] = render_views([asset], tmp_path / engine, settings)
        assert result.error is None, result.error
        images[engine] = read_rgba(result.out_dir / "000.png")
    figures = compare(images["CYCLES"], images["RASTER"])
    assert figures["mask_iou"] >= 0.98, figures
    assert figures["psnr_db"] >= 24.0, figures
    assert figures["ssim"] >= 0.93, figures


@pytest.mark.blender
def test_features_run_unchanged_on_raster_renders(small_assets, tmp_path):
    """The workflow with `engine: RASTER`: the raster rules, one raster worker for every job,
    and voxels and features on its renders exactly as on Cycles'."""
    import pandas as pd

    from conftest import run_workflow

    out = tmp_path / "out"
    config = {
        "output_dir": str(out),
        "source": {"type": "local", "path": str(small_assets["box.obj"].parent)},
        "render": {"engine": "RASTER", "num_views": 4, "resolution": 64, "threads": 1},
        "features": {"model": "dinov2_vits14_reg", "weights": "random", "image_size": 112, "batch_size": 4,
                     "threads": 1},
    }
    result = run_workflow(config, ["features"], config_dir=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "render_views_raster" in result.stdout + result.stderr
    metadata = pd.read_csv(out / "metadata.csv")
    assert len(metadata) == len(small_assets)
    assert metadata["rendered"].all() and metadata["voxelized"].all()
    assert metadata["feature_dinov2_vits14_reg_112px_random"].all()
    for sha in metadata["sha256"]:
        transforms = json.loads((out / "renders" / sha / "transforms.json").read_text())
        assert transforms["renderer"]["engine"] == "RASTER"
        features = np.load(out / "features" / "dinov2_vits14_reg_112px_random" / f"{sha}.npz")
        assert features["patchtokens"].dtype == np.float16 and len(features["indices"]) > 0
    raster_logs = list((out / "logs" / "workers").glob("raster-*.log"))
    assert len(raster_logs) == 1  # one worker drew every asset
    assert raster_logs[0].read_text().count("views rasterized") == len(small_assets)
