"""The pre-sized KV cache: one (B, H_kv, max_len, D) buffer per slot, written in place at a movable pointer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

if TYPE_CHECKING:  # types only: inference runs on any model with `parts` and `exits`
    from ..modeling.model import BalconyModel


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
