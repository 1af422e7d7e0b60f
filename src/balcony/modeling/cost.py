"""The cost model: what a budget computes per token (parameters, ideal speed-up) and what its KV cache holds.

A decode step reads every weight the budget runs once (at batch 1 that is its
cost), so compute and time go with parameters: decoder layers 1..j, the exit's
layer and norm, and the LM head (the embedding lookup is free).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..inference.cache import budget_slots

if TYPE_CHECKING:
    from .model import BalconyModel, Exit


def count_parameters(model: BalconyModel, exit: Exit = None, *, embeddings: bool = False) -> int:
    """Parameters a budget runs per token: layers 1..j, its exit module (or the final norm), + embeddings and head if asked.

    Example:
        >>> count_parameters(model, "S") < count_parameters(model, None)  # doctest: +SKIP
        True
    """
    j = model.resolve_exit(exit)
    parts = model.parts
    total = sum(p.numel() for layer in parts.layers[:j] for p in layer.parameters())
    if j == model.num_layers and str(j) not in model.exits:
        total += sum(p.numel() for p in parts.norm.parameters())
    else:
        total += sum(p.numel() for p in model.exits[str(j)].parameters())
    if embeddings:
        total += sum(p.numel() for p in parts.embed_tokens.parameters())
        if parts.lm_head.weight is not parts.embed_tokens.weight:
            total += parts.lm_head.weight.numel()
    return total


def ideal_speedup(model: BalconyModel, exit: Exit) -> float:
    """Compute of the full model / compute of a budget: decoder layers + exit layer + norm + LM head.

    Example:
        >>> ideal_speedup(model, "S")  # doctest: +SKIP
        1.65
    """
    head = model.parts.lm_head.weight.numel()
    return (model.count_parameters(None) + head) / (model.count_parameters(exit) + head)


def kv_cache_bytes(model: BalconyModel, exit: Exit, batch: int, length: int) -> int:
    """Exact KV-cache bytes of a budget: layers 1..j (+ the exit's layer) x 2 x B x H_kv x L x D x itemsize."""
    j = model.resolve_exit(exit)
    cfg = model.base.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    itemsize = next(model.base.parameters()).element_size()
    return len(budget_slots(model, j)) * 2 * batch * kv_heads * length * head_dim * itemsize
