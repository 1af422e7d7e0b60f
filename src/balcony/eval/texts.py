"""Distillation metrics on a text set: KL to the full model, top-1 agreement and perplexity per variant."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from ..metrics import DistillScores
from .variants import FULL, Variant, exit_hidden_states


def load_texts(source: str | os.PathLike | Iterable[str]) -> list[str]:
    """Passages for the distillation metrics.

    Args:
        source: A list of passages, or a file: ``.jsonl`` (one record per line, its
            ``text`` field; ``content`` / ``passage`` / ``document`` also work) or text
            (``.txt`` and others: passages separated by blank lines).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: no passage found, or a JSONL record without a text field.
    """
    if not isinstance(source, (str, os.PathLike)):
        texts = [str(t) for t in source if str(t).strip()]
        if not texts:
            raise ValueError("the text set is empty: give at least one non-empty passage")
        return texts
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"text file {str(path)!r} does not exist")
    texts: list[str] = []
    if path.suffix.lower() in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{str(path)!r} line {n} is not JSON: {e}") from e
                if isinstance(record, str):
                    texts.append(record)
                    continue
                key = next((k for k in ("text", "content", "passage", "document") if isinstance(record.get(k), str)), None)
                if key is None:
                    raise ValueError(f"{str(path)!r} line {n} has no 'text' field (keys: {', '.join(sorted(record))})")
                texts.append(record[key])
    else:
        texts = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n")]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"text file {str(path)!r} holds no passages")
    return texts


def text_windows(tokenizer, texts: Sequence[str], seq_len: int = 512, max_tokens: int = 8192) -> list[list[int]]:
    """Tokenise passages and cut them into windows of at most `seq_len` tokens, `max_tokens` in all."""
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} must be >= 2 (a window predicts its next tokens)")
    windows: list[list[int]] = []
    total = 0
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        for s in range(0, len(ids), seq_len):
            w = ids[s : s + seq_len][: max(0, max_tokens - total)]
            if len(w) >= 2:
                windows.append(w)
                total += len(w)
            if total >= max_tokens:
                return windows
    return windows


@torch.no_grad()
def distillation_metrics(
    variants: Sequence[Variant],
    tokenizer,
    texts: Sequence[str] | str | os.PathLike,
    *,
    seq_len: int = 512,
    max_tokens: int = 8192,
    batch_size: int = 8,
    chunk_tokens: int = 256,
    progress: bool = False,
    per_window: bool = False,
) -> dict[str, dict[str, Any]]:
    """KL(full || variant), top-1 agreement with the full model and perplexity, per variant.

    One pass of each base per batch feeds every variant on it; logits are made
    `chunk_tokens` positions at a time (the teacher's once per chunk), so memory never
    holds (tokens x vocab) for more than one variant. The teacher is the evaluated
    model's base (the variant keyed ``full``); a variant on its own trained base is
    read through its own LM head.

    Args:
        variants: Must include the full model (`build_variants` does).
        tokenizer: The base model's tokenizer.
        texts: Passages, or a file for `load_texts`.
        seq_len: Tokens per window.
        max_tokens: Tokens scored in all.
        batch_size: Windows per forward pass.
        chunk_tokens: Positions per logits chunk.
        progress: Show a progress bar.
        per_window: Also return each window's values under ``"windows"``: {"kl": [...],
            "agreement": [...], "nll": [...]}, one number per window (same window order for
            every variant), scaled so that their mean is the overall token-weighted value;
            `balcony.eval.stats.paired_difference` of two variants' lists is then the
            difference of their overall values with a standard error that treats each
            window, not each token, as one observation.

    Returns:
        key -> {"kl": nats/token, "agreement": fraction, "ppl": perplexity,
        "nll": nats/token, "tokens": positions scored}. KL and agreement count every
        position; perplexity the positions that have a next token.
    """
    full = next((v for v in variants if v.key == FULL), None) or next((v for v in variants if v.full), None)
    if full is None:
        raise ValueError("distillation metrics need the full model among the variants (the teacher)")
    passages = load_texts(texts) if isinstance(texts, (str, os.PathLike)) else list(texts)
    windows = sorted(text_windows(tokenizer, passages, seq_len, max_tokens), key=len, reverse=True)
    if not windows:
        raise ValueError("the text set gives no window of 2 or more tokens")
    head = full.model.parts.lm_head
    heads = {v.key: v.model.parts.lm_head for v in variants if v.model.parts.lm_head is not head}
    device = next(head.parameters()).device
    scores = DistillScores()
    batches = [windows[s : s + batch_size] for s in range(0, len(windows), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="distillation metrics", unit="batch")
    for b, batch in enumerate(batches):
        width = len(batch[0])
        ids = torch.zeros(len(batch), width, dtype=torch.long, device=device)
        real = torch.zeros(len(batch), width, dtype=torch.bool, device=device)
        target = torch.full((len(batch), width), -100, dtype=torch.long, device=device)
        for i, w in enumerate(batch):
            ids[i, : len(w)] = torch.tensor(w)
            real[i, : len(w)] = True
            target[i, : len(w) - 1] = torch.tensor(w[1:])
        # Right padding needs no mask: causal attention never lets a real position see it.
        hidden = exit_hidden_states(variants, ids)
        if not per_window:
            rows = {k: h.reshape(-1, h.shape[-1]) for k, h in hidden.items()}
            scores.update(rows[full.key], rows, head, targets=target.reshape(-1), mask=real.reshape(-1), chunk=chunk_tokens, heads=heads)
            continue
        for i in range(len(batch)):  # one update per window keeps its sums apart
            rows = {k: h[i] for k, h in hidden.items()}
            scores.update(rows[full.key], rows, head, targets=target[i], mask=real[i], chunk=chunk_tokens, heads=heads, item=b * batch_size + i)
    out: dict[str, dict[str, Any]] = scores.result()
    if per_window:
        for key in out:
            items = scores.items(key)
            windows = [items[w] for w in sorted(items)]
            tokens = sum(w["tokens"] for w in windows) / len(windows)
            targets = max(sum(w["targets"] for w in windows) / len(windows), 1e-9)
            out[key]["windows"] = {
                "kl": [w["kl"] / tokens for w in windows],
                "agreement": [w["agree"] / tokens for w in windows],
                "nll": [w["nll"] / targets for w in windows],
            }
    return out
