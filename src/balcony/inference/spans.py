"""Decode state, masks, positions and rotary embeddings for a span of new tokens (one step, a prompt, a draft tree)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from .cache import KVPool, StaticKVCache
from .devices import execution_device
from .fast_path import fast_layers

if TYPE_CHECKING:  # types only: inference runs on any model with `parts` and `exits`
    from ..modeling.model import BalconyModel


class DecodeState:
    """What decoding carries between steps besides the cache.

    Attributes:
        cache: The pre-sized KV cache.
        key_valid: (B, max_len) False at padding positions; None when no sequence is padded.
        pad: (B,) padding tokens per sequence (position id of cache index i is i - pad); None without padding.
        arange: (max_len,) 0..max_len-1, kept to build masks and positions without allocating.
        length: Tokens of the main stream written so far (the next decode writes here).
        pos: (1,) the same count as a device tensor, where the static decode step reads it: setting
            `length` fills it on the device, so no step ever copies a position from the host or back.
        attn: The attention implementation ("sdpa" takes boolean masks, "eager" additive ones).
        fast: Layer module id -> whether one-token steps take the fast path (`_decode_layer`); None: never.
    """

    def __init__(
        self,
        cache: StaticKVCache,
        key_valid: torch.Tensor | None,
        pad: torch.Tensor | None,
        arange: torch.Tensor,
        length: int,
        attn: str,
        fast: dict[int, bool] | None = None,
    ):
        self.cache, self.key_valid, self.pad, self.arange, self.attn, self.fast = cache, key_valid, pad, arange, attn, fast
        self.pos = torch.zeros(1, dtype=torch.long, device=arange.device)
        self.length = length

    @property
    def length(self) -> int:
        return self._length

    @length.setter
    def length(self, value: int) -> None:
        self._length = value
        self.pos.fill_(value)  # a kernel launch with the value as its argument: no host sync


def new_state(
    model: BalconyModel,
    slots: Sequence[int],
    batch_size: int,
    max_len: int,
    attention_mask: torch.Tensor | None = None,
    fast: bool = True,
    pool: KVPool | None = None,
) -> DecodeState:
    """A fresh cache for `slots` plus the padding bookkeeping of `attention_mask` (B, T_prompt).

    Masks, positions and the cache's write positions live on the device the
    embedding runs on (`balcony.inference.devices.execution_device`: also right
    for bases dispatched by accelerate).

    Args:
        fast: Let one-token steps of Llama-style layers skip HF's layer plumbing (`_decode_layer`);
            False always calls the HF modules.
        pool: Take the K/V buffers from this pool (compiled decoding: `balcony.inference.cache.kv_pool`).
    """
    device = execution_device(model)
    attn = getattr(model.base.config, "_attn_implementation", None) or "eager"
    if attn not in ("sdpa", "eager"):
        raise ValueError(
            f"the decoding engine supports attn_implementation 'sdpa' or 'eager', not {attn!r}: "
            "load the base with attn_implementation='sdpa'"
        )
    key_valid = pad = None
    if attention_mask is not None and not bool(attention_mask.all()):
        t = attention_mask.shape[1]
        attention_mask = attention_mask.to(device)
        key_valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        key_valid[:, :t] = attention_mask.bool()
        pad = t - attention_mask.long().sum(-1)
    cache = StaticKVCache(slots, model.num_layers + len(model.exits), max_len, pool)
    arange = torch.arange(max_len, device=device)
    return DecodeState(cache, key_valid, pad, arange, 0, attn, fast_layers(model) if fast and attn == "sdpa" else None)


@dataclass
class Span:
    """Everything a forward over positions [pos, pos + T) needs besides the hidden states.

    Attributes:
        pos: First cache position written (a static span: None, see `index`).
        length: T, the number of positions.
        masks: layer type -> (B, 1, T, pos + T) mask, or None where plain causal attention is right.
        position_ids: (B or 1, T) rotary positions.
        rope: (cos, sin) from the base's rotary embedding.
        index: (T,) device positions written by a static span (the cache then returns whole buffers).
    """

    pos: int | None
    length: int
    masks: dict[str, torch.Tensor | None]
    position_ids: torch.Tensor
    rope: tuple[torch.Tensor, torch.Tensor]
    index: torch.Tensor | None = None


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


def static_span(model: BalconyModel, state: DecodeState, like: torch.Tensor, limit: int | None = None) -> Span:
    """The one-token span of a decode step at `state.pos`, the same shapes at every step.

    Keys are the whole cache (max_len positions); each layer type's mask is
    (B or 1, 1, 1, max_len), True at positions written so far (and inside the
    sliding window, and not padding). Positions, masks and the write index are
    computed on the device from `state.pos`: no Python int of the position
    enters, so a compiled step is traced once for every step of every generation
    of the same shape.

    Args:
        like: A (B, 1, H) tensor of the hidden dtype/device (the rotary embedding reads both).
        limit: For an eager step, the filled length after this step (a host int, free to read): keys
            and masks stop there, so the step attends to what it needs only (no mask at all where
            nothing is padded or outside a window, as before); shapes then change, so never under compile.
    """
    pos = state.pos  # (1,)
    position_ids = pos[None] if state.pad is None else pos[None] - state.pad[:, None]  # (1 | B, 1)
    k = state.arange if limit is None else state.arange[:limit]  # (L,)
    seen = k <= pos  # (L,): this query and everything before it
    masks = {}
    for kind in set(model.parts.layer_types):
        window = getattr(model.base.config, "sliding_window", None) if kind == "sliding_attention" else None
        if limit is not None and state.key_valid is None and (window is None or limit <= window):
            masks[kind] = None  # every key up to `limit` is visible: plain attention, HF's own decode path
            continue
        allowed = seen & (k > pos - window) if window is not None else seen
        if state.key_valid is not None:
            allowed = (allowed[None] & state.key_valid[:, : k.shape[0]])[:, None, None]
        else:
            allowed = allowed[None, None, None]
        masks[kind] = _additive(model, allowed) if state.attn == "eager" else allowed  # (B | 1, 1, 1, L)
    return Span(None, 1, masks, position_ids, model.parts.rotary_emb(like, position_ids), index=pos)


def _additive(model: BalconyModel, allowed: torch.Tensor) -> torch.Tensor:
    """A boolean mask as eager attention takes it: 0 where allowed, the dtype's minimum elsewhere."""
    dtype = model.parts.embed_tokens.weight.dtype
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


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
        return _additive(model, allowed)
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
            a = _additive(model, a)
        masks[kind] = a
    return Span(start, length, masks, position_ids, model.parts.rotary_emb(like, position_ids))
