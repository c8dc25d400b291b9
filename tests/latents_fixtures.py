"""Fixtures of the latent stage's tests and benchmark: surface-like voxel sets, tiny encoders.

Only numpy at import time: the GPU test and the benchmark import this on the GPU machine.
"""

from __future__ import annotations

import numpy as np

# Small architectures of the two encoders for fast CPU tests. The SLat width 64 is not a
# multiple of 6, so the position embedding's zero padding is exercised (3 x 2 x 10 = 60 < 64).
TINY_SS_ARGS = {"channels": [8, 16, 32], "num_res_blocks": 1, "num_res_blocks_middle": 1}
TINY_SLAT_ARGS = {
    "resolution": 64,
    "in_channels": 32,
    "model_channels": 64,
    "num_blocks": 4,
    "num_heads": 4,
    "window_size": 8,
}


# Voxels a gyroid surface crosses, per period across the grid, per grid side squared
# (measured: 19.9k voxels for one period across 64^3, 1.26k across 16^3).
GYROID_VOXELS_PER_PERIOD = 4.86


def surface_voxels(num_voxels: int, resolution: int = 64, seed: int = 0) -> np.ndarray:
    """A surface-like voxel set: the `num_voxels` voxels closest to a gyroid surface.

    The gyroid fills a cube of side `side` (at most the grid) with at least one period, and
    its period is chosen so that its surface crosses about `num_voxels` voxels: the set is a
    thin shell (about 4 of 6 face neighbours occupied, as on a modelled asset's surface) that
    fills 8^3 attention windows with ~70 voxels, whatever its size.

    Returns:
        uint8 (num_voxels, 3) distinct voxel indices in [0, resolution), shuffled.
    """
    rng = np.random.default_rng(seed)
    side = min(resolution, int(np.ceil(np.sqrt(num_voxels / GYROID_VOXELS_PER_PERIOD))) + 1)
    periods = max(1.0, num_voxels / (GYROID_VOXELS_PER_PERIOD * side**2))
    axis = (np.arange(side) + 0.5) / side * 2 * np.pi * periods
    phase = rng.uniform(0, 2 * np.pi, size=3)
    x, y, z = np.meshgrid(axis + phase[0], axis + phase[1], axis + phase[2], indexing="ij")
    field = np.abs(np.sin(x) * np.cos(y) + np.sin(y) * np.cos(z) + np.sin(z) * np.cos(x))  # (S, S, S)
    nearest = np.argpartition(field.reshape(-1), num_voxels - 1)[:num_voxels]  # (N,)
    indices = np.stack(np.unravel_index(nearest, field.shape), axis=1)  # (N, 3) in the cube
    indices += rng.integers(0, resolution - side + 1, size=3)  # place the cube in the grid
    return indices[rng.permutation(num_voxels)].astype(np.uint8)


def voxel_centres(indices: np.ndarray, resolution: int = 64) -> np.ndarray:
    """float32 (N, 3) voxel centres `(i + 0.5) / resolution - 0.5` (the voxels/<sha>.ply frame)."""
    return ((indices.astype(np.float32) + 0.5) / resolution - 0.5).astype(np.float32)


def random_patchtokens(num_voxels: int, channels: int, seed: int = 0) -> np.ndarray:
    """float16 (N, C) features with DINOv2-like scale (unit variance)."""
    return np.random.default_rng(seed).standard_normal((num_voxels, channels)).astype(np.float16)
