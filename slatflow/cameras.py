"""Camera sequences and projection in the TRELLIS convention.

Shared by rendering (where the cameras come from), features (projecting voxels into
views) and the tests. The frame is Blender's world frame, Z up; camera-to-world
matrices use OpenGL axes (the camera looks along -Z, +Y up), as in transforms.json.
"""

from __future__ import annotations

import math

import numpy as np

_PRIMES = (2, 3, 5, 7, 11, 13)


def radical_inverse(base: int, n: int) -> float:
    """The van der Corput radical inverse of `n` in `base`."""
    value, inv_base_n = 0.0, 1.0 / base
    while n > 0:
        n, digit = divmod(n, base)
        value += digit * inv_base_n
        inv_base_n /= base
    return value


def hammersley(n: int, num_samples: int) -> tuple[float, float]:
    """The n-th point of the 2D Hammersley set of `num_samples` points."""
    return n / num_samples, radical_inverse(_PRIMES[0], n)


def sphere_hammersley_sequence(
    n: int, num_samples: int, offset: tuple[float, float] = (0.0, 0.0)
) -> tuple[float, float]:
    """Yaw and pitch (radians) of view `n` of `num_samples`, as TRELLIS draws them.

    About 75% of the views look from above the equator (u is stretched below 0.25).

    Returns:
        (yaw, pitch): yaw in [0, 2*pi) up to the offset, pitch in [-pi/2, pi/2].
    """
    u, v = hammersley(n, num_samples)
    u += offset[0] / num_samples
    v += offset[1]
    u = 2 * u if u < 0.25 else 2 / 3 * u + 1 / 3
    pitch = math.acos(1 - 2 * u) - math.pi / 2
    yaw = 2 * math.pi * v
    return yaw, pitch


def camera_offset(sha256: str) -> tuple[float, float]:
    """The per-asset offset of the view sequence, in [0, 1)^2, derived from the sha256.

    TRELLIS draws it with an unseeded np.random.rand(2); deriving it from the key makes
    renders reproducible while keeping the offsets spread uniformly over assets.
    """
    if len(sha256) < 16:
        raise ValueError(f"sha256 {sha256!r} is too short to derive a camera offset")
    return int(sha256[:8], 16) / 2**32, int(sha256[8:16], 16) / 2**32


def view_angles(num_views: int, offset: tuple[float, float]) -> np.ndarray:
    """float64 (V, 2): yaw, pitch of each view of the sequence."""
    return np.array([sphere_hammersley_sequence(i, num_views, offset) for i in range(num_views)])


def camera_position(yaw: float, pitch: float, radius: float) -> np.ndarray:
    """float64 (3,): the camera centre on the sphere of `radius`, world frame."""
    return radius * np.array(
        [math.cos(yaw) * math.cos(pitch), math.sin(yaw) * math.cos(pitch), math.sin(pitch)]
    )


def look_at_c2w(position: np.ndarray, target: np.ndarray | None = None) -> np.ndarray:
    """float64 (4, 4): OpenGL camera-to-world looking from `position` at `target`, world Z up.

    Matches Blender's TRACK_TO constraint (track -Z, up Y) toward the origin, including its
    rule near the poles (`vectomat` in Blender's constraint.cc): image up is world +Z projected
    onto the image plane, normalized however short it is; only an exactly vertical view
    (squared length <= 1e-35) falls back to world +Y as up.
    """
    position = np.asarray(position, dtype=np.float64).reshape(3)
    target = np.zeros(3) if target is None else np.asarray(target, dtype=np.float64).reshape(3)
    back = position - target  # camera +Z points away from what it looks at
    back /= np.linalg.norm(back)
    world_up = np.array([0.0, 0.0, 1.0])
    up = world_up - np.dot(world_up, back) * back  # world up projected onto the image plane
    if np.dot(up, up) <= 1e-35:
        up = np.array([0.0, 1.0, 0.0])
    up /= np.linalg.norm(up)
    right = np.cross(up, back)
    right /= np.linalg.norm(right)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, up, back, position
    return c2w


def extrinsics_from_c2w(c2w: np.ndarray) -> np.ndarray:
    """float64 (..., 4, 4): OpenCV world-to-camera from OpenGL camera-to-world matrices."""
    c2w = np.array(c2w, dtype=np.float64)
    c2w[..., :3, 1:3] *= -1  # OpenGL (-Z forward, +Y up) -> OpenCV (+Z forward, +Y down)
    return np.linalg.inv(c2w)


def intrinsics_from_fov(fov: float) -> np.ndarray:
    """float64 (3, 3): normalized intrinsics (uv in [0, 1]) for a square image of `fov` radians."""
    focal = 0.5 / math.tan(fov / 2)
    return np.array([[focal, 0.0, 0.5], [0.0, focal, 0.5], [0.0, 0.0, 1.0]])


def project_points(points: np.ndarray, c2w: np.ndarray, fov: float) -> tuple[np.ndarray, np.ndarray]:
    """Project world points into one view.

    Args:
        points: float (N, 3), world frame.
        c2w: float (4, 4), OpenGL camera-to-world (transforms.json's `transform_matrix`).
        fov: the view's `camera_angle_x`, radians.

    Returns:
        uv: float64 (N, 2), image coordinates in [0, 1] (u right, v down) for visible points.
        depth: float64 (N,), distance along the optical axis (positive in front).
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    w2c = extrinsics_from_c2w(c2w)
    cam = points @ w2c[:3, :3].T + w2c[:3, 3]  # (N, 3) OpenCV camera frame
    depth = cam[:, 2]
    pix = cam @ intrinsics_from_fov(fov).T  # (N, 3)
    uv = pix[:, :2] / pix[:, 2:3]
    return uv, depth
