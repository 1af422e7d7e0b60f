"""The one-token fast path: a Llama-style decoder layer replayed op for op without HF's per-layer plumbing."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # types only: inference runs on any model with `parts` and `exits`
    from ..modeling.model import BalconyModel
    from .cache import StaticKVCache
    from .spans import Span


# Llama-style layers whose one-token forward `_decode_layer` replays op for op (bit-identical for float32):
# HF's layer call wraps ~25 tensor ops in ~30 more (decorators, kwargs plumbing, views, dtype round trips,
# attention-interface lookup), which at batch 1 on a CPU is about a fifth of a decode step.
_FAST_CLASSES = {
    "layer": {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"},
    "attn": {"LlamaAttention", "MistralAttention", "Qwen2Attention"},
    "mlp": {"LlamaMLP", "MistralMLP", "Qwen2MLP"},
    "norm": {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"},
}


# Spans of up to this many tokens take the fast path: decode steps, speculative verify passes, short prompts.
FAST_MAX_TOKENS = 16


def _fast_ok(layer: torch.nn.Module | None) -> bool:
    """Whether `_decode_layer` reproduces this layer's forward (known classes, no dropout, no hooks of any kind)."""
    if layer is None or type(layer).__name__ not in _FAST_CLASSES["layer"]:
        return False
    parts = {"attn": getattr(layer, "self_attn", None), "mlp": getattr(layer, "mlp", None)}
    if layer.training and getattr(parts["attn"], "attention_dropout", 0.0):  # (exits are built in train mode)
        return False
    norms = (getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None))
    # Hooks change what a module computes; accelerate's (`_hf_hook`: device_map / offload) also move inputs and
    # load offloaded weights in the module call, which reading `.weight` directly would skip.
    hooked = any(m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook") for m in layer.modules())
    return (
        not hooked
        and all(type(m).__name__ in _FAST_CLASSES[k] for k, m in parts.items())
        and all(type(n).__name__ in _FAST_CLASSES["norm"] for n in norms)
    )


def fast_layers(model: BalconyModel) -> dict[int, bool]:
    """Module id -> whether the one-token fast path applies, for every base and exit layer (checked per call: cheap)."""
    layers = list(model.parts.layers) + [ex.layer for ex in model.exits.values() if ex.layer is not None]
    return {id(layer): _fast_ok(layer) for layer in layers}


def _rms(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm.forward without its dtype round trips (a no-op for float32)."""
    if x.dtype != torch.float32:
        return norm(x)
    return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))


def _linear(mod: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`mod(x)` for a linear layer: a plain nn.Linear skips its module call, a quantized one (`balcony.inference.quantize`) runs."""
    if type(mod) is torch.nn.Linear:
        return torch.nn.functional.linear(x, mod.weight, mod.bias)
    return mod(x)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _decode_layer(layer: torch.nn.Module, h: torch.Tensor, span: "Span", cache: StaticKVCache, mask: torch.Tensor | None) -> torch.Tensor:
    """A Llama-style decoder layer on a few tokens per sequence: (B, T, H) -> (B, T, H).

    For one token (T = 1), the same ops in the same order as HF's
    LlamaDecoderLayer with SDPA attention, including its one-query GQA paths,
    so the result is the same. A few tokens (a speculative verify pass, T =
    drafts + 1) take SDPA's own GQA with the span's mask (None: a fresh
    prompt, plain causal), equal to HF's up to float rounding.
    """
    attn, mlp = layer.self_attn, layer.mlp
    (b, t), d = h.shape[:2], attn.head_dim
    x = _rms(layer.input_layernorm, h)
    q = _linear(attn.q_proj, x).view(b, t, -1, d).transpose(1, 2)  # (B, Hq, T, D)
    k = _linear(attn.k_proj, x).view(b, t, -1, d).transpose(1, 2)  # (B, Hkv, T, D)
    v = _linear(attn.v_proj, x).view(b, t, -1, d).transpose(1, 2)
    cos, sin = span.rope[0].unsqueeze(1), span.rope[1].unsqueeze(1)  # (B|1, 1, T, D)
    q = (q * cos) + (_rotate_half(q) * sin)
    k = (k * cos) + (_rotate_half(k) * sin)
    k, v = cache.update(k, v, attn.layer_idx)  # (B, Hkv, L, D)
    rep = attn.num_key_value_groups
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if t > 1:
        o = sdpa(q, k, v, attn_mask=mask, dropout_p=0.0, scale=attn.scaling, is_causal=mask is None, enable_gqa=rep > 1)
        o = o.transpose(1, 2).reshape(b, t, -1)  # (B, T, Hq * D)
    elif rep > 1 and mask is None and k.shape[-1] == v.shape[-1] <= 256:  # HF: SDPA's own GQA
        o = sdpa(q, k, v, attn_mask=None, dropout_p=0.0, scale=attn.scaling, is_causal=False, enable_gqa=True)
    elif rep > 1:  # HF's pack_gqa: a KV head's query heads become its queries
        o = sdpa(q.reshape(b, -1, rep, d), k, v, attn_mask=mask, dropout_p=0.0, scale=attn.scaling, is_causal=False)
    else:
        o = sdpa(q, k, v, attn_mask=mask, dropout_p=0.0, scale=attn.scaling, is_causal=False)
    if t == 1:
        o = o.reshape(b, -1, 1, d).transpose(1, 2).contiguous().reshape(b, 1, -1)  # (B, 1, Hq * D)
    h = h + _linear(attn.o_proj, o)
    x = _rms(layer.post_attention_layernorm, h)
    up = _linear(mlp.up_proj, x)
    gate = mlp.act_fn(_linear(mlp.gate_proj, x))
    return h + _linear(mlp.down_proj, gate * up)
