"""A small TRELLIS-500K world for offline tests: every subset served the way it is for real.

The loopback FixtureServer plays the HF hub (subset CSVs, allenai/objaverse's
object-paths.json.gz and glbs, the token-gated HSSD) and S3 (the ABO tar); a local bare
repository plays GitHub; 3D-FUTURE and Toys4k are zips on disk, as their users get them.
Each subset holds good assets and, where the subset can have them, bad ones.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from download_fixtures import FixtureServer

HF_TOKEN = "hf_fixture_token"
ABO_URL_PATH = "/archives/abo-3dmodels.tar"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def mesh_bytes(kind: str, seed: int) -> bytes:
    """A small mesh file's bytes (distinct per seed, so every asset has its own sha256)."""
    import trimesh

    mesh = trimesh.creation.icosphere(subdivisions=1, radius=1.0 + seed / 10)
    return mesh.export(file_type=kind) if kind != "obj" else mesh.export(file_type="obj").encode()


@dataclass
class Asset:
    subset: str
    file_identifier: str
    sha256: str
    local_path: str = ""  # relative to OUT, when the asset should download
    fault: str = ""  # why it must fail: "" for a good asset
    companions: list[str] = field(default_factory=list)  # relative to OUT


@dataclass
class Trellis500kWorld:
    server: FixtureServer
    config: dict
    assets: list[Asset]

    def by_fault(self, fault: str) -> list[Asset]:
        return [a for a in self.assets if a.fault == fault]


def _git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True, timeout=60).stdout.strip()


def make_github_repo(root: Path) -> tuple[str, dict[str, bytes]]:
    """org1/repo1.git: an obj with its mtl and a texture two folders up; returns (commit, files)."""
    work = root / "work"
    work.mkdir(parents=True)
    files = {
        "models/car/car.obj": b"mtllib car.mtl\n" + mesh_bytes("obj", 7),
        "models/car/car.mtl": b"newmtl paint\nmap_Kd ../../textures/paint.png\n",
        "textures/paint.png": b"\x89PNG fixture texture",
    }
    for name, data in files.items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_bytes(data)
    _git("init", "-q", "-b", "main", cwd=work)
    _git("-c", "user.name=t", "-c", "user.email=t@t", "add", ".", cwd=work)
    _git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "car", cwd=work)
    commit = _git("rev-parse", "HEAD", cwd=work)
    (work / "models/car/car.obj").write_bytes(b"# a later, different car\n")  # the pin must matter
    _git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-am", "change", cwd=work)
    bare = root / "github" / "org1" / "repo1.git"
    bare.parent.mkdir(parents=True)
    _git("clone", "-q", "--bare", str(work), str(bare), cwd=root)
    _git("config", "uploadpack.allowFilter", "true", cwd=bare)
    _git("config", "uploadpack.allowAnySHA1InWant", "true", cwd=bare)
    return commit, files


def tar_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def build_world(root: Path, server: FixtureServer, slow_glb: tuple[int, int] | None = None) -> Trellis500kWorld:
    """Serve and write every subset's files; returns the config for a trellis500k run.

    Args:
        slow_glb: (size, bytes per second): the first Sketchfab glb is that big and slow.
    """
    root.mkdir(parents=True, exist_ok=True)
    assets: list[Asset] = []
    rows: dict[str, list[dict]] = {s: [] for s in ("ObjaverseXL_sketchfab", "ObjaverseXL_github", "ABO", "3D-FUTURE", "HSSD", "Toys4k")}

    def row(subset, fid, sha, score=6.0):
        rows[subset].append({"sha256": sha, "file_identifier": fid, "aesthetic_score": score, "captions": json.dumps([f"a {subset} thing"])})

    # Sketchfab: glbs on the hub; one flaky, one with a wrong listed hash, one gone, one unknown uid
    object_paths = {}
    for i, (uid, fault) in enumerate([("aaa111", ""), ("bbb222", "flaky"), ("ccc333", "hash"), ("ddd444", "404"), ("eee555", "unknown")]):
        data = mesh_bytes("glb", i)
        if i == 0 and slow_glb:
            data = data + bytes(slow_glb[0] - len(data))
        listed = sha256_hex(data if fault != "hash" else data + b"x")
        if fault != "unknown":
            object_paths[uid] = f"glbs/000-001/{uid}.glb"
        if fault not in ("404", "unknown"):
            server.add(f"/datasets/allenai/objaverse/resolve/main/glbs/000-001/{uid}.glb", data, faults=["500", "truncate"] if fault == "flaky" else (), rate_bps=slow_glb[1] if i == 0 and slow_glb else None)
        row("ObjaverseXL_sketchfab", f"https://sketchfab.com/3d-models/{uid}", listed)
        path = f"raw/ObjaverseXL_sketchfab/{listed}/{uid}.glb"
        assets.append(Asset("ObjaverseXL_sketchfab", f"https://sketchfab.com/3d-models/{uid}", listed, path, fault if fault != "flaky" else ""))
    row("ObjaverseXL_sketchfab", "https://sketchfab.com/3d-models/fff666", sha256_hex(b"low score"), score=2.0)  # filtered out
    server.add("/datasets/allenai/objaverse/resolve/main/object-paths.json.gz", gzip.compress(json.dumps(object_paths).encode()))

    # GitHub: a pinned commit of a local bare repository
    commit, files = make_github_repo(root / "git")
    fid = f"https://github.com/org1/repo1/blob/{commit}/models/car/car.obj"
    sha = sha256_hex(files["models/car/car.obj"])
    row("ObjaverseXL_github", fid, sha)
    base = f"raw/ObjaverseXL_github/{sha}"
    assets.append(Asset("ObjaverseXL_github", fid, sha, f"{base}/models/car/car.obj", companions=[f"{base}/models/car/car.mtl", f"{base}/textures/paint.png"]))

    # ABO: a tar on "S3", two wanted members (one behind an unwanted one), one absent
    abo = {f"3dmodels/original/{i}/B00{i}.glb": mesh_bytes("glb", 20 + i) for i in range(3)}
    server.add(ABO_URL_PATH, tar_bytes(abo), faults=["truncate"])
    for i in (0, 2):
        sha = sha256_hex(abo[f"3dmodels/original/{i}/B00{i}.glb"])
        row("ABO", f"{i}/B00{i}.glb", sha)
        assets.append(Asset("ABO", f"{i}/B00{i}.glb", sha, f"raw/ABO/{sha}/B00{i}.glb"))
    missing = sha256_hex(b"not in the archive")
    row("ABO", "9/B009.glb", missing)
    assets.append(Asset("ABO", "9/B009.glb", missing, f"raw/ABO/{missing}/B009.glb", "absent"))

    # 3D-FUTURE: the user's zip; the key is the instance's image.jpg
    image = b"\xff\xd8 fixture image of inst-1"
    future = {
        "3D-FUTURE-model/inst-1/raw_model.obj": b"mtllib model.mtl\n" + mesh_bytes("obj", 30),
        "3D-FUTURE-model/inst-1/model.mtl": b"newmtl m\nmap_Kd texture.png\n",
        "3D-FUTURE-model/inst-1/texture.png": b"\x89PNG fixture",
        "3D-FUTURE-model/inst-1/image.jpg": image,
    }
    future_zip = write_zip(root / "3D-FUTURE-model.zip", future)
    sha = sha256_hex(image)
    row("3D-FUTURE", "3D-FUTURE-model/inst-1", sha)
    assets.append(Asset("3D-FUTURE", "3D-FUTURE-model/inst-1", sha, f"raw/3D-FUTURE/{sha}/raw_model.obj", companions=[f"raw/3D-FUTURE/{sha}/texture.png", f"raw/3D-FUTURE/{sha}/model.mtl"]))

    # HSSD: gated on the hub
    data = mesh_bytes("glb", 40)
    server.add("/datasets/hssd/hssd-models/resolve/main/objects/5/5abc.glb", data, token=HF_TOKEN)
    sha = sha256_hex(data)
    row("HSSD", "objects/5/5abc.glb", sha)
    assets.append(Asset("HSSD", "objects/5/5abc.glb", sha, f"raw/HSSD/{sha}/5abc.glb"))

    # Toys4k: the user's zip of .blend files
    blend = b"BLENDER-v450 fixture"
    toys_zip = write_zip(root / "toys4k_blend_files.zip", {"toys4k_blend_files/cat/cat_000/cat_000.blend": blend})
    sha = sha256_hex(blend)
    row("Toys4k", "cat/cat_000/cat_000.blend", sha)
    assets.append(Asset("Toys4k", "cat/cat_000/cat_000.blend", sha, f"raw/Toys4k/{sha}/cat_000.blend"))

    for subset, subset_rows in rows.items():
        csv = pd.DataFrame(subset_rows).to_csv(index=False).encode()
        server.add(f"/datasets/JeffreyXiang/TRELLIS-500K/resolve/main/{subset}.csv", csv)

    config = {
        "output_dir": str(root / "out"),
        "source": {"type": "trellis500k", "subsets": list(rows), "min_aesthetic_score": 4.5},
        "download": {
            "hf_endpoint": server.url,
            "github_url": f"file://{root / 'git' / 'github'}",
            "abo_archive": server.url + ABO_URL_PATH,
            "future_archive": str(future_zip),
            "toys4k_archive": str(toys_zip),
            "timeout_s": 2,
            "attempts": 4,
            "backoff_s": 0.01,
            "git_timeout_s": 60,
        },
    }
    return Trellis500kWorld(server, config, assets)
