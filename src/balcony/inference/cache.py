"""The pre-sized KV cache: one (B, H_kv, max_len, D) buffer per slot, written in place at a movable pointer.

Two ways to write. A span of several tokens (a prompt, a verify pass) writes at
a Python-int position and gets back K/V for positions [0, pos + T), as HF's
static cache does. The one-token decode step writes at a *device tensor* of
positions (`StaticKVCache.index`) and gets back the whole (B, H_kv, max_len, D)
buffers, whatever the step: its shapes never change, its masks say which
positions are valid (`balcony.inference.spans.static_span`), so `torch.compile`
traces it once and CUDA graphs can replay it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

if TYPE_CHECKING:  # types only: inference runs on any model with `parts` and `exits`
    from ..modeling.model import BalconyModel


class KVPool:
    """K/V buffers kept between generations, so compiled decoding sees the same tensors every time.

    A compiled decode step that writes into fresh buffers each generation could
    not be replayed as a CUDA graph (its inputs would move) and would be traced
    again for every new cache; gpt-fast allocates its caches once for the same
    reason. Buffers are keyed by slot, shape, dtype and device, taken by a cache
    for one generation and given back when it ends (`StaticKVCache.release`); a
    generation running while another holds the buffers gets new ones.
    """

    def __init__(self) -> None:
        self.free: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def take(self, key: tuple) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A free (keys, values) pair for `key`, or None."""
        stack = self.free.get(key)
        return stack.pop() if stack else None

    def give(self, key: tuple, kv: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.free.setdefault(key, []).append(kv)


class SlotKV(CacheLayerMixin):
    """One attention layer's K/V: (B, H_kv, max_len, D) buffers, allocated on the first write.

    `filled` is this layer's write pointer: positions [0, filled) hold valid K/V.
    """

    is_compileable = True
    is_sliding = False

    def __init__(self, max_len: int, slot: int = 0, pool: KVPool | None = None):
        super().__init__()
        self.max_len = max_len
        self.filled = 0
        self.slot = slot
        self.pool = pool
        self.key: tuple | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # Shapes come from the first write, so any head count / head dim (GQA, Gemma, Phi3) just works.
        b, h, _, d = key_states.shape
        hv, dv = value_states.shape[1], value_states.shape[-1]
        self.key = (self.slot, b, h, hv, self.max_len, d, dv, key_states.dtype, key_states.device)
        kv = self.pool.take(self.key) if self.pool is not None else None
        if kv is None:
            kv = key_states.new_zeros(b, h, self.max_len, d), value_states.new_zeros(b, hv, self.max_len, dv)
            if self.pool is not None:  # the same tensors every generation: CUDA graphs may read them in place
                for t in kv:
                    torch._dynamo.mark_static_address(t)
        self.keys, self.values = kv
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
    writes the new (B, H_kv, T, D) states where the engine said before the call:

    * ``pos`` (a Python int, `index` None): at [pos, pos + T), returning K/V for
      positions [0, pos + T). Positions past that are stale or empty and never
      attended, so rolling back is only moving write pointers (`crop`).
    * ``index`` (a (T,) device tensor): at those positions, returning the whole
      (B, H_kv, max_len, D) buffers; the caller's mask hides the invalid
      positions and the caller moves the write pointers (`mark_written`). Nothing
      here reads a Python position, which is what lets a compiled step run for
      every token without being traced again. An eager step may set ``limit``
      (the filled length, known on the host) to get back [0, limit) only.

    Args:
        slots: The cache slots (layer indices; exits own slots N, N+1, ...) this cache may hold.
        num_slots: Total slot count of the model (N + number of exits).
        max_len: Tokens each slot can hold (prompt + new tokens + draft).
        pool: Take the buffers from this pool (and give them back on `release`).
    """

    def __init__(self, slots: Sequence[int], num_slots: int, max_len: int, pool: KVPool | None = None):
        layers: list = [None] * num_slots
        for s in slots:
            layers[s] = SlotKV(max_len, s, pool)
        super().__init__(layers=layers)
        self.slots = tuple(sorted(set(slots)))
        self.max_len = max_len
        self.pos = 0  # where the next `update` writes (set by the engine before each forward)
        self.index: torch.Tensor | None = None  # or: (T,) device positions of a static step
        self.limit: int | None = None  # an eager static step: return K/V for positions [0, limit) only

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        if layer is None:
            raise RuntimeError(f"cache slot {layer_idx} is not part of this cache (slots {list(self.slots)})")
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        if self.index is not None:
            index = self.index.to(key_states.device)  # a no-op unless a device_map spreads the layers
            layer.keys.index_copy_(2, index, key_states)
            layer.values.index_copy_(2, index, value_states)
            if self.limit is not None:  # an eager step: attend to the filled part only, as its mask says
                return layer.keys[:, :, : self.limit], layer.values[:, :, : self.limit]
            return layer.keys, layer.values
        start, end = self.pos, self.pos + key_states.shape[2]
        if start > layer.filled:  # a hole would be attended as zeros: a bookkeeping bug, never silent
            raise RuntimeError(f"cache slot {layer_idx}: writing at {start} but only {layer.filled} positions are filled")
        if end > self.max_len:
            raise RuntimeError(f"cache slot {layer_idx} holds {self.max_len} positions; writing up to {end}")
        layer.keys[:, :, start:end] = key_states
        layer.values[:, :, start:end] = value_states
        layer.filled = end  # writing at `start` drops whatever was after it (e.g. rejected drafts)
        return layer.keys[:, :, :end], layer.values[:, :, :end]

    def check_write(self, slots: Sequence[int], start: int, length: int = 1) -> None:
        """Refuse (before a static step) a write at `start` that would leave a hole or overflow."""
        for s in slots:
            layer = self.layers[s]
            if layer is None or not layer.is_initialized:
                raise RuntimeError(f"cache slot {s} was never written: run the prompt (prefill) before decode steps")
            if start > layer.filled:
                raise RuntimeError(f"cache slot {s}: writing at {start} but only {layer.filled} positions are filled")
        if start + length > self.max_len:
            raise RuntimeError(f"the cache holds {self.max_len} positions; writing up to {start + length}")

    def mark_written(self, slots: Sequence[int], end: int) -> None:
        """Move the write pointers of `slots` to `end` after a static step wrote up to it."""
        for s in slots:
            self.layers[s].filled = end

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

    def release(self) -> None:
        """Give pooled buffers back (the cache is empty afterwards); nothing to do without a pool."""
        for s in self.slots:
            layer = self.layers[s]
            if layer.pool is not None and layer.is_initialized:
                layer.pool.give(layer.key, (layer.keys, layer.values))
                layer.keys = layer.values = None
                layer.is_initialized = False
                layer.filled = 0


def kv_pool(model: BalconyModel) -> KVPool:
    """The model's pool of K/V buffers for compiled decoding (a plain attribute: not a submodule, not saved)."""
    return model.__dict__.setdefault("_balcony_kv_pool", KVPool())


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
