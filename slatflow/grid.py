"""The voxel grid every stage shares: `voxelize.resolution` voxels per axis over the
normalized [-0.5, 0.5]^3 frame, the centre of voxel i at `(i + 0.5) / R - 0.5` on each axis.

voxelize writes the centres; features, latents, quality and the report turn them back into
indices with `voxel_indices`, the one formula (TRELLIS's). Imports only numpy: every floor
may read it.
"""

from __future__ import annotations

import numpy as np

# TRELLIS's sparse-structure grid: its released encoders (ss_latents, latents) read 64^3.
TRELLIS_RESOLUTION = 64
# The largest grid whose indices fit the contract's uint8 arrays (features' `indices`,
# latents' `coords`): 0..255.
MAX_UINT8_RESOLUTION = 256


def voxel_centres(indices: np.ndarray, resolution: int = TRELLIS_RESOLUTION) -> np.ndarray:
    """Voxel indices -> float32 (N, 3) centres `(i + 0.5) / resolution - 0.5`.

    Args:
        indices: integer (N, 3) in [0, resolution).
    """
    return ((np.asarray(indices, dtype=np.float64) + 0.5) / resolution - 0.5).astype(np.float32)


def voxel_indices(centres: np.ndarray, resolution: int = TRELLIS_RESOLUTION) -> np.ndarray:
    """Voxel centres -> int64 (N, 3) indices `floor((p + 0.5) * resolution)` in float32 math,
    as TRELLIS computes them (`int()` there: the same for every point inside the grid).

    Args:
        centres: float (N, 3) in the normalized frame. A point outside [-0.5, 0.5)^3 gives
            an index outside [0, resolution), for the caller to reject (see `outside_grid`).
    """
    scaled = (np.asarray(centres, dtype=np.float32) + np.float32(0.5)) * np.float32(resolution)  # (N, 3)
    return np.floor(scaled).astype(np.int64)


def outside_grid(indices: np.ndarray, resolution: int) -> np.ndarray:
    """bool (N,): rows of integer (N, 3) `indices` with a coordinate outside [0, resolution)."""
    return ((indices < 0) | (indices >= resolution)).any(axis=1)
