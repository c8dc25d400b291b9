"""Layers shared by the encoders: float32 norms and TRELLIS's half-precision torso.

TRELLIS's `convert_module_to_f16` casts only the parameters of convolutions and linear
layers inside the transformer or residual torso; norms keep float32 parameters and compute
in float32 (`LayerNorm32`), whatever dtype flows through them.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

# The primitive modules whose parameters TRELLIS casts (its FP16_MODULES, less sparse convs).
TORSO_MODULES = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype, returned in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and self.weight is None:
            # CUDA's kernel reads half, normalizes in float32 and rounds once: the same math
            # without the two casting passes (SLat's block norms; an affine norm's float32
            # parameters need float32 input, so the SS encoder's keep the casts)
            return F.layer_norm(x, self.normalized_shape, None, None, self.eps)
        return super().forward(x.float()).to(x.dtype)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32, returned in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class ChannelLayerNorm32(LayerNorm32):
    """LayerNorm over the channel axis of a (B, C, *spatial) tensor, in float32.

    A channels-last input (the SS encoder's on CUDA) is normalized in place of its layout
    and stays channels-last; any other comes back contiguous, as before."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.movedim(1, -1).contiguous()  # (B, *spatial, C); no copy when x is channels-last
        h = super().forward(h).movedim(-1, 1)  # (B, C, *spatial), channels-last strides
        return h if _channels_last(x) else h.contiguous()


def _channels_last(x: torch.Tensor) -> bool:
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    return x.dim() in formats and not x.is_contiguous() and x.is_contiguous(memory_format=formats[x.dim()])


def cast_torso(torsos: Iterable[nn.Module], dtype: torch.dtype) -> None:
    """Cast the parameters of every TORSO_MODULES module inside `torsos` to `dtype`, in place."""
    for torso in torsos:
        for module in torso.modules():
            if isinstance(module, TORSO_MODULES):
                for param in module.parameters(recurse=False):
                    param.data = param.data.to(dtype)
