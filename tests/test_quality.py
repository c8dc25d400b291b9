"""Tests of slatflow.quality: surface metrics on hand-computable cases, masks, flags, records."""

from __future__ import annotations

import json

import numpy as np
import pytest
from geometry_fixtures import check_asset_quality, cube, make_asset, sphere, write_view

from slatflow import quality
from slatflow.errors import AssetError
from slatflow.quality import QualitySettings, QualityThresholds


@pytest.mark.parametrize("distance", ["surface", "samples"])
@pytest.mark.parametrize("gap", [0.004, 0.05])
def test_concentric_spheres(distance, gap):
    """Every point of one sphere is |r1 - r2| from the other: Chamfer-L1 = gap; F-score is
    1 below the threshold and 0 above it."""
    metrics = quality.surface_metrics(sphere(0.3), sphere(0.3 + gap), num_samples=100_000, distance=distance)
    # the sampled variant adds the sample spacing's offset (about 1e-3 here)
    tolerance = 1e-4 if distance == "surface" else 1.5e-3
    assert metrics.chamfer_l1 == pytest.approx(gap, abs=tolerance)
    assert metrics.fscore == pytest.approx(1.0 if gap < 0.01 else 0.0, abs=1e-3)


def test_shifted_cube_has_the_computed_chamfer():
    """Unit cube vs the same cube shifted by d along x. From one cube to the other: the two
    x faces contribute d and d - 2d^2 + 4d^3/3 (edges of the inner face come closer), the
    four side faces d^2/2 each (a strip of width d); over area 6 and symmetric:
    Chamfer-L1 = d/3 + 2 d^3 / 9."""
    d = 0.03
    metrics = quality.surface_metrics(cube(d), cube(), num_samples=200_000)
    assert metrics.chamfer_l1 == pytest.approx(d / 3 + 2 * d**3 / 9, rel=0.01)
    # within 0.01: the side faces but for the outer 0.02 of their strips, and the rim of
    # the inner x face (the outer x face is d = 0.03 away)
    tau = 0.01
    assert metrics.precision == pytest.approx((4 * (1 - d + tau) + 1 - (1 - 2 * tau) ** 2) / 6, abs=0.003)


def test_identical_meshes_score_perfectly_and_reproducibly():
    mesh = sphere(0.4, subdivisions=3)
    first = quality.surface_metrics(mesh, mesh, num_samples=20_000, rng=np.random.default_rng(5))
    again = quality.surface_metrics(mesh, mesh, num_samples=20_000, rng=np.random.default_rng(5))
    assert first.chamfer_l1 < 1e-7 and first.fscore == 1.0
    assert first == again


def test_render_mask_coverage(tmp_path):
    alpha = np.zeros((20, 20), np.uint8)
    alpha[:10, :] = 255  # half covered
    write_view(tmp_path / "000.png", alpha)
    write_view(tmp_path / "001.png", np.zeros((20, 20), np.uint8))  # empty view
    coverage = quality.render_mask_coverage(tmp_path)
    assert coverage.num_views == 2
    assert coverage.nonempty_fraction == pytest.approx(0.5)
    assert coverage.mean_coverage == pytest.approx(0.25)
    assert quality.render_mask_coverage(tmp_path / "missing").num_views == 0


def test_suspicious_reasons_name_the_value_and_the_limit():
    record = {
        "mesh": {"chamfer_l1": 0.05, "fscore": 0.95},
        "voxels": {"chamfer_l1": 0.005, "fscore": 0.5},
        "masks": {"num_views": 150, "nonempty_fraction": 0.98, "mean_coverage": 0.2},
        "num_voxels": 40000,
    }
    reasons = quality.suspicious_reasons(record, QualityThresholds())
    assert len(reasons) == 4
    assert any("watertight mesh Chamfer-L1 0.05" in r and "limit 0.01" in r for r in reasons)
    assert any("voxel mesh F-score@0.01 0.5" in r for r in reasons)
    assert any("non-empty views 0.98" in r for r in reasons)
    assert any("num_voxels 40000" in r for r in reasons)
    lenient = QualityThresholds(
        max_chamfer_mesh=0.1, min_fscore_voxels=0.1, min_nonempty_views=0.9, max_num_voxels=50000
    )
    assert quality.suspicious_reasons(record, lenient) == []


def test_check_assets_writes_records_and_metadata_columns(tmp_path):
    import pandas as pd

    good, bad, missing = "a" * 64, "b" * 64, "c" * 64
    make_asset(tmp_path, good, cube(side=0.6))
    make_asset(tmp_path, bad, cube(side=0.6), shifted_voxels=True)
    settings = QualitySettings(num_samples=20_000)
    check_asset_quality(tmp_path, good, settings)
    check_asset_quality(tmp_path, bad, settings)
    with pytest.raises(AssetError) as caught:
        check_asset_quality(tmp_path, missing, settings)
    assert missing in str(caught.value) and "does not exist" in str(caught.value)

    record = json.loads((tmp_path / "quality" / f"{good}.json").read_text())
    assert record["mesh"]["chamfer_l1"] < 0.005 and record["mesh"]["fscore"] > 0.99
    assert record["voxels"]["chamfer_l1"] < 0.01 and record["voxels"]["fscore"] > 0.9
    assert record["masks"] == {"num_views": 1, "nonempty_fraction": 1.0, "mean_coverage": 0.25}
    assert record["suspicious"] == [] and record["num_voxels"] > 1000
    assert set(record["seconds"]) == {"mesh", "voxel_mesh", "voxels", "masks"}

    shifted = json.loads((tmp_path / "quality" / f"{bad}.json").read_text())
    assert shifted["voxels"]["chamfer_l1"] > 0.01
    assert any("voxel mesh" in reason for reason in shifted["suspicious"])

    columns = quality.quality_columns(tmp_path, pd.Index([good, bad, missing], name="sha256"))
    assert columns.loc[good, "suspicious"] == "" and columns.loc[missing, "suspicious"] == ""
    assert "voxel mesh" in columns.loc[bad, "suspicious"]
    assert columns.loc[good, "mesh_fscore"] > 0.99 and np.isnan(columns.loc[missing, "mesh_fscore"])
    assert quality.quality_columns(tmp_path / "elsewhere", columns.index).shape == (3, 0)


def test_thresholds_from_config_ignore_nothing_silently():
    settings = QualitySettings.from_config({"num_samples": 1000, "thresholds": {"max_chamfer_mesh": 0.5}})
    assert settings.num_samples == 1000 and settings.thresholds.max_chamfer_mesh == 0.5
    assert settings.thresholds.min_fscore_mesh == QualityThresholds().min_fscore_mesh
