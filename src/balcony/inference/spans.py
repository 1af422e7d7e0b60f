"""Decode state, masks, positions and rotary embeddings for a span of new tokens (one step, a prompt, a draft tree)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from .cache import StaticKVCache
from .fast_path import fast_layers

if TYPE_CHECKING:  # types only: inference runs on any model with `parts` and `exits`
    from ..modeling.model import BalconyModel


@dataclass
class DecodeState:
    """What decoding carries between steps besides the cache.

    Attributes:
        cache: The pre-sized KV cache.
        key_valid: (B, max_len) False at padding positions; None when no sequence is padded.
        pad: (B,) padding tokens per sequence (position id of cache index i is i - pad); None without padding.
        arange: (max_len,) 0..max_len-1, kept to build masks and positions without allocating.
        length: Tokens of the main stream written so far (the next decode writes here).
        attn: The attention implementation ("sdpa" takes boolean masks, "eager" additive ones).
        fast: Layer module id -> whether one-token steps take the fast path (`_decode_layer`); None: never.
    """

    cache: StaticKVCache
    key_valid: torch.Tensor | None
    pad: torch.Tensor | None
    arange: torch.Tensor
    length: int
    attn: str
    fast: dict[int, bool] | None = None


def new_state(
    model: BalconyModel,
    slots: Sequence[int],
    batch_size: int,
    max_len: int,
    attention_mask: torch.Tensor | None = None,
    fast: bool = True,
) -> DecodeState:
    """A fresh cache for `slots` plus the padding bookkeeping of `attention_mask` (B, T_prompt).

    Args:
        fast: Let one-token steps of Llama-style layers skip HF's layer plumbing (`_decode_layer`);
            False always calls the HF modules.
    """
    device = model.parts.embed_tokens.weight.device
    attn = getattr(model.base.config, "_attn_implementation", None) or "eager"
    if attn not in ("sdpa", "eager"):
        raise ValueError(
            f"the decoding engine supports attn_implementation 'sdpa' or 'eager', not {attn!r}: "
            "load the base with attn_implementation='sdpa'"
        )
    key_valid = pad = None
    if attention_mask is not None and not bool(attention_mask.all()):
        t = attention_mask.shape[1]
        key_valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        key_valid[:, :t] = attention_mask.bool()
        pad = (t - attention_mask.long().sum(-1)).to(device)
    cache = StaticKVCache(slots, model.num_layers + len(model.exits), max_len)
    arange = torch.arange(max_len, device=device)
    return DecodeState(cache, key_valid, pad, arange, 0, attn, fast_layers(model) if fast and attn == "sdpa" else None)


@dataclass
class Span:
    """Everything a forward over positions [pos, pos + T) needs besides the hidden states.

    Attributes:
        pos: First cache position written.
        length: T, the number of positions.
        masks: layer type -> (B, 1, T, pos + T) mask, or None where plain causal attention is right.
        position_ids: (B or 1, T) rotary positions.
        rope: (cos, sin) from the base's rotary embedding.
    """

    pos: int
    length: int
    masks: dict[str, torch.Tensor | None]
    position_ids: torch.Tensor
    rope: tuple[torch.Tensor, torch.Tensor]


def make_span(
    model: BalconyModel, state: DecodeState, pos: int, length: int, like: torch.Tensor, position_ids: torch.Tensor | None = None
) -> Span:
    """Masks, positions and rotary embeddings for `length` new tokens written at `pos`.

    Args:
        like: Any (B, T, H) tensor of the hidden dtype/device (the rotary embedding reads both).
        position_ids: Override the positions (the prompt of a padded batch uses HF's cumsum rule).
    """
    q = state.arange[pos : pos + length]  # (T,) absolute cache index of each query
    if position_ids is None:
        position_ids = q[None] if state.pad is None else q[None] - state.pad[:, None]
    masks = {kind: _mask(model, state, pos, length, kind) for kind in set(model.parts.layer_types)}
    return Span(pos, length, masks, position_ids, model.parts.rotary_emb(like, position_ids))


def _mask(model: BalconyModel, state: DecodeState, pos: int, length: int, kind: str) -> torch.Tensor | None:
    """One layer type's attention mask for queries at [pos, pos + T) over keys [0, pos + T)."""
    kv = pos + length
    window = getattr(model.base.config, "sliding_window", None) if kind == "sliding_attention" else None
    windowed = window is not None and kv > window
    if not windowed and state.key_valid is None:
        # A single query may see every key; a fresh prompt is plain causal, which SDPA does itself.
        if length == 1 or (pos == 0 and state.attn == "sdpa"):
            return None
    k = state.arange[:kv]
    if length == 1 and not windowed:
        allowed = state.key_valid[:, None, None, :kv]  # (B, 1, 1, kv): a view, nothing computed
    else:
        q = state.arange[pos:kv, None]  # (T, 1)
        allowed = k[None] <= q  # (T, kv) causal
        if windowed:
            allowed = allowed & (k[None] > q - window)
        if state.key_valid is not None:
            # A padding query sees nothing; let it see itself so SDPA yields no NaN (its output is never used).
            allowed = (allowed & state.key_valid[:, None, :kv]) | (k[None] == q)  # (B, T, kv)
            allowed = allowed[:, None]
        else:
            allowed = allowed[None, None]
    if state.attn == "eager":  # eager attention adds the mask to the scores
        dtype = model.parts.embed_tokens.weight.dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed


def tree_span(model: BalconyModel, state, n: int, start: int, length: int, like: torch.Tensor) -> Span:
    """A span over cache indices [start, start + length) where index n is the last committed token P and every
    index after n is a candidate for position n + 1, attending to [0, n] and to itself only.

    Args:
        n: Cache index of P (the candidates' common parent).
        start: First index written (n for a verify pass over [P, candidates], n + 1 for the candidates alone).
        like: A (1, T, H) tensor of the hidden dtype/device (for the rotary embedding).
    """
    idx = state.arange[start : start + length]  # (T,) cache index of each query
    k = state.arange[: start + length]  # (kv,)
    own = k[None] == idx[:, None]  # (T, kv)
    allowed = (k[None] <= n) | own
    qpos = idx.clamp(max=n + 1)  # every candidate sits at position n + 1
    position_ids = qpos[None] if state.pad is None else qpos[None] - state.pad[:, None]
    masks = {}
    for kind in set(model.parts.layer_types):
        a = allowed
        window = getattr(model.base.config, "sliding_window", None) if kind == "sliding_attention" else None
        if window is not None:
            a = a & ((k[None] > qpos[:, None] - window) | own)
        if state.key_valid is not None:
            a = ((a & state.key_valid[:, None, : k.shape[0]]) | own)[:, None]  # (B, 1, T, kv)
        else:
            a = a[None, None]
        if state.attn == "eager":  # additive
            dtype = model.parts.embed_tokens.weight.dtype
            a = torch.zeros(a.shape, dtype=dtype, device=a.device).masked_fill(~a, torch.finfo(dtype).min)
        masks[kind] = a
    return Span(start, length, masks, position_ids, model.parts.rotary_emb(like, position_ids))
