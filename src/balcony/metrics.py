"""Distillation metrics of every exit against the full model, from one frozen pass per batch."""

from __future__ import annotations

from typing import Iterable

import torch

from .model import BalconyModel


@torch.no_grad()
def distill_metrics(
    model: BalconyModel,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    exits: list[int] | None = None,
    chunk_size: int = 512,
    progress: bool = False,
) -> dict[int, dict[str, float]]:
    """Per exit: KL(full || exit) in nats/token, top-1 agreement with the full model, and perplexity.

    One `distill_forward` per batch feeds every exit; logits are formed `chunk_size`
    tokens at a time, so memory never holds (tokens x vocab) for all exits. The full
    model appears under key N with KL 0 and agreement 1. A batch that carries a cached
    frozen pass (``taps`` and ``teacher``, as `balcony.features.FeatureCache.batch`
    gives) runs only the exit modules: the same numbers, without the base.

    Args:
        model: The Balcony model.
        batches: Dicts with ``input_ids`` (B, T) and optionally ``position_ids``,
            ``attention_mask`` and ``labels`` (-100 where a token does not count;
            perplexity uses labels[t + 1] as the target of position t); optionally
            ``taps`` ({exit layer: (B, T, H)}, every scored exit) and ``teacher`` (B, T, H).
        exits: Exit layers to score (default: all).
        chunk_size: Tokens per logits chunk.
        progress: Show a progress bar.

    Returns:
        {exit layer: {"kl": ..., "agreement": ..., "ppl": ..., "tokens": ...}}.

    Example:
        >>> distill_metrics(model, [{"input_ids": ids}])  # doctest: +SKIP
        {14: {'kl': 1.9, 'agreement': 0.41, 'ppl': 48.0, 'tokens': 2048}, ..., 30: {...}}
    """
    exits = sorted(model.config.exit_layers if exits is None else exits)
    head = model.parts.lm_head
    n_layers = model.num_layers
    keys = exits + ([n_layers] if n_layers not in exits else [])
    sums = {j: {"kl": 0.0, "agree": 0.0, "nll": 0.0, "tokens": 0, "ppl_tokens": 0} for j in keys}
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="distill metrics", unit="batch")
    for batch in batches:
        ids = batch["input_ids"]
        if "taps" in batch:
            missing = [j for j in exits if j not in batch["taps"]]
            if missing:
                raise ValueError(f"the cached batch has no hidden states for exit(s) {missing}; it has {sorted(batch['taps'])}")
            exit_hidden = model.run_exits({j: batch["taps"][j] for j in exits}, batch.get("attention_mask"), batch.get("position_ids"))
            teacher = batch["teacher"]
        else:
            out = model.distill_forward(ids, batch.get("attention_mask"), batch.get("position_ids"), exits=exits)
            exit_hidden, teacher = out.exit_hidden, out.teacher_hidden
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        labels = batch.get("labels", ids)
        # Next-token targets: position t predicts labels[t + 1].
        target = torch.full_like(ids, -100)
        target[:, :-1] = labels[:, 1:]
        h_t = teacher.reshape(-1, teacher.shape[-1])
        states = {j: exit_hidden[j].reshape(-1, h_t.shape[-1]) for j in exits}
        states.setdefault(n_layers, h_t)
        flat_mask, flat_target = mask.reshape(-1), target.reshape(-1)
        for s in range(0, h_t.shape[0], chunk_size):
            m = flat_mask[s : s + chunk_size]
            tgt = flat_target[s : s + chunk_size]
            valid = (tgt != -100) & m
            t_logits = head(h_t[s : s + chunk_size]).float()
            t_top = t_logits.argmax(-1)
            log_p = t_logits.log_softmax(-1)  # the teacher's, shared by every exit of the chunk
            p = log_p.exp()
            for j, h in states.items():
                acc = sums[j]
                if h is h_t:  # the full model itself: KL 0, agreement 1
                    log_q = log_p
                    acc["agree"] += m.sum().item()
                else:
                    logits = head(h[s : s + chunk_size]).float()
                    log_q = logits.log_softmax(-1)
                    acc["kl"] += ((p * (log_p - log_q)).sum(-1) * m).sum().item()
                    acc["agree"] += ((logits.argmax(-1) == t_top) & m).sum().item()
                acc["tokens"] += int(m.sum())
                if valid.any():
                    acc["nll"] += -(log_q[valid].gather(-1, tgt[valid, None])).sum().item()
                    acc["ppl_tokens"] += int(valid.sum())
    result = {}
    for j, acc in sums.items():
        n = max(acc["tokens"], 1)
        result[j] = {
            "kl": acc["kl"] / n,
            "agreement": acc["agree"] / n,
            "ppl": float(torch.exp(torch.tensor(acc["nll"] / max(acc["ppl_tokens"], 1)))),
            "tokens": acc["tokens"],
        }
    return result
