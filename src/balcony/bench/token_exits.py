"""Token-level exits, measured: decode speed-up over full depth and agreement along the generated text, per threshold.

For each batch size, one round-robin run times greedy decoding of the same prompts at full depth, at
every fixed budget and at every threshold (EOS ignored, so every row decodes the same number of
tokens; the rate excludes prefill and the first token). Along each generated sequence it also
measures how often the emitted token is the one the full model would choose given the same prefix
(one full-depth forward over the sequence), and how much of the answer is identical to full-depth
greedy decoding before the first difference.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import torch

from ..inference.engine import generate_stream
from ..inference.options import ExitPolicy
from ..inference.token_exits import (
    TokenExitStats,
    auto_label,
    checkpoints,
    token_exit_stream,
)
from ..modeling.cost import ideal_speedup, token_exit_cost
from ..modeling.model import BalconyModel
from .measure import run_cases

PROMPTS = (
    "Why is the sky blue?",
    "Give three tips for staying focused while studying.",
    "Explain what a neural network is to a ten-year-old.",
    "Write a short poem about the sea.",
    "What are the main causes of the seasons on Earth?",
    "Describe how to make a cup of tea.",
    "What is the difference between weather and climate?",
    "Summarise the plot of a fairy tale you know.",
)


def chat_batch(tokenizer, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts through the chat template (when the tokenizer has one), left-padded: ((B, T) ids, (B, T) mask)."""
    rows = []
    for p in prompts:
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            rows.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            rows.append(tokenizer(p)["input_ids"])
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


def run_token_exit_bench(
    model: BalconyModel,
    tokenizer,
    thresholds: Sequence[float],
    *,
    prompts: Sequence[str] = PROMPTS,
    batch_sizes: Sequence[int] = (1,),
    max_new_tokens: int = 48,
    repeats: int = 3,
    policy: ExitPolicy | None = None,
    text_windows: Sequence[Sequence[int]] | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Measure decode speed-up and agreement for fixed budgets and thresholds; a JSON-ready dict.

    Two kinds of runs, each timed at every batch size:

    * ``batch<B>``: greedy answers to chat `prompts` (the model's own text; agreement along the text
      compares each emitted token with the full model's choice on the same prefix).
    * ``text_batch<B>`` (with `text_windows`): teacher-forced decoding along held-out text. Each window
      is split into a prompt and its last `max_new_tokens` - 1 tokens, which are fed one step at a time
      whatever the model chose, so the depths and the agreement are those of the text, as
      `balcony eval --thresholds` scores it, here with the decode loop's real speed.

    Example:
        >>> result = run_token_exit_bench(model, tok, [0.5, 0.8], batch_sizes=(1, 8))  # doctest: +SKIP
        >>> result["batch1"]["auto@0.8"]["speedup"]  # doctest: +SKIP
    """
    if max_new_tokens < 2:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 2 to time decoding apart from prefill")
    policy = policy or ExitPolicy()
    points = checkpoints(model, policy)
    names = {j: name for name, j in model.budgets.items()}
    subset = None if policy.exits is None else [names.get(j, str(j)) for j in points[:-1]]
    cost = token_exit_cost(model, points, policy.confidence_vocab)
    full_cost = model.count_parameters(None) + model.parts.lm_head.weight.numel()
    result: dict = {"thresholds": [float(t) for t in thresholds], "max_new_tokens": max_new_tokens, "repeats": repeats,
                    "checkpoints": points, "exits": subset, "confidence_vocab": policy.confidence_vocab, "prompts": list(prompts)}
    if text_windows is not None:
        short = [len(w) for w in text_windows if len(w) < max_new_tokens + 1]
        if short or not text_windows:
            raise ValueError(f"text windows of {short[:3] or 'no'} tokens: each needs >= max_new_tokens + 1 = {max_new_tokens + 1} "
                             "(a prompt, then the tokens fed)")
        result["text_windows"] = len(text_windows)
    for b in batch_sizes:
        groups = [list(prompts[i : i + b]) for i in range(0, len(prompts), b)]
        groups = [g for g in groups if len(g) == b] or [list(prompts[:b])]
        runs = [("batch", [(*chat_batch(tokenizer, g), None) for g in groups])]
        if text_windows is not None:
            runs.append(("text_batch", _text_batches(text_windows, b, max_new_tokens)))
        for kind, inputs in runs:
            rows = _measure(model, inputs, thresholds, policy, subset, max_new_tokens, repeats, log)
            for key, row in rows.items():
                st = row.pop("stats", None)
                if st is not None:
                    mean_cost = sum(cost[j] * c for j, c in st.counts.items()) / max(st.tokens, 1)
                    row.update(mean_layers=st.mean_layers, ideal_speedup=full_cost / mean_cost, tokens_decided=st.tokens,
                               exits={j: st.fraction(j) for j in points}, catchup_positions=st.catchup_positions)
                else:
                    row.update(mean_layers=float(model.budgets[key]), ideal_speedup=ideal_speedup(model, key))
            result[f"{kind}{b}"] = rows
            log(f"[bench] token-level exits, {kind} {b}: " + ", ".join(f"{k} {r['speedup']:.2f}x" for k, r in rows.items()))
    return result


def _text_batches(windows: Sequence[Sequence[int]], b: int, new: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Windows -> (prompt ids, mask, fed ids) per batch of `b`: the last `new` - 1 tokens are fed, the rest is the
    prompt (left-padded to the longest prompt of the batch)."""
    out = []
    for i in range(0, len(windows) - b + 1, b):
        rows = [list(w) for w in windows[i : i + b]]
        prompts = [w[: len(w) - (new - 1)] for w in rows]
        width = max(len(p) for p in prompts)
        ids = torch.zeros(b, width, dtype=torch.long)
        mask = torch.zeros(b, width, dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        out.append((ids, mask, torch.tensor([w[len(w) - (new - 1):] for w in rows])))
    if not out:
        raise ValueError(f"{len(windows)} text windows make no batch of {b}")
    return out


def _measure(model, inputs, thresholds, policy, subset, max_new_tokens, repeats, log) -> dict[str, dict]:
    """Time every budget and threshold round-robin over `inputs` ((ids, mask, fed ids or None) per batch)."""
    points = checkpoints(model, policy)
    outputs: dict[str, list[torch.Tensor]] = {}
    stats: dict[str, TokenExitStats] = {}

    def timed(key: str, make_stream) -> Callable[[], float]:
        def run() -> float:
            seconds, outs = 0.0, []
            if key in stats:  # each timed run counts its own tokens, over every batch of inputs
                stats[key] = TokenExitStats(points)
            for ids, mask, fed in inputs:
                toks, first = [], None
                for tok in make_stream(ids, mask, fed):
                    if first is None:
                        first = time.perf_counter()
                    toks.append(tok)
                seconds += time.perf_counter() - first
                outs.append(torch.cat([ids, torch.stack(toks, 1)], 1))
            outputs[key] = outs
            return seconds
        return run

    cases: dict[str, Callable[[], float]] = {}
    for name, j in model.budgets.items():
        cases[name] = timed(name, lambda ids, mask, fed, j=j: generate_stream(
            model, ids, mask, exit=j, max_new_tokens=max_new_tokens, teacher_tokens=fed))
    for tau in thresholds:
        key = auto_label(float(tau), subset)
        stats[key] = TokenExitStats(points)

        def stream(ids, mask, fed, tau=tau, key=key):
            return token_exit_stream(model, ids, mask, policy=policy, threshold=float(tau), max_new_tokens=max_new_tokens,
                                     stats=stats[key], teacher_tokens=fed)

        cases[key] = timed(key, stream)
    runs, _ = run_cases(cases, repeats, log)
    b = inputs[0][0].shape[0]
    tokens = len(inputs) * b * (max_new_tokens - 1)
    full_name = model.config.full_budget
    full_rate = tokens / statistics.median(runs[full_name])
    teacher_forced = inputs[0][2] is not None
    rows = {}
    for key, times in runs.items():
        rate = tokens / statistics.median(times)
        if teacher_forced:  # the same text fed to every run: agreement is a direct comparison with the full model's choices
            same = sum(int((o[:, ids.shape[1]:] == f[:, ids.shape[1]:]).sum()) for o, f, (ids, _, _) in zip(outputs[key], outputs[full_name], inputs))
            along = {"agreement_along_text": same / (len(inputs) * b * max_new_tokens), "identical_prefix": None}
        else:
            along = _along_text(model, outputs[key], outputs[full_name], inputs)
        rows[key] = {"decode_tok_s": rate, "speedup": rate / full_rate, **along, **({"stats": stats[key]} if key in stats else {})}
    return rows


@torch.no_grad()
def _along_text(model: BalconyModel, outs: list[torch.Tensor], full: list[torch.Tensor], inputs) -> dict:
    """Agreement of each emitted token with the full model's choice on the same prefix, and the identical prefix."""
    agree = total = same = 0
    for seq, ref, (ids, mask, _) in zip(outs, full, inputs):
        t = ids.shape[1]
        full_mask = torch.cat([mask, torch.ones(seq.shape[0], seq.shape[1] - t, dtype=mask.dtype)], 1)
        choice = model(seq, full_mask, exit=None).logits[:, t - 1 : -1].argmax(-1)  # the full model's pick at each step
        emitted = seq[:, t:]
        agree += int((choice == emitted).sum())
        total += emitted.numel()
        diff = (emitted != ref[:, t:]).long()
        first = torch.where(diff.any(1), diff.argmax(1), torch.full((seq.shape[0],), emitted.shape[1]))
        same += int(first.sum())
    return {"agreement_along_text": agree / max(total, 1), "identical_prefix": same / max(total, 1)}


def format_token_exit_bench(result: dict) -> str:
    """The measured rows as a text table, one block per run (chat answers or text) and batch size."""
    lines = []
    blocks = [k for k in result if k.startswith(("batch", "text_batch"))]
    w = max([17, *(len(n) + 9 for k in blocks for n in result[k])])
    for key in blocks:
        lines.append(f"{key + ':':<{w}}{'tok/s':>8}{'speed-up':>10}{'ideal':>8}{'mean layers':>13}{'agree along text':>18}{'identical prefix':>18}")
        for name, r in result[key].items():
            prefix = "" if r["identical_prefix"] is None else f"{100 * r['identical_prefix']:.1f}%"
            lines.append(f"{'':<7}{name:<{w - 7}}{r['decode_tok_s']:>8.1f}{r['speedup']:>9.2f}x{r['ideal_speedup']:>7.2f}x"
                         f"{r['mean_layers']:>13.2f}{100 * r['agreement_along_text']:>17.1f}%{prefix:>18}")
    return "\n".join(lines)
