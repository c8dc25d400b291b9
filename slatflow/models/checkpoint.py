"""Load TRELLIS encoder checkpoints (`<name>.json` + `<name>.safetensors`) strictly.

A checkpoint is named by a spec string, as TRELLIS's `models.from_pretrained` takes it:
- a local path without suffix, `/ckpts/ss_enc_conv3d_16l8_fp16`, where `<path>.json` and
  `<path>.safetensors` exist;
- a Hugging Face hub path, `microsoft/TRELLIS-image-large/ckpts/ss_enc_conv3d_16l8_fp16`
  (repo id, then the file path without suffix), read through `huggingface_hub`'s cache, so
  `HF_HUB_OFFLINE=1` with a filled cache works without a network;
- `random`: the official architecture with seeded random weights (pipeline tests only).

The json is `{"name": <class name>, "args": {<constructor arguments>}}`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slatflow.errors import ConfigError
from slatflow.logs import warn_random_weights
from slatflow.models.names import CLASS_NAMES, RANDOM_SPEC, EncoderKind, encoder_name, random_config

if TYPE_CHECKING:  # torch stays unimported until a model is built (Snakefile parsing, metadata)
    import torch.nn as nn

logger = logging.getLogger(__name__)

# Seed of `random` weights: every job of a run must build the same random model.
RANDOM_SEED = 0


@dataclass(frozen=True)
class LoadedEncoder:
    """An encoder with where it came from.

    Attributes:
        name: the output folder name (`ss_enc_conv3d_16l8_fp16`, ...).
        kind: "ss" or "slat".
        model: the module, float32, on the CPU, in eval mode.
        config: the checkpoint's `{"name", "args"}`.
        random_weights: True when the weights are random, not a checkpoint's.
        source: the spec it was loaded from.
    """

    name: str
    kind: EncoderKind
    model: "nn.Module"
    config: dict[str, Any]
    random_weights: bool
    source: str


def resolve_checkpoint_files(spec: str) -> tuple[Path, Path]:
    """Find `<spec>.json` and `<spec>.safetensors` locally, or download them from the hub.

    Raises:
        ConfigError: neither a local checkpoint nor a hub file could be found.
    """
    local = os.path.expanduser(spec)
    local_config, local_weights = Path(f"{local}.json"), Path(f"{local}.safetensors")
    if local_config.is_file() and local_weights.is_file():
        return local_config, local_weights
    parts = spec.split("/")
    looks_local = spec.startswith((os.sep, ".", "~")) or len(parts) < 3
    if looks_local:
        raise ConfigError(
            f"encoder checkpoint {spec!r}: expected {local_config} and {local_weights} "
            "(a local path without suffix), a hub path '<org>/<repo>/<file path>', or 'random'"
        )
    from huggingface_hub import hf_hub_download

    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        config = hf_hub_download(repo_id, f"{filename}.json")
        weights = hf_hub_download(repo_id, f"{filename}.safetensors")
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types; all mean "not found"
        raise ConfigError(
            f"encoder checkpoint {spec!r}: no local {local_config} + {local_weights}, and the hub "
            f"download of {filename}.json/.safetensors from {repo_id} failed: {type(exc).__name__}: "
            f"{exc}. Offline, fill the cache (HF_HOME/HF_HUB_CACHE) and set HF_HUB_OFFLINE=1, "
            "or point the config at a local copy."
        ) from exc
    return Path(config), Path(weights)


def build_model(config: dict[str, Any], kind: EncoderKind) -> "nn.Module":
    """Construct the encoder a checkpoint json describes (float32, CPU, default init)."""
    from slatflow.models.slat_encoder import SLatEncoder
    from slatflow.models.sparse_structure import SparseStructureEncoder

    name = config.get("name")
    if name not in CLASS_NAMES[kind]:
        raise ConfigError(f"checkpoint class {name!r} is not a {kind} encoder; expected one of {CLASS_NAMES[kind]}")
    model_class = SparseStructureEncoder if kind == "ss" else SLatEncoder
    try:
        return model_class(**config.get("args", {}))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"checkpoint args {config.get('args')} do not build {name}: {exc}") from exc


def load_encoder(spec: str, kind: EncoderKind, random_args: dict[str, Any] | None = None) -> LoadedEncoder:
    """Load the encoder `spec` names, with its weights loaded strictly.

    Args:
        spec: a local path or hub path without suffix, or "random".
        kind: "ss" (SparseStructureEncoder) or "slat" (SLatEncoder).
        random_args: with "random", constructor args that replace the official ones
            (a smaller architecture for fast pipeline tests).

    Raises:
        ConfigError: missing files, a wrong class, or a state dict that does not match the
            architecture key for key and shape.
    """
    import torch
    from safetensors.torch import load_file

    if spec == RANDOM_SPEC:
        config = random_config(kind, random_args)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            model = build_model(config, kind)
        name = encoder_name(spec, kind, random_args)
        warn_random_weights(logger, f"{kind} encoder {name}")
        return LoadedEncoder(name, kind, model.eval(), config, random_weights=True, source=spec)

    config_path, weights_path = resolve_checkpoint_files(spec)
    try:
        config = json.loads(Path(config_path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"encoder checkpoint {spec!r}: unreadable config {config_path}: {exc}") from exc
    model = build_model(config, kind)
    state = load_file(str(weights_path))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ConfigError(f"encoder checkpoint {weights_path} does not match {config['name']}: {exc}") from exc
    logger.info("loaded %s encoder %s from %s (%d tensors)", kind, config["name"], weights_path, len(state))
    return LoadedEncoder(encoder_name(spec, kind), kind, model.eval(), config, random_weights=False, source=spec)
