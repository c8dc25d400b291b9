"""Camera math against the contract's formulas, written out independently here."""

from __future__ import annotations

import math

import numpy as np
import pytest

from slatflow.cameras import (
    camera_offset,
    camera_position,
    look_at_c2w,
    project_points,
    sphere_hammersley_sequence,
    view_angles,
)


def contract_sequence(n: int, num: int, offset: tuple[float, float]) -> tuple[float, float]:
    # radical inverse in base 2 by bit reversal, as the contract's hammersley(2, n, N)
    bits = bin(n)[2:][::-1]
    v = sum(int(b) / 2 ** (i + 1) for i, b in enumerate(bits))
    u = n / num + offset[0] / num
    v = v + offset[1]
    u = 2 * u if u < 0.25 else 2 / 3 * u + 1 / 3
    return 2 * math.pi * v, math.acos(1 - 2 * u) - math.pi / 2


@pytest.mark.parametrize("num", [1, 24, 150])
def test_sequence_matches_the_contract(num):
    offset = camera_offset("ab" * 32)
    for n in range(num):
        assert sphere_hammersley_sequence(n, num, offset) == pytest.approx(contract_sequence(n, num, offset), abs=1e-12)


def test_about_three_quarters_of_views_look_from_above():
    pitches = view_angles(150, (0.3, 0.7))[:, 1]
    assert 0.70 < np.mean(pitches > 0) < 0.80


def test_offset_is_derived_from_the_key():
    a, b = camera_offset("0" * 8 + "f" * 8 + "0" * 48), camera_offset("1" * 64)
    assert a == (0.0, (2**32 - 1) / 2**32)
    assert a != b and all(0 <= x < 1 for x in a + b)


def test_look_at_points_the_camera_minus_z_at_the_origin_with_z_up():
    pos = camera_position(0.7, 0.3, 2.0)
    assert np.linalg.norm(pos) == pytest.approx(2.0)
    c2w = look_at_c2w(pos)
    assert np.allclose(c2w[:3, :3] @ c2w[:3, :3].T, np.eye(3))
    assert np.allclose(-c2w[:3, 2], -pos / 2.0), "the camera looks along its -Z"
    assert c2w[2, 1] > 0, "image up leans towards world +Z"
    assert abs(c2w[2, 0]) < 1e-12, "no roll: image right is horizontal"


def test_projection_centre_and_frustum_edge():
    fov = math.radians(40)
    c2w = look_at_c2w(camera_position(0.0, 0.0, 2.0))  # at +X, looking at the origin
    uv, depth = project_points(np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 2 * math.tan(fov / 2)]]), c2w, fov)
    assert uv[0] == pytest.approx([0.5, 0.5]) and depth[0] == pytest.approx(2.0)
    assert uv[1] == pytest.approx([0.5, 0.0], abs=1e-12), "world +Z at the frustum edge is the top row (v = 0)"
    uv, _ = project_points(np.array([[0.0, 0.5, 0.0]]), c2w, fov)
    assert uv[0, 0] > 0.5, "camera at +X looking at the origin sees +Y on its right"
