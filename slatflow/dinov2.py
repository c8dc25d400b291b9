"""DINOv2 with registers: building the model and loading its weights offline.

The features stage runs transformers' `Dinov2WithRegistersModel`, which computes exactly
what the official `facebookresearch/dinov2` model computes (same blocks, same position-
embedding interpolation: bicubic, antialiased, no offset, as the `*_reg` hub models set it).
Weights come from one of four places, chosen by one string (`features.weights`):

- an HF hub id (`facebook/dinov2-with-registers-large`): `from_pretrained`, which reads the
  local HF cache first, so a cluster without internet works once the cache is filled
  (`hf download ...`, then `HF_HUB_OFFLINE=1`);
- a local HF-format folder (`config.json` + `model.safetensors`);
- the official checkpoint `dinov2_vitl14_reg4_pretrain.pth`, converted on load (fused qkv
  split into q, k, v; `lsN.gamma` -> `layer_scaleN.lambda1`; ...) and loaded strictly;
- `random`: a seeded random initialisation, for tests and the sample; said loudly in the log.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from slatflow.errors import ConfigError
from slatflow.feature_settings import (  # noqa: F401 - architectures re-exported with the model code
    ARCHITECTURES,
    HUB_IDS,
    RANDOM_WEIGHTS,
    Dinov2Arch,
    resolve_arch,
)
from slatflow.logs import warn_random_weights

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

OFFICIAL_CHECKPOINT_SUFFIXES = (".pth", ".pt")


# Official block keys -> the HF hub checkpoints' names (the layout of the published
# `model.safetensors`); the fused `attn.qkv` is split separately.
_BLOCK_KEYS = {
    "norm1": "norm1",
    "attn.proj": "attention.output.dense",
    "ls1.gamma": "layer_scale1.lambda1",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "ls2.gamma": "layer_scale2.lambda1",
}
_QKV_KEYS = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
_TOP_KEYS = {
    "cls_token": "embeddings.cls_token",
    "mask_token": "embeddings.mask_token",
    "register_tokens": "embeddings.register_tokens",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
# transformers >= 5.2x renamed the attention modules; hub checkpoints keep the names above
# and transformers renames them on load, so a state dict we build must do the same.
_RENAMED_ATTENTION = {
    "attention.attention.query": "attention.q_proj",
    "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj",
    "attention.output.dense": "attention.o_proj",
}


@dataclass
class LoadedDinov2:
    """A DINOv2 model ready to run, and where its weights came from.

    Attributes:
        model: transformers `Dinov2WithRegistersModel`, eval mode, float32, on the CPU.
        arch: its architecture.
        source: the `weights` string it was loaded from.
        random_weights: True when the weights are a random initialisation.
    """

    model: "torch.nn.Module"
    arch: Dinov2Arch
    source: str
    random_weights: bool


def hf_config(arch: Dinov2Arch):
    """The transformers config of `arch` (what the hub's config.json holds for it)."""
    from transformers import Dinov2WithRegistersConfig

    return Dinov2WithRegistersConfig(
        hidden_size=arch.embed_dim,
        num_hidden_layers=arch.depth,
        num_attention_heads=arch.num_heads,
        mlp_ratio=arch.mlp_ratio,
        image_size=arch.pretrain_image_size,
        patch_size=arch.patch_size,
        num_register_tokens=arch.num_register_tokens,
        layerscale_value=1.0,
        layer_norm_eps=1e-6,
        hidden_act="gelu",  # exact erf GELU, as nn.GELU in the official blocks
        qkv_bias=True,
        use_swiglu_ffn=False,
    )


def _build_model(arch: Dinov2Arch, on_meta: bool):
    from transformers import Dinov2WithRegistersModel

    config = hf_config(arch)
    config._attn_implementation = "sdpa"  # flash / memory-efficient kernels on the GPU
    if on_meta:  # no time spent on a random init that the checkpoint overwrites
        import torch

        with torch.device("meta"):
            return Dinov2WithRegistersModel(config)
    return Dinov2WithRegistersModel(config)


def random_dinov2(arch: Dinov2Arch, seed: int = 0):
    """A randomly initialised model of `arch`, reproducible from `seed`.

    The distributions are transformers' (weights and position/cls embeddings N(0, 0.02),
    biases, mask and register tokens 0, norms 1/0, layer scales 1), drawn with plain
    `normal_` instead of its truncated normal: the same in effect, and seconds faster per job
    on a small CPU (transformers' init of ViT-L takes ~20 s there).
    """
    import torch

    model = _build_model(arch, on_meta=True).to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("lambda1") or (name.endswith("weight") and parameter.ndim == 1):
                parameter.fill_(1.0)  # layer scales and LayerNorm weights
            elif name.endswith(("bias", "mask_token", "register_tokens")):
                parameter.zero_()
            else:
                parameter.normal_(0.0, 0.02, generator=generator)
    return model.eval()


def convert_official_state_dict(
    state_dict: Mapping[str, "torch.Tensor"], arch: Dinov2Arch
) -> dict[str, "torch.Tensor"]:
    """Official DINOv2 checkpoint keys -> HF hub checkpoint keys, one for one.

    Args:
        state_dict: the official `*_pretrain.pth` content (cls_token, mask_token,
            register_tokens, pos_embed, patch_embed.proj, blocks.i.*, norm).
        arch: the architecture it must match.

    Returns:
        The same tensors under the hub names; the fused qkv (3D, D) is split in its row
        order q, k, v (the official attention reshapes its output as (B, N, 3, H, D/H)).

    Raises:
        ConfigError: a key is missing or unexpected, or a shape is not `arch`'s.
    """
    d = arch.embed_dim
    expected_shapes = {
        "cls_token": (1, 1, d),
        "mask_token": (1, d),
        "register_tokens": (1, arch.num_register_tokens, d),
        "pos_embed": (1, arch.num_patch_positions + 1, d),
        "patch_embed.proj.weight": (d, 3, arch.patch_size, arch.patch_size),
    }
    converted: dict[str, torch.Tensor] = {}
    remaining = dict(state_dict)
    for official, hub in _TOP_KEYS.items():
        converted[hub] = _pop(remaining, official)
    for i in range(arch.depth):
        prefix = f"blocks.{i}."
        for suffix in ("weight", "bias"):
            qkv = _pop(remaining, f"{prefix}attn.qkv.{suffix}")
            if qkv.shape[0] != 3 * d:
                raise ConfigError(f"official checkpoint: {prefix}attn.qkv.{suffix} has shape "
                                  f"{tuple(qkv.shape)}, expected first dim {3 * d}")
            for hub, part in zip(_QKV_KEYS, qkv.chunk(3, dim=0)):
                converted[f"encoder.layer.{i}.{hub}.{suffix}"] = part.clone()
        for official, hub in _BLOCK_KEYS.items():
            names = [official] if official.endswith("gamma") else [f"{official}.weight", f"{official}.bias"]
            for name in names:
                hub_name = hub + name[len(official):]
                converted[f"encoder.layer.{i}.{hub_name}"] = _pop(remaining, prefix + name)
    if remaining:
        raise ConfigError(
            f"official checkpoint has {len(remaining)} keys that a {arch.depth}-block DINOv2 "
            f"with registers does not: {sorted(remaining)[:5]}"
        )
    for official, shape in expected_shapes.items():
        got = tuple(converted[_TOP_KEYS[official]].shape)
        if got != shape:
            raise ConfigError(f"official checkpoint: {official} has shape {got}, expected {shape} for {arch}")
    return converted


def _pop(state_dict: dict, key: str):
    try:
        return state_dict.pop(key)
    except KeyError:
        raise ConfigError(f"official checkpoint lacks the key {key!r}") from None


def _to_installed_names(hub_state: dict, model_keys: set[str]) -> dict:
    """Rename hub-layout keys to the installed transformers' module names, where they differ."""
    renamed = {}
    for key, value in hub_state.items():
        if key not in model_keys:
            for old, new in _RENAMED_ATTENTION.items():
                key = key.replace(old, new)
        renamed[key] = value
    return renamed


def load_official_checkpoint(path: str | os.PathLike, arch: Dinov2Arch):
    """Load an official `dinov2_*_reg4_pretrain.pth` into transformers' model, strictly.

    Raises:
        ConfigError: the file is missing or unreadable, or its keys or shapes are not `arch`'s.
    """
    import torch

    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as exc:
        raise ConfigError(f"cannot read the DINOv2 checkpoint {path}: {exc}") from exc
    if isinstance(state_dict, Mapping) and "model" in state_dict and "pos_embed" not in state_dict:
        state_dict = state_dict["model"]  # training checkpoints nest the weights
    return model_from_official_state_dict(state_dict, arch, source=str(path))


def model_from_official_state_dict(state_dict: Mapping[str, "torch.Tensor"], arch: Dinov2Arch, source: str = "state dict"):
    """transformers' model holding an official state dict, loaded strictly (no random init).

    Raises:
        ConfigError: keys or shapes are not `arch`'s.
    """
    hub_state = convert_official_state_dict(state_dict, arch)
    model = _build_model(arch, on_meta=True)
    installed = _to_installed_names(hub_state, set(model.state_dict()))
    try:
        model.load_state_dict(installed, strict=True, assign=True)
    except RuntimeError as exc:
        raise ConfigError(f"DINOv2 checkpoint {source} does not fit {arch}: {exc}") from exc
    return model.float().eval()


def load_hf_model(name_or_path: str, *, cache_dir: str | None = None, local_files_only: bool = False):
    """`Dinov2WithRegistersModel.from_pretrained` (a hub id, or a local HF-format folder).

    Raises:
        ConfigError: nothing loadable under that name (offline and not cached, say).
    """
    import torch
    from transformers import Dinov2WithRegistersModel

    try:
        model = Dinov2WithRegistersModel.from_pretrained(
            name_or_path,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            attn_implementation="sdpa",
            dtype=torch.float32,
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot load DINOv2 weights {name_or_path!r}: {exc}. Offline, fill the HF cache first "
            f"(`hf download {name_or_path}`) or set features.weights to a local folder or the "
            f"official .pth"
        ) from exc
    return model.eval()


def _check_arch(model, arch: Dinov2Arch, source: str) -> None:
    config = model.config
    got = (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.patch_size,
           config.num_register_tokens, bool(config.use_swiglu_ffn))
    want = (arch.embed_dim, arch.depth, arch.num_heads, arch.patch_size, arch.num_register_tokens, False)
    if got != want:
        raise ConfigError(
            f"DINOv2 weights {source!r} are (hidden, layers, heads, patch, registers, swiglu) = {got}, "
            f"but the feature model expects {want}"
        )


def load_dinov2(
    arch: Dinov2Arch,
    weights: str,
    *,
    model_name: str = "dinov2",
    seed: int = 0,
    cache_dir: str | None = None,
    local_files_only: bool = False,
) -> LoadedDinov2:
    """Load DINOv2 weights from a hub id, a local HF folder, an official .pth, or `random`.

    Args:
        arch: the architecture the weights must have.
        weights: `random`, a path to an official `.pth`, a local HF folder, or an HF hub id.
        model_name: used in log lines only.
        seed: the random initialisation's seed (`random` only).
        cache_dir, local_files_only: passed to `from_pretrained` (hub ids only).

    Returns:
        The float32 model in eval mode on the CPU, with its provenance.

    Raises:
        ConfigError: the weights cannot be found or read, or do not match `arch`.
    """
    if weights == RANDOM_WEIGHTS:
        warn_random_weights(logger, model_name)
        return LoadedDinov2(random_dinov2(arch, seed), arch, weights, random_weights=True)
    path = Path(weights).expanduser()
    if path.suffix in OFFICIAL_CHECKPOINT_SUFFIXES:
        if not path.is_file():
            raise ConfigError(f"features.weights: official checkpoint {path} does not exist")
        model = load_official_checkpoint(path, arch)
    elif path.is_dir():
        model = load_hf_model(str(path))
    elif weights.startswith((".", "/", "~")) or weights.count("/") > 1:  # a hub id is "org/name"
        raise ConfigError(f"features.weights: {weights!r} looks like a path but is not a folder or a .pth file")
    else:
        model = load_hf_model(weights, cache_dir=cache_dir, local_files_only=local_files_only)
    _check_arch(model, arch, weights)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    logger.info("loaded %s weights from %s", model_name, weights)
    return LoadedDinov2(model, arch, weights, random_weights=False)


def prenorm_patch_tokens(model, pixels: "torch.Tensor") -> "torch.Tensor":
    """DINOv2's `x_prenorm` patch tokens as feature maps.

    Args:
        model: a `Dinov2WithRegistersModel`.
        pixels: float (B, 3, S, S), normalized images; S a multiple of the patch size.

    Returns:
        (B, D, S/p, S/p) in the model's compute dtype: the last block's output BEFORE the
        final LayerNorm, without the cls and register tokens, rows = image y, cols = image x.
    """
    batch, _, size, _ = pixels.shape
    grid = size // model.config.patch_size
    hidden = model.embeddings(pixels)  # (B, 1 + R + P, D)
    hidden = model.encoder(hidden).last_hidden_state  # (B, 1 + R + P, D), no final norm
    tokens = hidden[:, 1 + model.config.num_register_tokens :]  # (B, P, D), row-major patches
    return tokens.transpose(1, 2).reshape(batch, -1, grid, grid)  # (B, D, grid, grid)


# SDPA backends by name; "auto" is torch's own choice, the fastest on an H200 at DINOv2's
# shapes (1374 tokens, head width 64): 0.345 s per asset uncompiled against cuDNN 0.347, flash
# 0.376, memory-efficient 0.493 (bench/bench_pipeline_gpu.py).
ATTENTION_BACKENDS = ("auto", "cudnn", "flash", "efficient", "math")


def _sdpa_backends(name: str):
    from torch.nn.attention import SDPBackend

    by_name = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }
    if name not in ATTENTION_BACKENDS:
        raise ConfigError(f"attention backend {name!r} is not one of {ATTENTION_BACKENDS}")
    if name == "auto":
        return None
    # the named one first; the others stay as fallbacks for shapes it does not take
    return [by_name[name]] + [b for key, b in by_name.items() if key != name]


def _layer_tensor(state: Mapping[str, "torch.Tensor"], hub_name: str) -> "torch.Tensor":
    """A block parameter by its hub name, under whichever name the installed transformers uses."""
    if hub_name in state:
        return state[hub_name]
    for old, new in _RENAMED_ATTENTION.items():
        hub_name = hub_name.replace(old, new)
    return state[hub_name]


# Batch shapes with a captured CUDA graph per FusedDinov2 (each keeps its activations in a
# private pool: about 1-2 GB at 30 views of 518^2 by the tensors' sizes); an asset's views
# come in equal batches, so a stream of like assets needs one.
MAX_CUDA_GRAPHS = 4


def _shifted_norm(x, shift, weight, bias, eps: float, dtype):
    """LayerNorm of x + shift (float32, broadcast over rows), cast to the matmuls' dtype."""
    import torch.nn.functional as F

    return F.layer_norm(x + shift, (x.shape[-1],), weight, bias, eps).to(dtype)


def _running_bias_sums(blocks) -> tuple[list[tuple["torch.Tensor", "torch.Tensor"]], "torch.Tensor"]:
    """What a residual stream without the output projections' biases lacks: per block, the
    float32 sum of those biases before its first and before its second LayerNorm; and after
    the last block."""
    import torch

    running = torch.zeros_like(blocks[0][0]) if blocks else torch.zeros(0)
    shifts = []
    for block in blocks:
        attention_bias, mlp_bias = block[5].float(), block[11].float()
        shifts.append((running, running + attention_bias))
        running = running + attention_bias + mlp_bias
    return shifts, running


def _residual_addmm(x: "torch.Tensor", a: "torch.Tensor", weight: "torch.Tensor") -> "torch.Tensor":
    """x += a @ weight.T in place, x float32 and a, weight in the matmuls' dtype: the add is
    the matmul's own beta=1 term (cuBLAS reads x as C), not a kernel of its own."""
    import torch

    if a.dtype == x.dtype:
        return x.addmm_(a, weight.t())
    return torch.addmm(x, a, weight.t(), out_dtype=x.dtype, out=x)


_EPILOGUE_SUPPORT: dict[tuple, bool] = {}


def _epilogues_supported(device: "torch.device", dtype: "torch.dtype") -> bool:
    """Whether this build runs `_block_epilogues`' two matmul forms on `device` (probed once)."""
    import torch

    key = (str(device), dtype)
    if key not in _EPILOGUE_SUPPORT:
        try:
            a = torch.ones(16, 16, device=device, dtype=dtype)
            c = torch.ones(16, 16, device=device)
            _residual_addmm(c, torch._addmm_activation(a[0], a, a.t(), use_gelu=True), a)
            _EPILOGUE_SUPPORT[key] = bool(torch.isfinite(c).all())
        except (RuntimeError, TypeError, NotImplementedError) as exc:  # CPU half precision, older builds
            log = logger.warning if device.type == "cuda" else logger.debug
            log("matmul epilogues unavailable on %s (%s); residual adds and GELU run as kernels",
                device, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            _EPILOGUE_SUPPORT[key] = False
    return _EPILOGUE_SUPPORT[key]


class FusedDinov2:
    """DINOv2's `x_prenorm` forward for inference, rebuilt from a transformers model's weights.

    transformers' blocks run q, k and v as three matmuls, the layer scales as separate
    multiplies and, under autocast, re-cast every weight on every call. Here each block's
    weights are prepared once in the compute dtype: q, k, v fused into one (3D, D) matmul,
    the layer scales folded into the output projections (ls * (W x + b) = (ls W) x + ls b),
    attention through `scaled_dot_product_attention` with a chosen backend. The residual
    stream and the LayerNorms stay float32, as under autocast, so the result is transformers'
    bf16-autocast result up to rounding (tests/test_features.py checks fp32 against it).

    Args:
        model: a `Dinov2WithRegistersModel` (its embeddings' tensors are read, not copied).
        dtype: the matmuls' dtype (torch.bfloat16 on a GPU; float32 gives the reference).
        attention: one of ATTENTION_BACKENDS.
        compile: `torch.compile` the LayerNorms of the epilogue blocks, or the whole eager
            block where the epilogues are unavailable (one graph shared by all blocks).
        cuda_graph: on CUDA, capture the whole forward of each batch shape as a CUDA graph
            (at most MAX_CUDA_GRAPHS shapes) and replay it: one launch instead of ~300, so
            the calling thread neither waits on a full launch queue holding the GIL nor
            stalls the threads that decode and write other assets.
        epilogues: run the residual adds and the MLP's GELU inside the matmuls (cuBLASLt
            epilogues on CUDA) instead of as kernels of their own, where the build can (see
            `_block_epilogues`). cuBLASLt's GELU is the tanh approximation (at most 5e-4 from
            the exact one, below a bfloat16 rounding); the CPU's is exact.
    """

    def __init__(self, model, dtype: "torch.dtype", attention: str = "auto", compile: bool = False,
                 cuda_graph: bool = False, epilogues: bool = True):
        import torch

        self.model = model
        self.cuda_graph = cuda_graph
        self.epilogues = epilogues
        self._graphs: dict[tuple, tuple] = {}  # (shape, dtype, device) -> (graph, static input, static output)
        self._cache: dict[tuple, object] = {}  # the patch projection and position embeddings, per device and size
        self.dtype = dtype
        self.backends = _sdpa_backends(attention)
        config = model.config
        self.num_heads = config.num_attention_heads
        self.eps = config.layer_norm_eps
        self.num_register_tokens = config.num_register_tokens
        self.patch_size = config.patch_size
        self.blocks = []
        with torch.no_grad():
            for layer in model.encoder.layer:
                state = layer.state_dict()
                get = lambda name: _layer_tensor(state, name).float()  # noqa: E731
                ls1, ls2 = get("layer_scale1.lambda1"), get("layer_scale2.lambda1")
                qkv_w = torch.cat([get(f"attention.attention.{n}.weight") for n in ("query", "key", "value")])
                qkv_b = torch.cat([get(f"attention.attention.{n}.bias") for n in ("query", "key", "value")])
                self.blocks.append((
                    get("norm1.weight"), get("norm1.bias"),
                    qkv_w.to(dtype), qkv_b.to(dtype),
                    (get("attention.output.dense.weight") * ls1[:, None]).to(dtype),
                    (get("attention.output.dense.bias") * ls1).to(dtype),
                    get("norm2.weight"), get("norm2.bias"),
                    get("mlp.fc1.weight").to(dtype), get("mlp.fc1.bias").to(dtype),
                    (get("mlp.fc2.weight") * ls2[:, None]).to(dtype), (get("mlp.fc2.bias") * ls2).to(dtype),
                ))  # fmt: skip
        self.shifts, self.final_shift = _running_bias_sums(self.blocks)
        self._block = torch.compile(self._block_eager, dynamic=False) if compile else self._block_eager
        self._norm = torch.compile(_shifted_norm, dynamic=False) if compile else _shifted_norm

    def _block_eager(self, x, n1w, n1b, qkv_w, qkv_b, o_w, o_b, n2w, n2b, f1w, f1b, f2w, f2b):
        """One block: x float32 (B, T, D) -> float32 (B, T, D)."""
        import torch.nn.functional as F

        batch, tokens, width = x.shape
        h = F.layer_norm(x, (width,), n1w, n1b, self.eps).to(self.dtype)
        q, k, v = F.linear(h, qkv_w, qkv_b).view(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, D/H)
        x = x + F.linear(attn.transpose(1, 2).reshape(batch, tokens, width), o_w, o_b)
        h = F.layer_norm(x, (width,), n2w, n2b, self.eps).to(self.dtype)
        return x + F.linear(F.gelu(F.linear(h, f1w, f1b)), f2w, f2b)

    def _block_epilogues(self, x, shape, shift1, shift2, n1w, n1b, qkv_w, qkv_b, o_w, _o_b, n2w, n2b, f1w, f1b, f2w, _f2b):
        """One block in place on a flat float32 residual stream x (B*T, D) that lacks the output
        projections' biases: shift1/shift2 carry their running sums (_running_bias_sums), added
        inside the LayerNorms' kernel, so each residual add can be the beta=1 term of its matmul
        (bfloat16 x bfloat16 + float32 -> float32), and the GELU is fc1's epilogue. Per block
        this saves the residual adds' and the GELU's passes over the activations."""
        import torch
        import torch.nn.functional as F

        batch, tokens = shape
        width = x.shape[1]
        h = self._norm(x, shift1, n1w, n1b, self.eps, self.dtype)
        q, k, v = F.linear(h, qkv_w, qkv_b).view(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch * tokens, width)
        _residual_addmm(x, attn, o_w)
        h = self._norm(x, shift2, n2w, n2b, self.eps, self.dtype)
        return _residual_addmm(x, torch._addmm_activation(f1b, h, f1w.t(), use_gelu=True), f2w)

    def to(self, device) -> "FusedDinov2":
        self.blocks = [tuple(t.to(device) for t in block) for block in self.blocks]
        self.shifts = [(s1.to(device), s2.to(device)) for s1, s2 in self.shifts]
        self.final_shift = self.final_shift.to(device)
        return self

    def __call__(self, pixels: "torch.Tensor") -> "torch.Tensor":
        """As `prenorm_patch_tokens`: float (B, 3, S, S) -> (B, D, S/p, S/p), in float32.

        Not thread-safe with `cuda_graph` (callers hold the device, as the extractor does)."""
        if self.cuda_graph and pixels.is_cuda:
            graphed = self._graph_for(pixels)
            if graphed is not None:
                graph, static_in, static_out = graphed
                static_in.copy_(pixels)
                graph.replay()
                return static_out.clone()  # the next replay overwrites static_out; a clone costs ~0.1 ms
        return self._forward(pixels)

    def _graph_for(self, pixels: "torch.Tensor"):
        """The captured forward for pixels' shape, captured now if new (None: run eagerly)."""
        import torch

        key = (tuple(pixels.shape), pixels.dtype, pixels.device)
        if key in self._graphs:
            return self._graphs[key]
        if len(self._graphs) >= MAX_CUDA_GRAPHS:
            return None
        static_in = pixels.clone()
        try:
            side = torch.cuda.Stream(pixels.device)
            side.wait_stream(torch.cuda.current_stream(pixels.device))
            with torch.cuda.stream(side):  # warm-up: compiles, and lets cuBLAS/cuDNN allocate, outside the capture
                for _ in range(2):
                    self._forward(static_in)
            torch.cuda.current_stream(pixels.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: other threads (decoding, pinning, copying other assets) stay free meanwhile
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                static_out = self._forward(static_in)
        except Exception as exc:  # noqa: BLE001 - a capture the build refuses: run eagerly from now on
            logger.warning("CUDA graph capture failed (%s: %s); the model runs without graphs",
                           type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            self.cuda_graph = False
            torch.cuda.synchronize(pixels.device)
            return None
        self._graphs[key] = (graph, static_in, static_out)
        return self._graphs[key]

    def _forward(self, pixels: "torch.Tensor") -> "torch.Tensor":
        import contextlib

        from torch.nn.attention import sdpa_kernel

        batch, _, size, _ = pixels.shape
        grid = size // self.patch_size
        with sdpa_kernel(self.backends, set_priority=True) if self.backends else contextlib.nullcontext():
            try:
                x = self._blocks(self._embed(pixels))  # (B, 1 + R + P, D) float32
            except Exception as exc:  # noqa: BLE001 - e.g. no C compiler for Triton: run eager
                if self._block == self._block_eager and self._norm == _shifted_norm:
                    raise
                logger.warning("torch.compile failed (%s: %s); the model runs uncompiled",
                               type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                self._block, self._norm = self._block_eager, _shifted_norm
                x = self._blocks(self._embed(pixels))  # afresh: the failed pass may have added in place
        tokens = x[:, 1 + self.num_register_tokens :]  # (B, P, D)
        return tokens.transpose(1, 2).reshape(batch, -1, grid, grid)

    def _embed(self, pixels: "torch.Tensor") -> "torch.Tensor":
        """transformers' embeddings (patch conv, cls token + position, registers), float32 out,
        with the patch conv as one matmul over the unfolded patches in the matmuls' dtype: for
        a stride-14 14x14 conv cuDNN picks a generic kernel, 4.6 ms per 50 views on an H200
        against 0.6 for the matmul."""
        import torch
        import torch.nn.functional as F

        batch, channels, height, width = pixels.shape
        p = self.patch_size
        rows, cols = height // p, width // p
        patches = (pixels[:, :, : rows * p, : cols * p].to(self.dtype)
                   .reshape(batch, channels, rows, p, cols, p).permute(0, 2, 4, 1, 3, 5)
                   .reshape(batch * rows * cols, channels * p * p))  # (B*P, C*p*p), rows of the conv's dot products
        weight, bias = self._patch_projection(pixels.device)
        tokens = F.linear(patches, weight, bias).view(batch, rows * cols, -1).float()  # (B, P, D)
        position = self._position_embeddings(height, width, pixels.device)  # (1, 1 + P, D) float32
        embeddings = self.model.embeddings
        cls = (embeddings.cls_token + position[:, :1]).expand(batch, -1, -1)
        registers = embeddings.register_tokens.expand(batch, -1, -1)
        return torch.cat([cls, registers, tokens + position[:, 1:]], dim=1)

    def _patch_projection(self, device) -> tuple["torch.Tensor", "torch.Tensor"]:
        key = ("patch", str(device))
        if key not in self._cache:
            conv = self.model.embeddings.patch_embeddings.projection
            self._cache[key] = (conv.weight.detach().reshape(conv.out_channels, -1).to(device, self.dtype),
                                conv.bias.detach().to(device, self.dtype))
        return self._cache[key]

    def _position_embeddings(self, height: int, width: int, device) -> "torch.Tensor":
        """transformers' (interpolated) position embeddings for this image size, computed once."""
        import torch

        key = ("position", height, width, str(device))
        if key not in self._cache:
            embeddings = self.model.embeddings
            tokens = torch.empty(1, 1 + (height // self.patch_size) * (width // self.patch_size),
                                 embeddings.cls_token.shape[-1], device=device)  # only its shape is read
            with torch.no_grad():
                self._cache[key] = embeddings.interpolate_pos_encoding(tokens, height, width).float().to(device)
        return self._cache[key]

    def _blocks(self, x: "torch.Tensor") -> "torch.Tensor":
        """The blocks over float32 (B, T, D) tokens (x is overwritten: the epilogues add in place)."""
        if not (self.epilogues and _epilogues_supported(x.device, self.dtype)):
            for block in self.blocks:
                x = self._block(x, *block)
            return x
        batch, tokens, width = x.shape
        flat = x.reshape(batch * tokens, width)
        for (shift1, shift2), block in zip(self.shifts, self.blocks):
            flat = self._block_epilogues(flat, (batch, tokens), shift1, shift2, *block)
        return (flat + self.final_shift).view(batch, tokens, width)

