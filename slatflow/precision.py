"""Numerics shared by the model stages."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    import torch


@contextlib.contextmanager
def exact_fp32(device: "torch.device", dtype: "torch.dtype") -> Iterator[None]:
    """With an fp32 torso on CUDA, turn off TF32 (cuDNN convs default to it) for true fp32."""
    import torch

    if device.type != "cuda" or dtype != torch.float32:
        yield
        return
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = saved
