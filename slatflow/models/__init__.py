"""TRELLIS's encoders in pure PyTorch (no spconv, flash-attn or xformers) and their loading."""

from slatflow.models.checkpoint import LoadedEncoder, load_encoder
from slatflow.models.names import (
    DEFAULT_NAMES,
    DEFAULT_SPECS,
    HUB_REPO,
    OFFICIAL_CONFIGS,
    RANDOM_SPEC,
    encoder_name,
    latent_folder_names,
)

__all__ = [
    "DEFAULT_NAMES",
    "DEFAULT_SPECS",
    "HUB_REPO",
    "OFFICIAL_CONFIGS",
    "RANDOM_SPEC",
    "LoadedEncoder",
    "encoder_name",
    "latent_folder_names",
    "load_encoder",
]
