"""Where exits are built: the per-family map and the Balcony exit module.

Balcony never forks a modeling file. It finds the base's pieces through
`get_decoder()` (embedding, decoder-layer list, rotary embedding, final norm)
and `get_output_embeddings()` (LM head), and builds each exit from the base's
own decoder-layer class, so RoPE, attention masks and the KV cache behave
exactly as in the base. The small map below only names, per family, which
submodules form the attention half and the MLP half of a decoder layer (for
the ablations) and which projections write into the residual stream (for the
identity init).
"""

from __future__ import annotations

import copy
import hashlib
import json
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .config import BalconyConfig


@dataclass(frozen=True)
class Family:
    """How one model family lays out a pre-norm decoder layer."""

    attention_parts: tuple[str, ...] = ("input_layernorm", "self_attn")
    mlp_parts: tuple[str, ...] = ("post_attention_layernorm", "mlp")
    # Projections that write into the residual stream; zeroed by `init="identity"`.
    residual_out: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")


_LLAMA_LIKE = Family()
FAMILIES: dict[str, Family] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "olmo2": Family(
        attention_parts=("self_attn", "post_attention_layernorm"),
        mlp_parts=("mlp", "post_feedforward_layernorm"),
    ),
}

# Config fields that decide whether exits trained on one base fit another.
ARCH_FIELDS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "rms_norm_eps",
    "max_position_embeddings",
    "tie_word_embeddings",
)


def architecture_summary(base_config) -> dict:
    """The fields of a base config that exits depend on (JSON-friendly)."""
    out = {}
    for name in ARCH_FIELDS:
        value = getattr(base_config, name, None)
        if isinstance(value, float):
            value = float(f"{value:.6g}")  # GGUF stores eps as float32; compare at 6 digits
        out[name] = value
    return out


def fingerprint(summary: dict) -> str:
    """A short stable hash of an `architecture_summary`."""
    blob = json.dumps(summary, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class BaseParts:
    """The pieces of a base causal LM that Balcony runs."""

    decoder: nn.Module
    embed_tokens: nn.Module
    layers: nn.ModuleList
    norm: nn.Module
    rotary_emb: nn.Module
    lm_head: nn.Module
    family: Family
    layer_types: list[str]

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def find_parts(base: nn.Module) -> BaseParts:
    """Locate embedding, layers, final norm, rotary embedding and head of `base`.

    Raises:
        ValueError: the model is not a decoder-only LM with a layer list, a final
            norm and rotary embeddings; the message names what is missing.
    """
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", type(base).__name__)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{model_type} is an encoder-decoder model; balcony supports decoder-only causal LMs")
    get_decoder = getattr(base, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if decoder is None or decoder is base and not hasattr(base, "layers"):
        decoder = getattr(base, "model", None)
    missing = [a for a in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(decoder, a)]
    layers = getattr(decoder, "layers", None)
    if "layers" not in missing and not isinstance(layers, nn.ModuleList):
        missing.append("layers (as an nn.ModuleList)")
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is None:
        missing.append("an LM head (get_output_embeddings())")
    if missing:
        raise ValueError(
            f"architecture {model_type!r} ({type(base).__name__}) is not supported: its decoder "
            f"({type(decoder).__name__}) has no {', '.join(missing)}. Balcony needs a decoder-only causal LM "
            f"with a decoder-layer list, a final norm, rotary embeddings and an LM head; known families: "
            f"{', '.join(sorted(FAMILIES))}"
        )
    family = FAMILIES.get(model_type)
    if family is None:
        warnings.warn(
            f"model_type {model_type!r} is not in balcony's family map ({', '.join(sorted(FAMILIES))}); "
            "assuming a Llama-like pre-norm layer. Check that the full budget reproduces the base.",
            stacklevel=3,
        )
        family = _LLAMA_LIKE
    n = len(layers)
    layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * n)
    if getattr(config, "sliding_window", None) and model_type in ("mistral", "phi3") and not getattr(config, "layer_types", None):
        layer_types = ["sliding_attention"] * n
    return BaseParts(decoder, decoder.embed_tokens, layers, decoder.norm, decoder.rotary_emb, head, family, layer_types)


class _NoAttention(nn.Module):
    """Stands in for a removed attention block (MLP-only exit): adds nothing to the residual."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return torch.zeros_like(hidden_states), None


class _NoMLP(nn.Module):
    """Stands in for a removed MLP block (attention-only exit): adds nothing to the residual."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def _set_submodule(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _remove_half(layer: nn.Module, parts: tuple[str, ...], attention: bool) -> None:
    """Replace one half of a pre-norm layer so it contributes zero to the residual."""
    for name in parts:
        if not hasattr(layer, name):
            raise ValueError(f"decoder layer {type(layer).__name__} has no submodule {name!r} to remove")
        is_block = name in ("self_attn", "mlp")
        if is_block:
            _set_submodule(layer, name, _NoAttention() if attention else _NoMLP())
        else:
            # A norm that only feeds the removed block: drop it so it holds no unused parameters.
            _set_submodule(layer, name, nn.Identity())


class BalconyExit(nn.Module):
    """One Balcony module: an optional decoder layer, then a norm. The LM head is shared.

    Args:
        layer: A decoder layer of the base architecture (or a half of one), or
            None for the plain early-exit baseline (norm + head only).
        norm: The exit's own norm (initialised from the base's final norm).
    """

    def __init__(self, layer: nn.Module | None, norm: nn.Module):
        super().__init__()
        self.layer = layer
        self.norm = norm

    def forward(self, hidden_states: torch.Tensor, **layer_kwargs) -> torch.Tensor:
        """(B, T, H) hidden state after layer j -> (B, T, H) normed exit state."""
        if self.layer is not None:
            hidden_states = self.layer(hidden_states, **layer_kwargs)
            if isinstance(hidden_states, tuple):  # older layer classes return (h, ...)
                hidden_states = hidden_states[0]
        return self.norm(hidden_states)


def set_cache_slot(module: nn.Module, slot: int) -> None:
    """Point every attention block in `module` at KV-cache slot `slot`."""
    for sub in module.modules():
        if hasattr(sub, "layer_idx"):
            sub.layer_idx = slot


def build_exit(base: nn.Module, parts: BaseParts, config: BalconyConfig, slot: int) -> BalconyExit:
    """Build one exit module as `config` asks, on the base's device and dtype.

    `slot` is the exit's own KV-cache layer index (after the base's layers), so
    its cache never collides with the base's.
    """
    last = parts.layers[-1]
    layer: nn.Module | None = None
    if config.exit_kind != "norm":
        layer = copy.deepcopy(last)
        if config.init == "random":
            _reinit(base, layer)
        elif config.init == "identity":
            for name in parts.family.residual_out:
                proj = layer.get_submodule(name)
                with torch.no_grad():
                    proj.weight.zero_()
                    if getattr(proj, "bias", None) is not None:
                        proj.bias.zero_()
        if config.exit_kind == "mlp":
            _remove_half(layer, parts.family.attention_parts, attention=True)
        elif config.exit_kind == "attention":
            _remove_half(layer, parts.family.mlp_parts, attention=False)
        set_cache_slot(layer, slot)
    norm = copy.deepcopy(parts.norm)
    if config.norm_init == "random":
        _reinit(base, norm)
    module = BalconyExit(layer, norm)
    for p in module.parameters():
        p.requires_grad_(True)
    return module


def _reinit(base: nn.Module, module: nn.Module) -> None:
    """Re-initialise `module` with the base model's own initialiser."""
    init_fn = getattr(base, "_init_weights", None)
    if init_fn is None:
        raise ValueError(f"{type(base).__name__} has no _init_weights; init='random' is not available for it")
    with torch.no_grad():
        for sub in module.modules():
            init_fn(sub)
