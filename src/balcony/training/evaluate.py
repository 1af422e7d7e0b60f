"""Exit quality during training: KL / agreement / perplexity of every exit against the full model on held-out rows."""

from __future__ import annotations

from typing import Iterable

import torch

from ..metrics import DistillScores
from ..modeling.model import BalconyModel


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
    model appears under key N, scored against itself. A batch that carries a cached
    frozen pass (``taps`` and ``teacher``, as `balcony.training.features.FeatureCache.batch`
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
    n_layers = model.num_layers
    scores = DistillScores()
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
        target = torch.full_like(ids, -100)  # position t predicts labels[t + 1]
        target[:, :-1] = labels[:, 1:]
        h_t = teacher.reshape(-1, teacher.shape[-1])
        students = {j: exit_hidden[j].reshape(-1, h_t.shape[-1]) for j in exits}
        students.setdefault(n_layers, h_t)  # the full model, scored like any exit
        scores.update(h_t, students, model.parts.lm_head, targets=target.reshape(-1), mask=mask.reshape(-1), chunk=chunk_size)
    return {j: {k: v for k, v in r.items() if k != "nll"} for j, r in scores.result().items()}
