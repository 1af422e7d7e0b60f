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


def token_exit_cost(model: BalconyModel, checkpoints: list[int], confidence_vocab: int | None = None) -> dict[int, int]:
    """Per-token compute of token-level exits, by the layer where a token's output is decided.

    A token decided at checkpoint k ran layers 1..j_k, every checked exit up to k (its layer and norm)
    with the confidence head (the first `confidence_vocab` rows of the LM head, or all of it), and the
    LM head once more to emit, unless the confidence head already was the whole head. A token that went
    to the full model checked every exit, then ran the rest of the layers, the final norm and the head.
    Backfilling skipped layers later is not counted: at batch 1 it rides on a pass the weights are read
    for anyway. On the same basis as `ideal_speedup`: full-model compute / mean cost is the ideal speed-up.

    Example:
        >>> token_exit_cost(model, [14, 17, 20, 30], confidence_vocab=8192)[14]  # doctest: +SKIP
        64_000_000
    """
    parts = model.parts
    head = parts.lm_head.weight.numel()
    hidden = parts.lm_head.weight.shape[1]
    score = head if not confidence_vocab or confidence_vocab >= parts.lm_head.weight.shape[0] else confidence_vocab * hidden
    emit = 0 if score == head else head
    layers = [sum(p.numel() for p in layer.parameters()) for layer in parts.layers]
    out, checked = {}, 0
    for j in checkpoints:
        if j == model.num_layers:
            out[j] = sum(layers) + checked + sum(p.numel() for p in parts.norm.parameters()) + head
            break
        checked += sum(p.numel() for p in model.exits[str(j)].parameters()) + score
        out[j] = sum(layers[:j]) + checked + emit
    return out
