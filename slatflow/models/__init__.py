"""TRELLIS's encoders in pure PyTorch (no spconv, flash-attn or xformers) and their loading."""

from slatflow.models.checkpoint import (
    DEFAULT_NAMES,
    HUB_REPO,
    OFFICIAL_CONFIGS,
    RANDOM_SPEC,
    LoadedEncoder,
    encoder_name,
    load_encoder,
)

__all__ = [
    "DEFAULT_NAMES",
    "HUB_REPO",
    "OFFICIAL_CONFIGS",
    "RANDOM_SPEC",
    "LoadedEncoder",
    "encoder_name",
    "load_encoder",
]
