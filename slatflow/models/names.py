"""Encoder output-folder names and the released encoders' configs (no torch anywhere).

Snakemake parsing and metadata.csv need the names of the latent folders; this module gives
them without importing torch, even lazily.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

EncoderKind = Literal["ss", "slat"]

RANDOM_SPEC = "random"
HUB_REPO = "microsoft/TRELLIS-image-large"

# The released encoders' json configs (microsoft/TRELLIS-image-large, ckpts/<name>.json);
# `random` builds these architectures.
OFFICIAL_CONFIGS: dict[str, dict[str, Any]] = {
    "ss_enc_conv3d_16l8_fp16": {
        "name": "SparseStructureEncoder",
        "args": {
            "in_channels": 1,
            "latent_channels": 8,
            "num_res_blocks": 2,
            "num_res_blocks_middle": 2,
            "channels": [32, 128, 512],
            "use_fp16": True,
        },
    },
    "slat_enc_swin8_B_64l8_fp16": {
        "name": "SLatEncoder",
        "args": {
            "resolution": 64,
            "in_channels": 1024,
            "model_channels": 768,
            "latent_channels": 8,
            "num_blocks": 12,
            "num_heads": 12,
            "mlp_ratio": 4,
            "attn_mode": "swin",
            "window_size": 8,
            "use_fp16": True,
        },
    },
}
DEFAULT_NAMES: dict[EncoderKind, str] = {
    "ss": "ss_enc_conv3d_16l8_fp16",
    "slat": "slat_enc_swin8_B_64l8_fp16",
}
# Class names a checkpoint json may give, per encoder kind (Elastic* differs only in training).
CLASS_NAMES: dict[EncoderKind, tuple[str, ...]] = {
    "ss": ("SparseStructureEncoder",),
    "slat": ("SLatEncoder", "ElasticSLatEncoder"),
}
# The config's default specs: the released checkpoints on the hub.
DEFAULT_SPECS: dict[EncoderKind, str] = {kind: f"{HUB_REPO}/ckpts/{name}" for kind, name in DEFAULT_NAMES.items()}


def random_config(kind: EncoderKind, random_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """The json config of a "random" encoder: the released one with `random_args` merged in."""
    official = OFFICIAL_CONFIGS[DEFAULT_NAMES[kind]]
    return {"name": official["name"], "args": {**official["args"], **(random_args or {})}}


def encoder_name(spec: str, kind: EncoderKind, random_args: dict[str, Any] | None = None) -> str:
    """The output folder name of the encoder `spec` names (no file access, no torch import).

    A checkpoint is named after its file (TRELLIS's `enc_pretrained.split("/")[-1]`);
    random weights get their own name, `<released name>_random`, or `_random_custom` when
    `random_args` change the architecture, so they never share a folder with real latents.
    """
    if spec == RANDOM_SPEC:
        custom = random_config(kind, random_args) != OFFICIAL_CONFIGS[DEFAULT_NAMES[kind]]
        return f"{DEFAULT_NAMES[kind]}_random" + ("_custom" if custom else "")
    return Path(spec).name


def latent_folder_names(section: dict[str, Any]) -> tuple[str, str]:
    """(<ss_enc>, <slat_enc>): the folder names of a config's `latents:` section."""
    ss = encoder_name(section.get("ss_encoder", DEFAULT_SPECS["ss"]), "ss", section.get("random_ss_args"))
    slat = encoder_name(section.get("slat_encoder", DEFAULT_SPECS["slat"]), "slat", section.get("random_slat_args"))
    return ss, slat
