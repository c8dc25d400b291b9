"""Crash-safe writes and the shared PLY format."""

from __future__ import annotations

import os

import numpy as np
import pytest

from slatflow.io import atomic_path, read_npz, read_ply_points, save_npz_atomic, write_points_ply


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

    import slatflow.io

    write_zip = slatflow.io._write_zip

    def short_write(handle, members):  # the archive loses its second half on the way to disk
        write_zip(handle, members)
        handle.truncate(handle.tell() // 2)

    monkeypatch.setattr(slatflow.io, "_write_zip", short_write)
    with pytest.raises(OutputCheckError, match="does not read back as written") as info:
        save_npz_atomic(tmp_path / "x.npz", a=np.arange(1000))
    assert list(tmp_path.iterdir()) == []
    assert transient_cause(info.value) is not None, "a file that does not read back is the machine's"


def test_an_npz_member_garbled_on_the_way_to_disk_is_never_renamed_into_place(tmp_path, monkeypatch):
    import zlib

    from slatflow.io import OutputCheckError

    import slatflow.io

    write_zip = slatflow.io._write_zip

    def garbled(handle, members):  # each member's header says float32: a consistent zip, wrong contents
        changed = []
        for name, raw, _, _ in members:
            wrong = b"".join(bytes(part) for part in raw).replace(b"'<f2'", b"'<f4'")
            compressor = zlib.compressobj(1, zlib.DEFLATED, -15)
            changed.append((name, [wrong], [compressor.compress(wrong) + compressor.flush()], zlib.crc32(wrong)))
        write_zip(handle, changed)

    monkeypatch.setattr(slatflow.io, "_write_zip", garbled)
    with pytest.raises(OutputCheckError, match="'patchtokens' reads back as float32"):
        save_npz_atomic(tmp_path / "x.npz", patchtokens=np.zeros((4, 8), np.float16))
    assert list(tmp_path.iterdir()) == []


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
        (lambda: load_voxels(sha, voxels), voxels, "voxelize"),
        (lambda: read_voxel_indices(sha, voxels), voxels, "voxelize"),
        (lambda: read_sparse_features(sha, features, 8), features, "features"),
    ):
        with pytest.raises(AssetError) as info:
            read()
        assert f"{path} (written by the {stage} stage)" in info.value.reason


@pytest.mark.parametrize("level, rows", [(0, 500), (0, 300_000), (1, 500), (6, 500), (1, 300_000)])  # 300k rows: several chunks, stored blocks
def test_npz_holds_what_savez_compressed_holds_deflated_at_the_level(tmp_path, level, rows):
    import zipfile

    rng = np.random.default_rng(1)
    arrays = {"indices": rng.integers(0, 64, (rows, 3), dtype=np.uint8),
              "patchtokens": rng.standard_normal((rows, 16)).astype(np.float16), "flag": np.bool_(True)}
    save_npz_atomic(tmp_path / "ours.npz", compresslevel=level, **arrays)
    np.savez_compressed(tmp_path / "numpy.npz", **arrays)
    with zipfile.ZipFile(tmp_path / "ours.npz") as ours, zipfile.ZipFile(tmp_path / "numpy.npz") as reference:
        assert ours.namelist() == reference.namelist() == ["indices.npy", "patchtokens.npy", "flag.npy"]
        assert {info.compress_type for info in ours.infolist()} == {zipfile.ZIP_DEFLATED}
        assert ours.testzip() is None, "every member's CRC matches"
        for name in ours.namelist():
            assert ours.read(name) == reference.read(name)  # the same .npy bytes inside
    with np.load(tmp_path / "ours.npz") as loaded:
        for name, value in arrays.items():
            assert loaded[name].dtype == value.dtype and np.array_equal(loaded[name], value)


def test_a_member_over_4_gib_goes_through_zipfiles_zip64(tmp_path, monkeypatch):
    import slatflow.io

    monkeypatch.setattr(slatflow.io, "_ZIP32_LIMIT", 100)  # a small stand-in for 4 GiB
    big = np.arange(1000, dtype=np.int32)
    save_npz_atomic(tmp_path / "x.npz", big=big, small=np.uint8(3))
    with np.load(tmp_path / "x.npz") as loaded:
        assert np.array_equal(loaded["big"], big) and loaded["small"] == 3


@pytest.mark.parametrize("level", [0, 1])
def test_npz_of_fortran_order_strided_and_0d_arrays_reads_back_as_numpy_writes_them(tmp_path, level):
    import zipfile

    base = np.arange(60, dtype=np.float32).reshape(6, 10)
    arrays = {"fortran": np.asfortranarray(base), "strided": base[:, ::3], "scalar": np.float64(2.5),
              "empty_row": np.zeros((0, 4), np.int16)}
    save_npz_atomic(tmp_path / "ours.npz", compresslevel=level, **arrays)
    np.savez(tmp_path / "numpy.npz", **arrays)
    with zipfile.ZipFile(tmp_path / "ours.npz") as ours, zipfile.ZipFile(tmp_path / "numpy.npz") as reference:
        assert ours.testzip() is None
        for name in ours.namelist():
            assert ours.read(name) == reference.read(name)


def test_level_0_stores_the_arrays_in_the_deflate_stream(tmp_path):
    import zipfile

    tokens = np.random.default_rng(0).standard_normal((70_000, 8)).astype(np.float16)  # > 1 MB: many stored blocks
    save_npz_atomic(tmp_path / "x.npz", compresslevel=0, patchtokens=tokens)
    with zipfile.ZipFile(tmp_path / "x.npz") as archive:
        [info] = archive.infolist()
        assert info.compress_type == zipfile.ZIP_DEFLATED
        blocks = info.file_size // 0xFFFF + 3  # the header, the array in full blocks and its tail, the end
        assert 0 < info.compress_size - info.file_size <= 5 * blocks  # 5 bytes a block


@pytest.mark.parametrize("stage", ["voxelize", "meshes", "quality", "report"])
def test_the_mesh_reader_names_the_stage_reading_and_the_stage_that_wrote(tmp_path, stage):
    from slatflow.errors import AssetError
    from slatflow.io import read_mesh_ply

    sha = "ab" * 32
    mesh = tmp_path / "renders" / sha / "mesh.ply"
    mesh.parent.mkdir(parents=True)
    mesh.write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 3\n")  # a header cut short
    with pytest.raises(AssetError) as info:
        read_mesh_ply(sha, mesh, stage)
    assert info.value.stage == stage and info.value.sha256 == sha
    assert f"{mesh} (written by the render stage)" in info.value.reason


def _npz_arrays():
    rng = np.random.default_rng(0)
    return {
        "patchtokens": rng.standard_normal((3000, 64)).astype(np.float16),  # > one 64 KiB stored block
        "indices": rng.integers(0, 64, (3000, 3), dtype=np.uint8),
        "flag": np.bool_(True),
        "empty": np.zeros((0, 3), np.float32),
        "fortran": np.asfortranarray(rng.standard_normal((5, 7))),
    }


@pytest.mark.parametrize("writer", ["level0", "level1", "savez_compressed", "savez"])
def test_read_npz_reads_what_np_load_reads(tmp_path, writer):
    arrays = _npz_arrays()
    path = tmp_path / "a.npz"
    if writer.startswith("level"):
        save_npz_atomic(path, compresslevel=int(writer[-1]), **arrays)
    else:
        getattr(np, writer)(path, **arrays)
    buffers = []

    def allocate(size):
        buffers.append(np.empty(size, np.uint8))
        return buffers[-1]

    got = read_npz(path, allocate=allocate)
    with np.load(path) as loaded:
        assert sorted(got) == sorted(loaded.files)
        for key in loaded.files:
            assert got[key].dtype == loaded[key].dtype and got[key].shape == loaded[key].shape, key
            np.testing.assert_array_equal(got[key], loaded[key])
    assert len(buffers) == len(arrays) and np.shares_memory(got["patchtokens"], buffers[0])  # read into the buffer given


@pytest.mark.parametrize("level", [0, 1])
def test_read_npz_refuses_a_flipped_byte_and_a_truncated_file(tmp_path, level):
    path = tmp_path / "a.npz"
    save_npz_atomic(path, compresslevel=level, **_npz_arrays())
    data = bytearray(path.read_bytes())
    flipped = tmp_path / "flipped.npz"
    data[len(data) // 3] ^= 0x10  # inside patchtokens' payload
    flipped.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="patchtokens"):
        read_npz(flipped)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(path.read_bytes()[: len(data) // 2])
    with pytest.raises(ValueError):
        read_npz(truncated)


def test_read_npz_refuses_object_arrays(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, names=np.array(["a", None], dtype=object))
    with pytest.raises(ValueError, match="objects"):
        read_npz(path)


def test_read_npz_inflates_a_member_larger_than_a_chunk(tmp_path):
    """A deflated member of several chunks of input (what level 1 writes for a feature file)."""
    rng = np.random.default_rng(1)
    large = (rng.standard_normal(5_000_000) * 4).astype(np.float16).reshape(-1, 100)  # ~10 MB, > 2 chunks deflated
    save_npz_atomic(tmp_path / "large.npz", compresslevel=1, patchtokens=large)
    np.testing.assert_array_equal(read_npz(tmp_path / "large.npz")["patchtokens"], large)
