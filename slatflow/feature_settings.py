"""The features stage's settings and names, without its heavy imports.

Snakefile parsing (rules/common.smk) and metadata.csv need the output folder name of the
configured features and their provenance; both are here so that neither imports torch,
transformers or PIL (the CPU env of the metadata rule has none of them).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from slatflow.errors import ConfigError
from slatflow.grid import MAX_UINT8_RESOLUTION, TRELLIS_RESOLUTION

logger = logging.getLogger(__name__)

RANDOM_WEIGHTS = "random"
TRELLIS_IMAGE_SIZE = 518  # 37 x 37 patches of 14 pixels, the size DINOv2 was trained at
DEFAULT_HUB_WEIGHTS = "facebook/dinov2-with-registers-large"
# Written into each features/<name>/ folder: the settings and weights its files were made
# with (metadata.csv reads `random_weights` from it: one file per folder, not per asset).
PROVENANCE_FILE = "provenance.json"

Device = str  # "auto", "cpu", "cuda", "cuda:1", ...
ComputeDtype = Literal["auto", "float32", "bfloat16"]
ResizeWhere = Literal["auto", "pil", "device"]


@dataclass(frozen=True)
class Dinov2Arch:
    """The shape of a DINOv2 ViT with registers (the official `vit_*` builders' settings).

    Attributes:
        embed_dim: token width D (the feature channels written to the npz).
        depth: number of transformer blocks.
        num_heads: attention heads (head width D / num_heads).
        patch_size: pixels per patch side.
        num_register_tokens: register tokens after the cls token.
        pretrain_image_size: image side the position embeddings were trained at; the official
            `pos_embed` holds (pretrain_image_size / patch_size)^2 + 1 positions.
        mlp_ratio: MLP hidden width / D.
    """

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int = 14
    num_register_tokens: int = 4
    pretrain_image_size: int = 518
    mlp_ratio: int = 4

    @property
    def num_patch_positions(self) -> int:
        return (self.pretrain_image_size // self.patch_size) ** 2


# The torch.hub names TRELLIS passes as `--model`, which are also slatflow's feature names.
ARCHITECTURES: dict[str, Dinov2Arch] = {
    "dinov2_vits14_reg": Dinov2Arch(embed_dim=384, depth=12, num_heads=6),
    "dinov2_vitb14_reg": Dinov2Arch(embed_dim=768, depth=12, num_heads=12),
    "dinov2_vitl14_reg": Dinov2Arch(embed_dim=1024, depth=24, num_heads=16),
}

HUB_IDS: dict[str, str] = {
    "dinov2_vits14_reg": "facebook/dinov2-with-registers-small",
    "dinov2_vitb14_reg": "facebook/dinov2-with-registers-base",
    "dinov2_vitl14_reg": "facebook/dinov2-with-registers-large",
}


def resolve_arch(model_name: str) -> Dinov2Arch:
    """The architecture of a feature model name (`dinov2_vitl14_reg`, ...).

    Raises:
        ConfigError: the name is not one of ARCHITECTURES.
    """
    try:
        return ARCHITECTURES[model_name]
    except KeyError:
        raise ConfigError(
            f"features.model {model_name!r} is not a known DINOv2-with-registers model; "
            f"expected one of {sorted(ARCHITECTURES)}"
        ) from None


@dataclass(frozen=True)
class FeatureSettings:
    """How the features stage runs (the config's `features:` section).

    Attributes:
        model: feature model name, one of `slatflow.dinov2.ARCHITECTURES`
            (`dinov2_vitl14_reg` is TRELLIS's; `dinov2_vits14_reg` is the sample's).
        weights: an HF hub id, a local HF folder, an official `.pth`, or `random`.
        image_size: views are resized to this square size (a multiple of 14); 518 is
            TRELLIS's, smaller sizes are for the sample and tests only.
        batch_size: views per model forward.
        device: `auto` (CUDA when there is one), `cpu`, `cuda`, `cuda:N`.
        dtype: model compute dtype; `auto` is bf16 autocast on CUDA and float32 on the CPU.
        visibility: average each voxel over the views that see it (not TRELLIS's recipe).
        decode_workers: threads decoding (and, with `resize: pil`, resizing) PNGs.
        resize: where views are resized to `image_size`: `pil` in the decode threads,
            `device` with `lanczos_resize_rgba` (bit-identical to PIL, a quarter of the CPU
            time per view), `auto` = device on CUDA, PIL on the CPU.
        sample_memory_mb: bound on one `grid_sample` output (views x D x voxels x 4 bytes);
            voxels are processed in chunks under it.
        seed: the random initialisation's seed (weights `random` only).
        attention: the SDPA backend of the bf16 model (`slatflow.dinov2.ATTENTION_BACKENDS`).
        compile: `torch.compile` the bf16 model's block (a one-off cost per model worker).
        cuda_graph: replay the bf16 model's forward as a CUDA graph per batch shape.
        deflate_level: zlib level of the npz files (0 stores the arrays in stored deflate blocks).
        voxel_resolution: the voxel grid's side (`voxelize.resolution`): the voxel files'
            indices; the features' `indices` are uint8, so at most MAX_UINT8_RESOLUTION.
    """

    model: str = "dinov2_vitl14_reg"
    weights: str = DEFAULT_HUB_WEIGHTS
    image_size: int = TRELLIS_IMAGE_SIZE
    batch_size: int = 32
    device: Device = "auto"
    dtype: ComputeDtype = "auto"
    visibility: bool = False
    decode_workers: int = 8
    resize: ResizeWhere = "auto"
    sample_memory_mb: int = 1024
    seed: int = 0
    attention: str = "auto"
    compile: bool = True
    cuda_graph: bool = True
    deflate_level: int = 0
    voxel_resolution: int = TRELLIS_RESOLUTION

    def __post_init__(self):
        arch = resolve_arch(self.model)
        if self.image_size <= 0 or self.image_size % arch.patch_size:
            raise ConfigError(f"features.image_size {self.image_size} is not a positive multiple of {arch.patch_size}")
        for name in ("batch_size", "decode_workers", "sample_memory_mb"):
            if getattr(self, name) < 1:
                raise ConfigError(f"features.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.deflate_level <= 9:
            raise ConfigError(f"features.deflate_level must be in 0..9, got {self.deflate_level}")
        if not 1 <= self.voxel_resolution <= MAX_UINT8_RESOLUTION:
            raise ConfigError(f"voxelize.resolution {self.voxel_resolution}: the features' uint8 indices "
                              f"hold a grid of at most {MAX_UINT8_RESOLUTION}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ConfigError(f"features.dtype {self.dtype!r} is not one of auto, float32, bfloat16")
        if self.attention not in ("auto", "cudnn", "flash", "efficient", "math"):
            raise ConfigError(f"features.attention {self.attention!r} is not one of auto, cudnn, flash, efficient, math")
        if self.resize not in ("auto", "pil", "device"):
            raise ConfigError(f"features.resize {self.resize!r} is not one of auto, pil, device")
        other = next((name for name, hub in HUB_IDS.items() if hub == self.weights and name != self.model), None)
        if other:
            raise ConfigError(f"features.weights {self.weights!r} are {other}'s, not {self.model}'s; "
                              f"use {HUB_IDS[self.model]}")

    @classmethod
    def from_config(
        cls, section: dict, threads: int | None = None, voxel_resolution: int = TRELLIS_RESOLUTION
    ) -> "FeatureSettings":
        """Settings from the config's `features:` section (schema-validated keys).

        Args:
            section: `config["features"]`; `threads` there is the rule's thread count.
            threads: the job's threads (decode workers); defaults to the section's.
            voxel_resolution: `config["voxelize"]["resolution"]`, the grid the voxels are on.
        """
        values = dict(section)
        configured_threads = values.pop("threads", None)
        values["decode_workers"] = threads or configured_threads or cls.decode_workers
        return cls(**values, voxel_resolution=voxel_resolution)

    def output_settings(self) -> dict:
        """What changes the output files: the rule's params (a change re-runs the assets)."""
        return {
            "weights": self.weights,
            "image_size": self.image_size,
            "device": self.device,
            "dtype": self.dtype,
            "visibility": self.visibility,
            "seed": self.seed,
        }

    @property
    def feature_name(self) -> str:
        """The output folder name: the model's, plus a suffix for each non-TRELLIS setting
        (`_<size>px`, `_vis`, `_random`), so features made another way never overwrite, or
        pass for, TRELLIS's."""
        name = self.model
        if self.image_size != TRELLIS_IMAGE_SIZE:
            name += f"_{self.image_size}px"
        if self.visibility:
            name += "_vis"
        if self.weights == RANDOM_WEIGHTS:
            name += "_random"
        return name


def read_random_weights_flags(features_dir: str | os.PathLike) -> dict[str, bool]:
    """{feature folder name: its files were made with random weights}, from provenance.json."""
    flags = {}
    features_dir = Path(features_dir)
    if not features_dir.is_dir():
        return flags
    for entry in os.scandir(features_dir):
        path = Path(entry.path) / PROVENANCE_FILE
        if entry.is_dir() and path.is_file():
            try:
                flags[entry.name] = bool(json.loads(path.read_text())["random_weights"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                logger.warning("unreadable %s: %s", path, exc)
    return flags
