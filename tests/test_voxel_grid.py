"""One voxel grid: slatflow.grid's formula, the config check of the grids the stages can use,
and the features target end to end at 32^3 and 128^3 (render, voxelize, features)."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, run_workflow
from plyfile import PlyData

from slatflow.config import built_stages, check_voxel_grid
from slatflow.errors import ConfigError
from slatflow.grid import outside_grid, voxel_centres, voxel_indices

SAMPLE_ASSETS = REPO / "sample" / "assets"
CONFIG = {"voxelize": {"resolution": 64}, "meshes": {"sdf": {"enabled": True}}}


@pytest.mark.parametrize("resolution", [8, 32, 64, 128, 256])
def test_indices_of_the_centres_are_the_indices(resolution):
    indices = np.stack(np.meshgrid(*[np.arange(resolution)] * 3, indexing="ij"), -1).reshape(-1, 3)  # (R^3, 3)
    centres = voxel_centres(indices, resolution)  # (R^3, 3) float32
    np.testing.assert_array_equal(voxel_indices(centres, resolution), indices)
    assert not outside_grid(voxel_indices(centres, resolution), resolution).any()


def test_indices_at_64_are_trellis_int_formula():
    rng = np.random.default_rng(0)
    centres = voxel_centres(rng.integers(0, 64, (1000, 3)), 64)
    trellis = ((centres + np.float32(0.5)) * np.float32(64)).astype(np.int64)  # TRELLIS's int()
    np.testing.assert_array_equal(voxel_indices(centres, 64), trellis)


def test_points_off_the_grid_are_outside():
    points = np.array([[-0.5001, 0, 0], [0, 0.5, 0], [0, 0, 0.4999], [-0.5, -0.5, -0.5]], np.float32)
    assert outside_grid(voxel_indices(points, 64), 64).tolist() == [True, True, False, False]


def test_built_stages_follow_the_targets_and_their_upstream():
    assert built_stages(CONFIG, ["features"]) == {"features", "render", "voxelize", "download"}
    assert "slat_latent" in built_stages(CONFIG, []) and "slat_latent" in built_stages(CONFIG, ["all"])
    assert built_stages(CONFIG, ["metadata"]) == {"metadata"}  # builds from the files on disk


@pytest.mark.parametrize("targets", [["voxels"], ["features"], ["meshes", "quality"], ["report"]])
def test_another_grid_is_accepted_for_stages_that_do_not_encode(targets):
    check_voxel_grid({**CONFIG, "voxelize": {"resolution": 128}}, targets)


@pytest.mark.parametrize("targets", [[], ["all"], ["ss_latents"], ["latents"], ["latent_stats"]])
def test_the_latent_encoders_reject_any_grid_but_64_in_one_line(targets):
    with pytest.raises(ConfigError) as caught:
        check_voxel_grid({**CONFIG, "voxelize": {"resolution": 32}}, targets)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("voxelize.resolution: 32, but the ")
    assert "64^3" in message
    check_voxel_grid(CONFIG, targets)  # 64 is TRELLIS's


def test_uint8_indices_reject_a_grid_above_256():
    with pytest.raises(ConfigError, match=r"uint8 \(a grid of at most 256\)"):
        check_voxel_grid({**CONFIG, "voxelize": {"resolution": 512}}, ["features"])
    check_voxel_grid({**CONFIG, "voxelize": {"resolution": 512}}, ["voxels", "meshes"])


def _run_config(out, assets, resolution: int) -> dict:
    """The sample's stages at their lightest: 4 views of 64^2, ViT-S at 112^2 (8 x 8 patches)."""
    return {
        "output_dir": str(out),
        "source": {"type": "local", "path": str(assets)},
        "render": {"num_views": 4, "resolution": 64, "samples": 1, "denoise": False, "threads": 1},
        "voxelize": {"resolution": resolution},
        "features": {"model": "dinov2_vits14_reg", "weights": "random", "image_size": 112, "batch_size": 4,
                     "threads": 1},
    }


@pytest.mark.parametrize("resolution", [32, 128])
def test_features_target_at_another_grid_end_to_end(tmp_path, resolution):
    assets = tmp_path / "assets"
    assets.mkdir()
    for name in ("rock.ply", "torus.glb"):
        shutil.copy(SAMPLE_ASSETS / name, assets / name)
    out = tmp_path / "out"
    config = _run_config(out, assets, resolution)
    result = run_workflow(config, ["features"], config_dir=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    metadata = pd.read_csv(out / "metadata.csv", index_col="sha256")
    feature_name = "dinov2_vits14_reg_112px_random"
    for name in ("rock.ply", "torus.glb"):
        sha = hashlib.sha256((assets / name).read_bytes()).hexdigest()
        ply = PlyData.read(str(out / "voxels" / f"{sha}.ply"))
        centres = np.stack([ply["vertex"][axis] for axis in "xyz"], axis=-1)  # (N, 3) float32
        indices = voxel_indices(centres, resolution)  # (N, 3)
        np.testing.assert_array_equal(voxel_centres(indices, resolution), centres)  # on the R^3 grid
        with np.load(out / "features" / feature_name / f"{sha}.npz") as data:
            assert data["indices"].dtype == np.uint8
            np.testing.assert_array_equal(data["indices"], indices)
            assert len(data["patchtokens"]) == len(centres)
        # the grid's whole range is used: not clipped to 64, not squeezed below it
        assert resolution / 2 < indices.max() < resolution
        assert metadata.at[sha, "num_voxels"] == len(centres) and metadata.at[sha, f"feature_{feature_name}"]

    # the latent encoders cannot read this grid: asking for them stops before any job, one line
    refused = run_workflow(config, ["latents"], "-n", config_dir=tmp_path)
    assert refused.returncode != 0
    assert f"voxelize.resolution: {resolution}, but the " in refused.stderr + refused.stdout
