"""Fixtures of the features stage, shared by tests/test_features*.py and bench/bench_features.py.

- Synthetic renders: a textured sphere ray-cast in numpy into RGBA PNGs, with a
  transforms.json from slatflow.cameras (TRELLIS's view sequence, radius 2, FOV 40 deg),
  its surface voxels and (for visibility) a triangle mesh. No Blender needed.
- Random DINOv2 weights in the official checkpoint layout.
- The TRELLIS reference, written plainly from dataset_toolkits/extract_feature.py: a plain
  official-layout DINOv2 (`forward_features` -> `x_prenorm`), TRELLIS's per-view loading, its float32 camera
  chain, and grid_sample + mean over all views on the stacked (V, N, D) samples.

Only numpy, torch, PIL and slatflow are imported at module level (the GPU machine has no
trimesh); plyfile comes in through slatflow.io.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from slatflow import cameras
from slatflow.dinov2 import Dinov2Arch
from slatflow.io import read_ply_points, write_points_ply

RADIUS = 2.0  # TRELLIS's camera distance
FOV = math.radians(40.0)
TINY_ARCH = Dinov2Arch(embed_dim=64, depth=2, num_heads=4)  # real family, seconds on 2 cores


# ----------------------------------------------------------------------------------------------
# Synthetic assets
# ----------------------------------------------------------------------------------------------


def sphere_voxels(radius: float) -> np.ndarray:
    """float32 (N, 3): centres of the 64^3 voxels the sphere surface passes near (|r - R| <= half diagonal)."""
    g = (np.arange(64) + 0.5) / 64 - 0.5
    x, y, z = np.meshgrid(g, g, g, indexing="ij")
    centres = np.stack([x, y, z], axis=-1).reshape(-1, 3)  # (64^3, 3)
    keep = np.abs(np.linalg.norm(centres, axis=1) - radius) <= 0.5 * math.sqrt(3) / 64
    return centres[keep].astype(np.float32)


def sphere_mesh(radius: float, rings: int = 48, segments: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """A UV sphere: float32 (M, 3) vertices, int64 (F, 3) faces (outward, counter-clockwise)."""
    theta = np.linspace(0, math.pi, rings + 1)[1:-1]  # (rings - 1,) polar angles, poles apart
    phi = np.linspace(0, 2 * math.pi, segments, endpoint=False)
    t, p = np.meshgrid(theta, phi, indexing="ij")
    ring_vertices = np.stack([np.sin(t) * np.cos(p), np.sin(t) * np.sin(p), np.cos(t)], -1).reshape(-1, 3)
    vertices = np.concatenate([[[0, 0, 1]], ring_vertices, [[0, 0, -1]]]) * radius
    faces = []
    idx = lambda r, s: 1 + r * segments + s % segments  # noqa: E731 - ring r, segment s
    for s in range(segments):
        faces.append([0, idx(0, s), idx(0, s + 1)])
        faces.append([len(vertices) - 1, idx(rings - 2, s + 1), idx(rings - 2, s)])
        for r in range(rings - 2):
            faces.append([idx(r, s), idx(r + 1, s), idx(r + 1, s + 1)])
            faces.append([idx(r, s), idx(r + 1, s + 1), idx(r, s + 1)])
    return vertices.astype(np.float32), np.asarray(faces, dtype=np.int64)


def view_cameras(sha256: str, num_views: int) -> list[np.ndarray]:
    """OpenGL camera-to-world matrices of TRELLIS's view sequence for this asset."""
    angles = cameras.view_angles(num_views, cameras.camera_offset(sha256))
    return [cameras.look_at_c2w(cameras.camera_position(yaw, pitch, RADIUS)) for yaw, pitch in angles]


def render_sphere(c2w: np.ndarray, resolution: int, radius: float, seed: int) -> np.ndarray:
    """uint8 (H, W, 4): a ray-cast textured sphere with soft (partly transparent) edges.

    Transparent pixels carry a bright colour (RGB under alpha 0), so a pipeline that skips
    TRELLIS's premultiplication sees it.
    """
    rng = np.random.default_rng(seed)
    freq, phase = rng.uniform(6, 14, 3), rng.uniform(0, 2 * math.pi, 3)
    focal = 0.5 / math.tan(FOV / 2)
    j, i = np.meshgrid(np.arange(resolution), np.arange(resolution))
    u, v = (j + 0.5) / resolution, (i + 0.5) / resolution
    rot = c2w[:3, :3].copy()
    rot[:, 1:3] *= -1  # OpenGL -> OpenCV camera axes
    dirs = np.stack([(u - 0.5) / focal, (v - 0.5) / focal, np.ones_like(u)], -1) @ rot.T  # (H, W, 3)
    dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
    origin = c2w[:3, 3]
    along = -(dirs @ origin)  # (H, W) ray parameter closest to the centre
    miss = np.linalg.norm(origin + along[..., None] * dirs, axis=-1)  # (H, W) ray-centre distance
    pixel_world = (2 * RADIUS * math.tan(FOV / 2)) / resolution  # pixel footprint at the centre
    alpha = np.clip((radius - miss) / (1.5 * pixel_world), 0, 1)
    t_hit = along - np.sqrt(np.clip(radius**2 - miss**2, 0, None))
    hit = origin + t_hit[..., None] * dirs  # (H, W, 3)
    shade = 0.35 + 0.65 * np.clip(-(dirs * hit).sum(-1) / radius, 0, 1)  # (H, W) facing ratio
    colour = 0.5 + 0.5 * np.sin(hit * freq + phase)  # (H, W, 3)
    rgb = colour * shade[..., None]
    rgb[alpha == 0] = (1.0, 0.0, 1.0)
    rgba = np.concatenate([rgb, alpha[..., None]], -1)
    return np.round(rgba * 255).astype(np.uint8)


def write_synthetic_asset(
    root: Path, sha256: str, num_views: int = 6, resolution: int = 64, radius: float = 0.4,
    with_mesh: bool = False, workers: int = 1,
) -> tuple[Path, Path]:
    """Write `renders/<sha>/` (PNGs + transforms.json [+ mesh.ply]) and `voxels/<sha>.ply`.

    PNGs use zlib level 1, about what Blender's default 15% compression gives.

    Returns:
        (render_dir, voxels_path).
    """
    from concurrent.futures import ThreadPoolExecutor

    render_dir = Path(root) / "renders" / sha256
    render_dir.mkdir(parents=True, exist_ok=True)
    c2ws = view_cameras(sha256, num_views)

    def write_view(index: int) -> None:
        image = render_sphere(c2ws[index], resolution, radius, seed=int(sha256[:8], 16))
        Image.fromarray(image, "RGBA").save(render_dir / f"{index:03d}.png", compress_level=1)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(write_view, range(num_views)))
    frames = [
        {"file_path": f"{index:03d}.png", "camera_angle_x": FOV, "transform_matrix": c2w.tolist()}
        for index, c2w in enumerate(c2ws)
    ]
    transforms = {"aabb": [[-0.5] * 3, [0.5] * 3], "scale": 1.0, "offset": [0.0] * 3, "frames": frames}
    (render_dir / "transforms.json").write_text(json.dumps(transforms))
    if with_mesh:
        import trimesh

        vertices, faces = sphere_mesh(radius)
        trimesh.Trimesh(vertices, faces, process=False).export(render_dir / "mesh.ply")
    voxels_path = Path(root) / "voxels" / f"{sha256}.ply"
    write_points_ply(voxels_path, sphere_voxels(radius))
    return render_dir, voxels_path


# ----------------------------------------------------------------------------------------------
# Official-layout DINOv2 (reference model) and random official checkpoints
# ----------------------------------------------------------------------------------------------


def random_official_state_dict(arch: Dinov2Arch, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the official `dinov2_*_reg4_pretrain.pth` keys and shapes.

    Scales are O(1) per layer (std 1/sqrt(fan_in), layer scales ~U(0.5, 1.5), non-trivial
    norms and biases), so that every tensor, and a wrong mapping of any of them, shows in
    the output.
    """
    gen = torch.Generator().manual_seed(seed)
    d, hidden, p = arch.embed_dim, arch.embed_dim * arch.mlp_ratio, arch.patch_size

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=gen) * std

    def linear(prefix, fan_in, fan_out):
        return {f"{prefix}.weight": randn(fan_out, fan_in, std=fan_in**-0.5), f"{prefix}.bias": randn(fan_out, std=0.1)}

    def norm(prefix):
        return {f"{prefix}.weight": 1 + randn(d, std=0.1), f"{prefix}.bias": randn(d, std=0.1)}

    state = {
        "cls_token": randn(1, 1, d),
        "mask_token": randn(1, d),
        "register_tokens": randn(1, arch.num_register_tokens, d),
        "pos_embed": randn(1, arch.num_patch_positions + 1, d, std=0.5),
        "patch_embed.proj.weight": randn(d, 3, p, p, std=(3 * p * p) ** -0.5),
        "patch_embed.proj.bias": randn(d, std=0.1),
        **norm("norm"),
    }
    for i in range(arch.depth):
        b = f"blocks.{i}"
        state.update(norm(f"{b}.norm1"))
        state.update(linear(f"{b}.attn.qkv", d, 3 * d))
        state.update(linear(f"{b}.attn.proj", d, d))
        state[f"{b}.ls1.gamma"] = 0.5 + torch.rand(d, generator=gen)
        state.update(norm(f"{b}.norm2"))
        state.update(linear(f"{b}.mlp.fc1", d, hidden))
        state.update(linear(f"{b}.mlp.fc2", hidden, d))
        state[f"{b}.ls2.gamma"] = 0.5 + torch.rand(d, generator=gen)
    return state


class _ReferenceBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, hidden: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.attn.proj = nn.Linear(dim, dim)
        self.ls1 = nn.Module()
        self.ls1.gamma = nn.Parameter(torch.ones(dim))
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, hidden)
        self.mlp.fc2 = nn.Linear(hidden, dim)
        self.ls2 = nn.Module()
        self.ls2.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.attn.qkv(self.norm1(x)).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, N, D/H)
        # the official Attention calls SDPA when xFormers is absent (memory-efficient with it)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, dim)
        x = x + self.attn.proj(attn) * self.ls1.gamma
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x)))) * self.ls2.gamma


class ReferenceDinov2(nn.Module):
    """DINOv2 with registers in the official layout (keys of `*_reg4_pretrain.pth`).

    Written from facebookresearch/dinov2's DinoVisionTransformer with the `*_reg` hub
    settings (interpolate_antialias=True, interpolate_offset=0.0): load an official state
    dict strictly; `forward_features(x)["x_prenorm"]` is what TRELLIS reads.
    """

    def __init__(self, arch: Dinov2Arch):
        super().__init__()
        d, p = arch.embed_dim, arch.patch_size
        self.arch = arch
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, d, kernel_size=p, stride=p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.mask_token = nn.Parameter(torch.zeros(1, d))
        self.register_tokens = nn.Parameter(torch.zeros(1, arch.num_register_tokens, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, arch.num_patch_positions + 1, d))
        self.blocks = nn.ModuleList(
            [_ReferenceBlock(d, arch.num_heads, d * arch.mlp_ratio) for _ in range(arch.depth)]
        )
        self.norm = nn.LayerNorm(d, eps=1e-6)

    def interpolate_pos_encoding(self, num_patches: int, size: int) -> torch.Tensor:
        known = self.pos_embed.shape[1] - 1
        if num_patches == known:
            return self.pos_embed
        side, grid = int(math.sqrt(known)), size // self.arch.patch_size
        patch_pos = self.pos_embed[:, 1:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, size=(grid, grid), mode="bicubic", antialias=True)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)
        return torch.cat([self.pos_embed[:, :1], patch_pos], dim=1)

    def forward_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The official `forward_features` (what `model(x, is_training=True)` returns)."""
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)  # (B, P, D)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1)
        x = x + self.interpolate_pos_encoding(x.shape[1] - 1, images.shape[-1])
        x = torch.cat([x[:, :1], self.register_tokens.expand(len(x), -1, -1), x[:, 1:]], dim=1)
        for block in self.blocks:
            x = block(x)
        x_norm = self.norm(x)
        registers = self.arch.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1 : registers + 1],
            "x_norm_patchtokens": x_norm[:, registers + 1 :],
            "x_prenorm": x,
        }


def reference_model(arch: Dinov2Arch, state_dict: dict[str, torch.Tensor]) -> ReferenceDinov2:
    model = ReferenceDinov2(arch)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# TRELLIS's recipe, step by step (dataset_toolkits/extract_feature.py)
# ----------------------------------------------------------------------------------------------

_NORMALIZE_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
_NORMALIZE_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def trellis_normalize(image: torch.Tensor) -> torch.Tensor:
    """torchvision's Normalize with ImageNet's mean and std, as TRELLIS's loader applies it."""
    return (image - _NORMALIZE_MEAN) / _NORMALIZE_STD


def trellis_load_view(render_dir: Path, frame: dict, image_size: int = 518) -> dict[str, torch.Tensor]:
    """TRELLIS's `get_data` worker for one view, then the loader's Normalize."""
    view = trellis_get_view(render_dir, frame, image_size)
    view["image"] = trellis_normalize(view["image"])
    return view


def trellis_get_view(render_dir: Path, frame: dict, image_size: int = 518) -> dict[str, torch.Tensor]:
    """TRELLIS's `get_data` worker: the premultiplied image in [0, 1] and the camera."""
    image = Image.open(Path(render_dir) / frame["file_path"])
    image = image.resize((image_size, image_size), Image.Resampling.LANCZOS)
    image = np.array(image).astype(np.float32) / 255
    image = image[:, :, :3] * image[:, :, 3:]
    image = torch.from_numpy(image).permute(2, 0, 1).float()
    c2w = torch.tensor(frame["transform_matrix"])
    c2w[:3, 1:3] *= -1
    extrinsics = torch.inverse(c2w)
    focal = 0.5 / torch.tan(torch.tensor(frame["camera_angle_x"]) / 2)  # utils3d intrinsics_from_fov_xy
    intrinsics = torch.tensor([[0.0, 0.0, 0.5], [0.0, 0.0, 0.5], [0.0, 0.0, 1.0]])
    intrinsics[0, 0] = intrinsics[1, 1] = focal
    return {"image": image, "extrinsics": extrinsics, "intrinsics": intrinsics}


def trellis_project_cv(points: torch.Tensor, extrinsics: torch.Tensor, intrinsics: torch.Tensor) -> torch.Tensor:
    """utils3d.torch.project_cv's uv: (V, N, 2) in [0, 1] for points (N, 3), cameras (V, 4, 4), (V, 3, 3)."""
    homogeneous = torch.cat([points, torch.ones_like(points[:, :1])], dim=-1)  # (N, 4)
    cam = homogeneous @ extrinsics.transpose(-1, -2)  # (V, N, 4)
    pix = cam[..., :3] @ intrinsics.transpose(-1, -2)  # (V, N, 3)
    return pix[..., :2] / pix[..., 2:]


def trellis_indices(positions: torch.Tensor) -> np.ndarray:
    indices = ((positions + 0.5) * 64).long()
    assert torch.all(indices >= 0) and torch.all(indices < 64), "Some vertices are out of bounds"
    return indices.cpu().numpy().astype(np.uint8)


def trellis_batch_tokens(model: ReferenceDinov2, batch: list[dict], positions: torch.Tensor, device):
    """One batch of TRELLIS's GPU loop: (patchtokens (B, D, n, n), uv (B, N, 2) in [-1, 1])."""
    images = torch.stack([d["image"] for d in batch]).to(device)
    extrinsics = torch.stack([d["extrinsics"] for d in batch]).to(device)
    intrinsics = torch.stack([d["intrinsics"] for d in batch]).to(device)
    tokens = model.forward_features(images)["x_prenorm"]
    grid = images.shape[-1] // model.arch.patch_size
    uv = trellis_project_cv(positions, extrinsics, intrinsics) * 2 - 1
    patchtokens = tokens[:, model.arch.num_register_tokens + 1 :].permute(0, 2, 1)
    return patchtokens.reshape(len(batch), model.arch.embed_dim, grid, grid), uv


def trellis_mean(patchtokens: torch.Tensor, uv: torch.Tensor) -> np.ndarray:
    """TRELLIS's saver: sample every view, mean over views in numpy. float32 (N, D)."""
    sampled = F.grid_sample(patchtokens, uv.unsqueeze(1), mode="bilinear", align_corners=False)
    sampled = sampled.squeeze(2).permute(0, 2, 1).cpu().numpy()  # (V, N, D)
    return np.mean(sampled, axis=0)


@torch.no_grad()
def trellis_reference_features(
    model: ReferenceDinov2, render_dir: Path, voxels_path: Path, batch_size: int = 16,
    device: str = "cpu", image_size: int = 518,
) -> tuple[np.ndarray, np.ndarray]:
    """TRELLIS's features of one asset, sequentially: (indices uint8 (N, 3), mean float32 (N, D)).

    The stored `patchtokens` are `mean.astype(np.float16)`.
    """
    frames = json.loads((Path(render_dir) / "transforms.json").read_text())["frames"]
    data = [trellis_load_view(render_dir, frame, image_size) for frame in frames]
    positions = torch.from_numpy(read_ply_points(voxels_path)).float().to(device)
    indices = trellis_indices(positions)
    token_list, uv_list = [], []
    for i in range(0, len(data), batch_size):
        tokens, uv = trellis_batch_tokens(model, data[i : i + batch_size], positions, device)
        token_list.append(tokens)
        uv_list.append(uv)
    return indices, trellis_mean(torch.cat(token_list), torch.cat(uv_list))
