"""TRELLIS's structured-latent encoder (`SLatEncoder`) in pure PyTorch, for CPU and GPU.

TRELLIS runs this transformer on spconv sparse tensors with flash-attn or xformers kernels.
The math is plain: per-voxel linear layers and softmax attention inside 3D windows. Here a
voxel set is a pair of dense tensors (features (N, C), coordinates (N, 4) = batch, x, y, z),
and windowed attention is torch's `scaled_dot_product_attention` over windows gathered into
padded batches. Module and parameter names are TRELLIS's
(`trellis/models/structured_latent_vae/`, `trellis/modules/sparse/`), so the official
`slat_enc_swin8_B_64l8_fp16.safetensors` loads with `strict=True`.

Window partition (TRELLIS's `calc_window_partition`): a voxel belongs to window
`(batch, (xyz + shift) // window_size)`; shift is 0 on even blocks and window_size // 2 on
odd ones ("swin"). The batch index is part of the window, so windows never mix assets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from slatflow.models.common import LayerNorm32, cast_torso

AttnMode = Literal["swin", "full"]

# Upper bound on query x key scores one attention call may hold (float32: 256 MB), so that
# CPU runs, whose SDPA may materialise the scores, stay in bounded memory at 32k voxels.
MAX_SCORES_PER_CALL = 2**26

# Every asset brings new window shapes, and cuDNN's attention builds a plan for each new
# shape: ~1 s per forward on an H200 (bench/bench_pipeline_gpu.py's SLat streams) against
# 40 ms for these kernels, which start at once.
WINDOW_ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

# TRELLIS's transformer-block LayerNorms: no affine parameters, eps 1e-6.
BLOCK_NORM_EPS = 1e-6


class AbsolutePositionEmbedder(nn.Module):
    """Sin/cos embedding of integer voxel coordinates (no parameters, nothing in the state dict).

    Per axis, `channels // in_channels // 2` frequencies 1 / 10000^(i / freq_dim); the
    embedding of a voxel is [sin(x f), cos(x f), sin(y f), cos(y f), sin(z f), cos(z f)],
    zero-padded to `channels`.
    """

    def __init__(self, channels: int, in_channels: int = 3):
        super().__init__()
        self.channels = channels
        self.in_channels = in_channels
        freq_dim = channels // in_channels // 2
        freqs = 1.0 / (10000 ** (torch.arange(freq_dim, dtype=torch.float32) / freq_dim))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """Embed positions.

        Args:
            positions: integer (N, in_channels) voxel coordinates.

        Returns:
            float32 (N, channels).
        """
        num = positions.shape[0]
        angles = positions.reshape(-1, 1).float() * self.freqs  # (N * in_channels, freq_dim)
        embed = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1).reshape(num, -1)
        if embed.shape[1] < self.channels:  # (N, in_channels * 2 * freq_dim) -> (N, channels)
            embed = F.pad(embed, (0, self.channels - embed.shape[1]))
        return embed


@dataclass(frozen=True)
class WindowBucket:
    """Windows of one padded length, gathered for one batched attention call.

    Attributes:
        rows: int64 (W, L): the voxel row of each slot of each window; padding slots hold
            the row index N, a zero dummy row appended to the voxels.
        key_mask: bool (W, 1, 1, L), True on real voxels; None when no slot is padding.
    """

    rows: torch.Tensor
    key_mask: torch.Tensor | None


@dataclass(frozen=True)
class WindowPartition:
    """The windows of a voxel set: in buckets of equal padded length (`buckets`), or packed
    back to back for variable-length attention (`packed`; then `buckets` is None)."""

    num_voxels: int
    buckets: tuple[WindowBucket, ...] | None
    packed: "PackedWindows | None" = None


@dataclass(frozen=True)
class PackedWindows:
    """Windows back to back, as flash attention's variable-length kernel takes them.

    Attributes:
        order: int64 (N,), the voxel rows window by window.
        inverse: int64 (N,), each voxel's place in `order`.
        offsets: int32 (num_windows + 1,), where each window starts in `order`, then N.
        max_length: the longest window.
    """

    order: torch.Tensor
    inverse: torch.Tensor
    offsets: torch.Tensor
    max_length: int


def padded_window_length(lengths: torch.Tensor) -> torch.Tensor:
    """Round window lengths up to a multiple of 8 (<= 64), 16 (<= 128), 32 (<= 256), 64 beyond.

    Few distinct padded lengths mean few attention calls; the rounding wastes at most
    ~12% of the slots of a large window.
    """
    granule = torch.full_like(lengths, 8)
    granule = torch.where(lengths > 64, 16, granule)
    granule = torch.where(lengths > 128, 32, granule)
    granule = torch.where(lengths > 256, 64, granule)
    return (lengths + granule - 1) // granule * granule


def window_partition(
    coords: torch.Tensor, window_size: int | None, shift: int = 0, packed: bool = False
) -> WindowPartition:
    """Group voxels into attention windows (TRELLIS's `calc_window_partition`).

    Inside a window, voxels are ordered by coordinate, so the result does not depend on the
    order voxels come in.

    Args:
        coords: integer (N, 4): batch index, x, y, z (voxel indices, >= 0).
        window_size: window side in voxels; None puts each batch item in one window.
        shift: added to x, y, z before the floor division by `window_size`.
        packed: windows back to back for `varlen_attn` instead of padded buckets.

    Returns:
        The windows, bucketed by padded length, or packed.
    """
    coords = coords.long()
    num = coords.shape[0]
    batch, xyz = coords[:, 0], coords[:, 1:]  # (N,), (N, 3)
    side = int(xyz.max()) + 1
    if window_size is None:
        window = batch  # (N,)
    else:
        cells = (xyz + shift) // window_size  # (N, 3)
        per_axis = (side - 1 + shift) // window_size + 1
        window = ((batch * per_axis + cells[:, 0]) * per_axis + cells[:, 1]) * per_axis + cells[:, 2]
    voxel = (xyz[:, 0] * side + xyz[:, 1]) * side + xyz[:, 2]  # (N,) unique within an asset
    order = torch.argsort(window * side**3 + voxel)  # (N,) windows contiguous, voxels sorted
    _, lengths = torch.unique_consecutive(window[order], return_counts=True)  # (num_windows,)
    starts = torch.cumsum(lengths, 0) - lengths  # (num_windows,)
    if packed:
        offsets = F.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)  # (num_windows + 1,)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(num, device=coords.device)
        windows = PackedWindows(order, inverse, offsets, int(lengths.max()))
        return WindowPartition(num_voxels=num, buckets=None, packed=windows)
    padded = padded_window_length(lengths)

    buckets = []
    for length in torch.unique(padded).tolist():
        chosen = torch.nonzero(padded == length).squeeze(1)  # (W,)
        slot = torch.arange(length, device=coords.device)  # (L,)
        valid = slot < lengths[chosen, None]  # (W, L)
        position = (starts[chosen, None] + slot).clamp(max=num - 1)  # (W, L)
        rows = torch.where(valid, order[position], num)  # (W, L)
        key_mask = None if bool(valid.all()) else valid[:, None, None, :]
        buckets.append(WindowBucket(rows=rows, key_mask=key_mask))
    return WindowPartition(num_voxels=num, buckets=tuple(buckets))


def windowed_attention(qkv: torch.Tensor, partition: WindowPartition) -> torch.Tensor:
    """Softmax attention of each voxel over the voxels of its window.

    Args:
        qkv: (N, 3, H, C) queries, keys and values per voxel and head.
        partition: the windows of the N voxels.

    Returns:
        (N, H, C), in qkv's dtype; the softmax scale is 1/sqrt(C) (flash-attn's default).
    """
    num, _, heads, head_channels = qkv.shape
    if partition.packed is not None:
        return _packed_windowed_attention(qkv, partition.packed)
    padded_qkv = torch.cat([qkv, qkv.new_zeros(1, 3, heads, head_channels)])  # (N + 1, 3, H, C)
    out = qkv.new_zeros(num + 1, heads, head_channels)  # row N collects padding, then dropped
    with sdpa_kernel(WINDOW_ATTENTION_BACKENDS):
        for bucket in partition.buckets:
            num_windows, length = bucket.rows.shape
            step = max(1, MAX_SCORES_PER_CALL // (heads * length * length))
            for first in range(0, num_windows, step):
                rows = bucket.rows[first : first + step]  # (W, L)
                q, k, v = padded_qkv[rows].permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (W, H, L, C)
                mask = None if bucket.key_mask is None else bucket.key_mask[first : first + step]
                attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (W, H, L, C)
                out[rows.reshape(-1)] = attended.transpose(1, 2).reshape(-1, heads, head_channels)
    return out[:num]


def _packed_windowed_attention(qkv: torch.Tensor, windows: PackedWindows) -> torch.Tensor:
    """`windowed_attention` through flash attention's variable-length kernel: no padding,
    masks or per-bucket calls (TRELLIS's own path, flash_attn_varlen_qkvpacked_func)."""
    q, k, v = qkv[windows.order].unbind(1)  # 3 x (N, H, C), windows back to back
    return _varlen_window_attention(q, k, v, windows)[windows.inverse]


def _varlen_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, windows: PackedWindows) -> torch.Tensor:
    """Attention within each window of voxels in window order: 3 x (N, H, C) -> (N, H, C);
    q, k, v may be strided views of a fused projection (only the channel axis contiguous)."""
    from torch.nn.attention.varlen import varlen_attn

    offsets, longest = windows.offsets, windows.max_length
    return varlen_attn(q, k, v, offsets, offsets, longest, longest)


def packed_attention_available(x: torch.Tensor, head_channels: int) -> bool:
    """Whether `varlen_attn` (torch >= 2.10, flash attention on CUDA) takes these inputs."""
    if not x.is_cuda or x.dtype not in (torch.float16, torch.bfloat16) or head_channels % 8 or head_channels > 256:
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability(x.device) >= (8, 0)


class SparseMultiHeadAttention(nn.Module):
    """Windowed multi-head self-attention with fused qkv (TRELLIS's `to_qkv` / `to_out`)."""

    def __init__(self, channels: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels {channels} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.to_qkv = nn.Linear(channels, 3 * channels, bias=qkv_bias)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, partition: WindowPartition) -> torch.Tensor:
        num = x.shape[0]
        qkv = self.to_qkv(x).reshape(num, 3, self.num_heads, -1)  # (N, 3, H, C)
        h = windowed_attention(qkv, partition)  # (N, H, C)
        return self.to_out(h.reshape(num, -1))


class SparseFeedForwardNet(nn.Module):
    def __init__(self, channels: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, channels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class SparseTransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x)).

    Args:
        window_size: attention window side; None attends over the whole asset.
        shift: the window shift of this block.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int,
        mlp_ratio: float,
        window_size: int | None,
        shift: int,
    ):
        super().__init__()
        self.window_size = window_size
        self.shift = shift
        self.norm1 = LayerNorm32(channels, elementwise_affine=False, eps=BLOCK_NORM_EPS)
        self.norm2 = LayerNorm32(channels, elementwise_affine=False, eps=BLOCK_NORM_EPS)
        self.attn = SparseMultiHeadAttention(channels, num_heads)
        self.mlp = SparseFeedForwardNet(channels, mlp_ratio)

    def forward(self, x: torch.Tensor, partition: WindowPartition) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), partition)
        return x + self.mlp(self.norm2(x))

    def forward_packed(self, x: torch.Tensor, windows: PackedWindows) -> torch.Tensor:
        """`forward` for voxels already in `windows.order` (CUDA, half precision): q, k and v
        go to the variable-length kernel as views of the fused projection, and the GELU (tanh,
        TRELLIS's) is the first MLP matmul's cuBLASLt epilogue."""
        num = x.shape[0]
        qkv = self.attn.to_qkv(self.norm1(x)).view(num, 3, self.attn.num_heads, -1)  # (N, 3, H, C)
        attended = _varlen_window_attention(*qkv.unbind(1), windows)  # (N, H, C)
        x = x + self.attn.to_out(attended.reshape(num, -1))
        fc1, fc2 = self.mlp.mlp[0], self.mlp.mlp[2]
        return x + fc2(torch._addmm_activation(fc1.bias, self.norm2(x), fc1.weight.t(), use_gelu=True))


class SLatEncoder(nn.Module):
    """Sparse transformer encoder of per-voxel features into the structured latent.

    Args mirror TRELLIS's constructor (the `args` of the checkpoint's json). Only what the
    released encoders use is implemented: `pe_mode="ape"`, `attn_mode` "swin" or "full",
    no qk RMS norm; anything else raises ValueError rather than computing something else.

    Args:
        resolution: voxel grid side (coordinates lie in [0, resolution)).
        in_channels: feature channels per voxel (1024 for DINOv2 ViT-L).
        model_channels: transformer width.
        latent_channels: latent channels; the output layer predicts mean and logvar.
        num_blocks: transformer blocks.
        num_heads: attention heads; default model_channels // num_head_channels.
        num_head_channels: channels per head when num_heads is not given.
        mlp_ratio: MLP hidden width over model_channels.
        attn_mode: "swin" (shifted windows) or "full" (one window per asset).
        window_size: window side in voxels for "swin".
        pe_mode: "ape", the absolute sin/cos position embedding.
        use_fp16: the checkpoint was trained with an fp16 torso; `encode` uses it on GPU.
        use_checkpoint: training-only activation checkpointing; no effect here.
        qk_rms_norm: must be False.
    """

    def __init__(
        self,
        resolution: int,
        in_channels: int,
        model_channels: int,
        latent_channels: int,
        num_blocks: int,
        num_heads: int | None = None,
        num_head_channels: int | None = 64,
        mlp_ratio: float = 4,
        attn_mode: AttnMode = "swin",
        window_size: int = 8,
        pe_mode: Literal["ape"] = "ape",
        use_fp16: bool = False,
        use_checkpoint: bool = False,
        qk_rms_norm: bool = False,
    ):
        super().__init__()
        if attn_mode not in ("swin", "full"):
            raise ValueError(f"attn_mode {attn_mode!r} is not implemented; expected 'swin' or 'full'")
        if pe_mode != "ape":
            raise ValueError(f"pe_mode {pe_mode!r} is not implemented; expected 'ape'")
        if qk_rms_norm:
            raise ValueError("qk_rms_norm=True is not implemented (no released encoder uses it)")
        self.resolution = resolution
        self.in_channels = in_channels
        self.latent_channels = latent_channels
        self.use_fp16 = use_fp16
        self.torso_dtype = torch.float32
        num_heads = num_heads or model_channels // num_head_channels

        self.pos_embedder = AbsolutePositionEmbedder(model_channels)
        self.input_layer = nn.Linear(in_channels, model_channels)
        self.blocks = nn.ModuleList(
            SparseTransformerBlock(
                model_channels,
                num_heads,
                mlp_ratio,
                window_size=window_size if attn_mode == "swin" else None,
                shift=window_size // 2 * (i % 2) if attn_mode == "swin" else 0,
            )
            for i in range(num_blocks)
        )
        self.out_layer = nn.Linear(model_channels, 2 * latent_channels)

    def _blocks(self, h: torch.Tensor, partitions: dict[tuple, WindowPartition]) -> torch.Tensor:
        for block in self.blocks:
            h = block(h, partitions[(block.window_size, block.shift)])
        return h

    def _packed_blocks(self, h: torch.Tensor, partitions: dict[tuple, WindowPartition]) -> torch.Tensor:
        """The blocks with the voxels kept in the current block's window order: one gather of
        the residual stream when the windows change (every block, under swin) instead of
        gathering q, k and v into window order and the output back in every block."""
        current: PackedWindows | None = None  # h's row i is voxel current.order[i] (None: input order)
        for block in self.blocks:
            windows = partitions[(block.window_size, block.shift)].packed
            if windows is not current:
                h = h[windows.order if current is None else current.inverse[windows.order]]
                current = windows
            h = block.forward_packed(h, windows)
        return h[current.inverse] if current is not None else h

    def set_torso_dtype(self, dtype: torch.dtype) -> None:
        """Cast the linear layers of `blocks` (TRELLIS's `convert_to_fp16`)."""
        cast_torso([self.blocks], dtype)
        self.torso_dtype = dtype

    def _input(self, feats: torch.Tensor) -> torch.Tensor:
        """The input layer, float32 out. Features in the half-precision torso's dtype (the
        files' float16, under TRELLIS's fp16 torso) on CUDA meet the weight rounded to that
        dtype with float32 accumulation: 4.5 -> 0.6 ms per 4 x 32k voxels on an H200, within
        2e-4 of the float32 layer, below the float16 rounding its output gets next
        (bench/probe_gpu_stages.py --only slatin); anything else runs in float32, as TRELLIS."""
        layer = self.input_layer
        if not (feats.is_cuda and feats.dtype == self.torso_dtype != torch.float32):
            return layer(feats.float())
        weight = getattr(self, "_half_input_weight", None)
        if weight is None or weight.device != feats.device or weight.dtype != feats.dtype:
            weight = self._half_input_weight = layer.weight.detach().to(feats.dtype)  # once per placement
        return torch.addmm(layer.bias, feats, weight.t(), out_dtype=torch.float32)

    def forward(self, feats: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """Encode voxel features to the posterior mean.

        Args:
            feats: (N, in_channels) per-voxel features, float32 or the torso's dtype.
            coords: integer (N, 4): batch index, then x, y, z voxel indices in [0, resolution).

        Returns:
            float32 (N, latent_channels), row i for voxel i: the posterior mean (no sampling).
        """
        h = self._input(feats) + self.pos_embedder(coords[:, 1:])  # (N, model_channels), float32
        h = h.to(self.torso_dtype)
        # flash attention's variable-length kernel where it runs (fp16/bf16 on a GPU): its
        # kernels took 8.5 ms against 11.1 for the padded buckets' SDPA per 4 x 32k-voxel
        # forward on an H200 (bench/probe_gpu_stages.py), with no padding gathers or masks
        packed = bool(self.blocks) and packed_attention_available(h, h.shape[-1] // self.blocks[0].attn.num_heads)
        partitions: dict[tuple[int | None, int], WindowPartition] = {}
        for block in self.blocks:
            key = (block.window_size, block.shift)
            if key not in partitions:
                partitions[key] = window_partition(coords, *key, packed=packed)
        h = self._packed_blocks(h, partitions) if packed else self._blocks(h, partitions)
        h = F.layer_norm(h.float(), h.shape[-1:])  # eps 1e-5, as TRELLIS's F.layer_norm
        return self.out_layer(h)[:, : self.latent_channels]  # mean; the rest is logvar
