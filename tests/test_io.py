"""Crash-safe writes and the shared PLY format."""

from __future__ import annotations

import os

import numpy as np
import pytest

from slatflow.io import atomic_path, read_ply_points, save_npz_atomic, write_points_ply


def test_a_failed_write_leaves_neither_the_file_nor_a_temporary(tmp_path):
    target = tmp_path / "out" / "x.npz"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("killed")
    assert list((tmp_path / "out").iterdir()) == []


def test_a_write_replaces_the_file_whole(tmp_path):
    target = tmp_path / "x.npz"
    save_npz_atomic(target, a=np.arange(3))
    save_npz_atomic(target, a=np.arange(5))
    assert np.load(target)["a"].tolist() == list(range(5))
    assert [p.name for p in tmp_path.iterdir()] == ["x.npz"]


def test_points_ply_is_vertex_only_binary_float32(tmp_path):
    points = np.random.default_rng(0).random((10, 3)) - 0.5
    write_points_ply(tmp_path / "v.ply", points)
    data = (tmp_path / "v.ply").read_bytes()
    header = data[: data.index(b"end_header")].decode()
    assert "format binary_little_endian 1.0" in header
    assert "element vertex 10" in header and "element face" not in header
    assert header.count("property float") == 3
    assert np.array_equal(read_ply_points(tmp_path / "v.ply"), points.astype(np.float32))


def test_outputs_get_the_umask_mode_not_mkstemps_0600(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        import importlib

        import slatflow.io

        importlib.reload(slatflow.io)
        slatflow.io.save_npz_atomic(tmp_path / "x.npz", a=np.zeros(1))
    finally:
        os.umask(old)
        importlib.reload(slatflow.io)
    assert (tmp_path / "x.npz").stat().st_mode & 0o777 == 0o644


def _truncating(write):
    """A writer that writes, then loses the second half of the file (a short write)."""

    def truncated(path, *args, **kwargs):
        write(path, *args, **kwargs)
        path = str(path) if not hasattr(path, "write") else path
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.truncate(size // 2)

    return truncated


def test_an_npz_that_does_not_read_back_is_never_renamed_into_place(tmp_path, monkeypatch):
    from slatflow.errors import transient_cause
    from slatflow.io import OutputCheckError

    monkeypatch.setattr(np, "savez_compressed", _truncating(np.savez_compressed))
    with pytest.raises(OutputCheckError, match="does not read back as written") as info:
        save_npz_atomic(tmp_path / "x.npz", a=np.arange(1000))
    assert list(tmp_path.iterdir()) == []
    assert transient_cause(info.value) is not None, "a file that does not read back is the machine's"


def test_a_points_ply_that_does_not_read_back_is_never_renamed_into_place(tmp_path, monkeypatch):
    import plyfile

    from slatflow.io import OutputCheckError

    write = plyfile.PlyData.write
    monkeypatch.setattr(plyfile.PlyData, "write", lambda self, path: _truncating(lambda p: write(self, p))(path))
    with pytest.raises(OutputCheckError, match="does not read back|unlike what was written"):
        write_points_ply(tmp_path / "v.ply", np.random.default_rng(0).random((100, 3)))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"indices": np.zeros((4, 3), np.int64), "patchtokens": np.zeros((4, 8), np.float16)}, "expected uint8"),
        ({"indices": np.zeros((0, 3), np.uint8), "patchtokens": np.zeros((0, 8), np.float16)}, "is empty"),
        ({"indices": np.zeros((4, 3), np.uint8)}, "no 'patchtokens' array"),
        ({"indices": np.zeros((4, 2), np.uint8), "patchtokens": np.zeros((4, 8), np.float16)}, r"expected uint8 \(None, 3\)"),
    ],
)
def test_an_npz_that_breaks_its_contract_is_not_written(tmp_path, arrays, message):
    from slatflow.features import FEATURE_CONTRACT
    from slatflow.io import OutputCheckError

    with pytest.raises(OutputCheckError, match=message):
        save_npz_atomic(tmp_path / "f.npz", contract=FEATURE_CONTRACT, **arrays)
    assert list(tmp_path.iterdir()) == []


def test_a_reader_names_the_upstream_file_and_its_stage(tmp_path):
    """A truncated features npz and voxels ply under a final name (a file from before these
    checks, or damaged on disk): the next stage names the file and the stage that wrote it."""
    from slatflow.errors import AssetError
    from slatflow.features import load_voxels
    from slatflow.latents import read_sparse_features, read_voxel_indices

    sha = "a" * 64
    voxels = tmp_path / "voxels" / f"{sha}.ply"
    write_points_ply(voxels, np.random.default_rng(0).random((50, 3)) - 0.5)
    voxels.write_bytes(voxels.read_bytes()[:300])
    features = tmp_path / "features" / "dinov2_vitl14_reg" / f"{sha}.npz"
    save_npz_atomic(features, indices=np.zeros((4, 3), np.uint8), patchtokens=np.zeros((4, 8), np.float16))
    features.write_bytes(features.read_bytes()[:100])
    for read, path, stage in (
        (lambda: load_voxels(voxels, sha), voxels, "voxelize"),
        (lambda: read_voxel_indices(sha, voxels), voxels, "voxelize"),
        (lambda: read_sparse_features(sha, features, 8), features, "features"),
    ):
        with pytest.raises(AssetError) as info:
            read()
        assert f"{path} (written by the {stage} stage)" in info.value.reason
