"""Fast decoding at one budget: a pre-sized KV cache, hand-built masks, last-position logits.

In the spirit of gpt-fast, decoding is a few small functions:

* `prefill` runs the prompt once and fills a `StaticKVCache`;
* `decode_one_token` runs one token per sequence;
* `generate_stream` loops them, sampling on the device, and yields tokens as they come.

The decoder layers are the base model's own modules (every supported family
works unchanged, and the full budget reproduces the base). What is replaced is
everything *around* them that costs time per token:

* HF's mask functions, rebuilt from scratch at every step: here a decode step's
  mask is a view of one (B, L) boolean row, or None when nothing is padded;
* DynamicCache's `torch.cat` growth (a copy of the whole cache every step): here
  each layer's K/V live in (B, H_kv, L, D) buffers sized once for prompt + new
  tokens (+ a draft), written in place at a write pointer;
* LM-head logits for every prompt position (the head is 28M of SmolLM2's 135M
  parameters): here only positions that are sampled get logits;
* `generate`'s logits processors and stopping criteria;
* on one-token steps of Llama-style layers (Llama, Mistral, Qwen2), HF's
  per-layer plumbing around the ~25 tensor ops of a layer: `_decode_layer`
  replays those ops in the same order, so its output is bit-identical (spans
  of a few tokens, e.g. speculative verify passes, take it too).

What is left is the weights: at batch 1 every weight is streamed from memory
once per token, and on a CPU that is ~80% of a float32 decode step
(`balcony bench` prints this floor), so removing overhead buys ~1.1x over HF
`generate` there; fewer weight bytes (`BalconyModel.quantize`: int8 or int4
weights, `balcony.quantize`), batching and speculative decoding go further.

The write pointer can move back, which is all a speculative rollback needs.
Self-speculative decoding (`balcony.speculative`) reuses `Span`,
`run_layers`, `run_exit` and the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .generation import SamplingConfig, sample
from .model import BalconyModel, Exit


# ----------------------------------------------------------------------------- cache
class SlotKV(CacheLayerMixin):
    """One attention layer's K/V: (B, H_kv, max_len, D) buffers, allocated on the first write.

    `filled` is this layer's write pointer: positions [0, filled) hold valid K/V.
    """

    is_compileable = True
    is_sliding = False

    def __init__(self, max_len: int):
        super().__init__()
        self.max_len = max_len
        self.filled = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # Shapes come from the first write, so any head count / head dim (GQA, Gemma, Phi3) just works.
        b, h, _, d = key_states.shape
        self.keys = key_states.new_zeros(b, h, self.max_len, d)
        self.values = value_states.new_zeros(b, value_states.shape[1], self.max_len, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise RuntimeError("SlotKV is written through StaticKVCache.update, which knows the write position")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_len, 0

    def get_seq_length(self) -> int:
        return self.filled

    def get_max_length(self) -> int:
        return self.max_len


class StaticKVCache(Cache):
    """A KV cache sized once, holding only the layers one budget (or one draft/verify pair) runs.

    HF attention modules call ``cache.update(k, v, layer_idx, ...)``; the cache
    writes the new (B, H_kv, T, D) states at the write position `pos` set by
    the engine before each call, and returns K/V for positions [0, pos + T).
    Positions past that are stale or empty and never attended, so rolling
    back is only moving write pointers (`crop`).

    Args:
        slots: The cache slots (layer indices; exits own slots N, N+1, ...) this cache may hold.
        num_slots: Total slot count of the model (N + number of exits).
        max_len: Tokens each slot can hold (prompt + new tokens + draft).
    """

    def __init__(self, slots: Sequence[int], num_slots: int, max_len: int):
        layers: list = [None] * num_slots
        for s in slots:
            layers[s] = SlotKV(max_len)
        super().__init__(layers=layers)
        self.slots = tuple(sorted(set(slots)))
        self.max_len = max_len
        self.pos = 0  # where the next `update` writes (set by the engine before each forward)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        if layer is None:
            raise RuntimeError(f"cache slot {layer_idx} is not part of this cache (slots {list(self.slots)})")
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        start, end = self.pos, self.pos + key_states.shape[2]
        if start > layer.filled:  # a hole would be attended as zeros: a bookkeeping bug, never silent
            raise RuntimeError(f"cache slot {layer_idx}: writing at {start} but only {layer.filled} positions are filled")
        if end > self.max_len:
            raise RuntimeError(f"cache slot {layer_idx} holds {self.max_len} positions; writing up to {end}")
        layer.keys[:, :, start:end] = key_states
        layer.values[:, :, start:end] = value_states
        layer.filled = end  # writing at `start` drops whatever was after it (e.g. rejected drafts)
        return layer.keys[:, :, :end], layer.values[:, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        return layer.filled if layer is not None else 0

    def crop(self, length: int) -> None:
        """Roll every slot back to at most `length` valid positions (the buffers are kept)."""
        for s in self.slots:
            self.layers[s].filled = min(self.layers[s].filled, length)

    def filled(self) -> dict[int, int]:
        """Slot -> valid positions, for slots that were written."""
        return {s: self.layers[s].filled for s in self.slots if self.layers[s].is_initialized}

    def nbytes(self) -> int:
        """Bytes held by the allocated K/V buffers."""
        return sum(
            self.layers[s].keys.nbytes + self.layers[s].values.nbytes for s in self.slots if self.layers[s].is_initialized
        )


def exit_slot(model: BalconyModel, j: int) -> int | None:
    """The cache slot of exit j's attention (None for the full model or an exit without attention)."""
    if str(j) not in model.exits:
        return None
    for sub in model.exits[str(j)].modules():
        if hasattr(sub, "layer_idx"):
            return sub.layer_idx
    return None


def budget_slots(model: BalconyModel, j: int) -> list[int]:
    """The cache slots a budget writes: base layers 0..j-1 and its exit's own slot."""
    slot = exit_slot(model, j)
    return list(range(j)) + ([slot] if slot is not None else [])


# ----------------------------------------------------------------------------- state
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


# ----------------------------------------------------------------------------- one-token fast path
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
    """Whether `_decode_layer` reproduces this layer's forward (known classes, no dropout, no hooks)."""
    if layer is None or type(layer).__name__ not in _FAST_CLASSES["layer"]:
        return False
    parts = {"attn": getattr(layer, "self_attn", None), "mlp": getattr(layer, "mlp", None)}
    if layer.training and getattr(parts["attn"], "attention_dropout", 0.0):  # (exits are built in train mode)
        return False
    norms = (getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None))
    hooked = any(m._forward_hooks or m._forward_pre_hooks for m in layer.modules())
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
    """`mod(x)` for a linear layer: a plain nn.Linear skips its module call, a quantized one (`balcony.quantize`) runs."""
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


# ----------------------------------------------------------------------------- forward pieces
def run_layers(model: BalconyModel, state: DecodeState, span: Span, hidden: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """(B, T, H) hidden after layer `start` -> after layer `stop`, through base layers start..stop-1."""
    layers, types = model.parts.layers, model.parts.layer_types
    state.cache.pos = span.pos
    fast = state.fast if span.length <= FAST_MAX_TOKENS else None
    kwargs = {model._layer_kw: state.cache, "use_cache": True, "position_ids": span.position_ids, "position_embeddings": span.rope}
    for i in range(start, stop):
        layer, mask = layers[i], span.masks[types[i]]
        if fast and fast.get(id(layer)):
            hidden = _decode_layer(layer, hidden, span, state.cache, mask)
            continue
        out = layer(hidden, attention_mask=mask, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def run_exit(model: BalconyModel, state: DecodeState, span: Span, hidden: torch.Tensor, j: int) -> torch.Tensor:
    """(B, T, H) hidden after layer j -> (B, T, H) normed state for the head: exit j's module, or the final norm."""
    module = model.exits[str(j)] if str(j) in model.exits else None
    if module is None:
        return model.parts.norm(hidden)
    state.cache.pos = span.pos
    mask = span.masks[model.parts.layer_types[-1]]  # the exit layer is a copy of the last layer
    if span.length <= FAST_MAX_TOKENS and state.fast and state.fast.get(id(module.layer)) and not module._forward_hooks:
        return module.norm(_decode_layer(module.layer, hidden, span, state.cache, mask))
    return module(
        hidden,
        attention_mask=mask,
        use_cache=True,
        position_ids=span.position_ids,
        position_embeddings=span.rope,
        **{model._layer_kw: state.cache},
    )


def forward_budget(model: BalconyModel, state: DecodeState, tokens: torch.Tensor, j: int, keep: int = 1, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) tokens at positions [state.length, +T) -> (B, keep, V) logits of the last `keep` positions at budget j."""
    hidden = model.parts.embed_tokens(tokens)  # (B, T, H)
    span = make_span(model, state, state.length, tokens.shape[1], hidden, position_ids)
    hidden = run_layers(model, state, span, hidden, 0, j)
    hidden = run_exit(model, state, span, hidden, j)
    state.length += tokens.shape[1]
    return model.parts.lm_head(hidden[:, -keep:])


def prefill(model: BalconyModel, state: DecodeState, input_ids: torch.Tensor, j: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Run the prompt (B, T) at budget j into an empty cache; returns the (B, V) next-token logits."""
    position_ids = None
    if state.pad is not None:  # HF's rule for padded prompts: count real tokens (any mask, not only left padding)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return forward_budget(model, state, input_ids, j, 1, position_ids)[:, -1]


def decode_one_token(model: BalconyModel, state: DecodeState, token: torch.Tensor, j: int) -> torch.Tensor:
    """One step: (B,) last tokens -> (B, V) next-token logits, writing one cache position."""
    return forward_budget(model, state, token[:, None], j)[:, -1]


# ----------------------------------------------------------------------------- inputs and stopping
def check_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int) -> None:
    """Raise a ValueError naming the offending value for inputs no decoder can use."""
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
    if not torch.is_tensor(input_ids) or input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        shape = tuple(input_ids.shape) if torch.is_tensor(input_ids) else type(input_ids).__name__
        raise ValueError(f"the prompt is empty or not (batch, seq_len): input_ids has shape {shape}; give at least one token")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}")
        empty = (attention_mask.sum(-1) == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"the prompt of sequence(s) {empty} is empty: its attention_mask row is all zeros")


class StopChecker:
    """Per-sequence EOS and stop-string bookkeeping for a batch.

    Args:
        batch_size: B.
        eos_token_id: Token id(s) that end a sequence.
        stop_strings: Strings that end a sequence once they appear in its decoded output.
        tokenizer: Needed to decode for stop strings.
        pad_token_id: What a finished sequence emits (default: the first EOS id, else 0).
        device: Where the flags live.
    """

    def __init__(
        self,
        batch_size: int,
        eos_token_id: int | Sequence[int] | None,
        stop_strings: str | Sequence[str] | None,
        tokenizer,
        pad_token_id: int | None,
        device: torch.device,
    ):
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        self.eos = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
        self.stop_strings = [stop_strings] if isinstance(stop_strings, str) else [s for s in (stop_strings or []) if s]
        if self.stop_strings and tokenizer is None:
            raise ValueError(f"stop_strings={self.stop_strings!r} need a tokenizer to decode the output; pass tokenizer=")
        self.tokenizer = tokenizer
        self.fill = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        self.done = torch.zeros(batch_size, dtype=torch.bool, device=device)
        self.active = self.eos is not None or bool(self.stop_strings)
        # Decoding the last few tokens is enough to see a stop string appear (a token is >= 1 character).
        self._tail = max((len(s) for s in self.stop_strings), default=0) + 4
        self._history: list[list[int]] = [[] for _ in range(batch_size)]

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        """(B,) sampled tokens -> (B,) tokens with finished sequences' replaced by the fill token."""
        if not self.active:
            return token
        token = torch.where(self.done, torch.full_like(token, self.fill), token)
        if self.eos is not None:
            hit = torch.isin(token, self.eos)
        else:
            hit = torch.zeros_like(self.done)
        if self.stop_strings:
            hits = []
            for b, t in enumerate(token.tolist()):  # a host sync, but decoding text needs the ids anyway
                hist = self._history[b]
                if not bool(self.done[b]):
                    hist.append(t)
                text = self.tokenizer.decode(hist[-self._tail :], skip_special_tokens=False)
                hits.append(not bool(self.done[b]) and any(s in text for s in self.stop_strings))
            hit = hit | torch.tensor(hits, device=token.device)
        self.done = self.done | hit
        return token

    def all_done(self) -> bool:
        return self.active and bool(self.done.all())


# ----------------------------------------------------------------------------- generation
def generate_stream(
    model: BalconyModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    exit: Exit = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    stop_strings: str | Sequence[str] | None = None,
    tokenizer=None,
    generator: torch.Generator | None = None,
    stop: Callable[[torch.Tensor], bool] | None = None,
    compile: bool | str = False,
) -> Iterator[torch.Tensor]:
    """Yield (B,) new tokens one step at a time at one budget.

    Finished sequences (EOS or a stop string) keep yielding the fill token
    (`pad_token_id`, else the first EOS id); the stream ends when all are
    finished, after `max_new_tokens` steps, or when `stop(token)` is True.
    See `generate` for the arguments.
    """
    check_inputs(input_ids, attention_mask, max_new_tokens)
    cfg = SamplingConfig(do_sample, temperature, top_k, top_p)
    j = model.resolve_exit(exit)
    b, t = input_ids.shape
    state = new_state(model, budget_slots(model, j), b, t + max_new_tokens, attention_mask)
    stopper = StopChecker(b, eos_token_id, stop_strings, tokenizer, pad_token_id, input_ids.device)
    step_fn = compiled_decode(model, compile) if compile else decode_one_token
    # "Is everyone done?" is a host sync: free on CPU, a pipeline stall on an accelerator, so ask every 8 steps there
    # (a finished batch then emits up to 7 more fill tokens).
    sync_every = 1 if input_ids.device.type == "cpu" else 8
    with torch.no_grad():
        logits = prefill(model, state, input_ids, j, attention_mask)
        for step in range(max_new_tokens):
            token = stopper(sample(logits, cfg, generator))
            yield token
            if step == max_new_tokens - 1 or (stop is not None and stop(token)):
                return
            if step % sync_every == sync_every - 1 and stopper.all_done():
                return
            logits = step_fn(model, state, token, j)


def generate(
    model: BalconyModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    exit: Exit = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    stop_strings: str | Sequence[str] | None = None,
    tokenizer=None,
    generator: torch.Generator | None = None,
    compile: bool | str = False,
) -> torch.Tensor:
    """Generate at one budget; returns (B, T + new) ids, prompt included.

    Args:
        model: The Balcony model.
        input_ids: (B, T) prompt ids, left-padded when lengths differ.
        attention_mask: (B, T) 1 for real tokens, 0 for padding.
        exit: Budget name, exit layer, or None for the full model.
        max_new_tokens: How many tokens to add at most (>= 1).
        do_sample, temperature, top_k, top_p: Sampling; greedy by default.
        eos_token_id: Stop a sequence at this token (or any of these).
        pad_token_id: What a finished sequence is filled with (default: the first EOS id).
        stop_strings: Stop a sequence once its output contains one of these (needs `tokenizer`).
        tokenizer: Decodes the output for `stop_strings`.
        generator: Seeded `torch.Generator` for reproducible sampling.
        compile: Run the decode step through `torch.compile` (True, or a backend name);
            the first call compiles (slow on CPU), see `compiled_decode`.

    Returns:
        (B, T + n) ids, n <= max_new_tokens (fewer when every sequence stopped early).

    Example:
        >>> out = generate(model, ids, exit="S", max_new_tokens=16)  # doctest: +SKIP
    """
    tokens = list(
        generate_stream(
            model, input_ids, attention_mask, exit=exit, max_new_tokens=max_new_tokens, do_sample=do_sample,
            temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
            stop_strings=stop_strings, tokenizer=tokenizer, generator=generator, compile=compile,
        )
    )
    return torch.cat([input_ids, torch.stack(tokens, dim=1).to(input_ids.dtype)], dim=1)


# ----------------------------------------------------------------------------- torch.compile
def compiled_decode(model: BalconyModel, backend: bool | str = True) -> Callable:
    """`decode_one_token` through `torch.compile`, built once per model and backend.

    The cache grows by one position per step, so shapes change; dynamo marks
    them dynamic after the first recompile and then reuses one graph. With the
    default inductor backend on CPU the first call pays for compiling (about
    40 s for a 6-layer tiny model on 2 cores, minutes for 30 layers); decode
    then saves the Python overhead around the matmuls, which at batch 1 are
    80% of a step (the weights are streamed from memory once per token).

    Args:
        backend: True for inductor, or a `torch.compile` backend name (``"eager"``
            traces with dynamo only: a quick check that the step compiles).
    """
    name = "inductor" if backend is True else str(backend)
    compiled = model.__dict__.setdefault("_balcony_compiled", {})  # plain attribute: not a submodule, not in state_dict
    if name not in compiled:
        compiled[name] = torch.compile(decode_one_token, backend=name, dynamic=True)
    return compiled[name]
