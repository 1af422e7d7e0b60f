"""Self-speculative decoding: draft at a Balcony exit, verify with the rest of the same model.

A round, for draft exit j of an N-layer model, with P the last token the full
model chose (not yet run through any layer) at position n:

1. Draft: run P through layers 1..j, then exit j and the head -> draft d1;
   run d1 through layers 1..j and the exit -> d2; ... up to `draft_length`
   drafts. The last draft goes through layers 1..j only: its hidden state is
   what the verifier needs, and its exit output would only feed a draft that is
   never made.
2. Verify: run the saved hidden states at layer j of [P, d1, ..., dk] through
   layers j+1..N, the final norm and the head, in one pass -> the full model's
   distributions at the k + 1 positions. Layers 1..j never run twice: their K/V
   from drafting are the full model's K/V for those layers.
3. Accept the longest prefix of drafts the full model agrees with (greedy: same
   argmax; sampling: accept d with probability min(1, p(d) / q(d)), else
   resample from norm(max(0, p - q))), then add the full model's own token at
   the first disagreement (or after the last draft). That token is the next
   round's P.
4. Roll back: every cache slot's write pointer moves to n + accepted + 1; the
   rejected positions are overwritten by the next round.

The exit keeps its own cache slot. When every draft is accepted, the last
draft's position has no exit K/V yet (step 1 skipped its exit); that hidden
state is carried over and runs through the exit together with the next P.

With greedy decoding the output equals full-depth greedy decoding; with
sampling its distribution is the full model's (Leviathan et al., 2023).
Batches are decoded one sequence at a time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator, Sequence

import torch

from .engine import StopChecker, budget_slots, check_inputs, make_span, new_state, run_exit, run_layers
from .generation import SamplingConfig, logits_to_probs, sample, sample_from_probs
from .model import BalconyModel, Exit


@dataclass
class SpeculativeStats:
    """Counters of one speculative generation.

    Attributes:
        draft_exit: The exit layer that drafted.
        draft_length: The most tokens drafted per round.
        rounds: Verify passes (each runs layers j+1..N once).
        drafted: Draft tokens proposed.
        accepted: Draft tokens the full model accepted.
        generated: Tokens emitted (prompt excluded).
    """

    draft_exit: int
    draft_length: int
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    generated: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per verify pass: accepted drafts plus the verifier's own token (1 = no speed-up)."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "acceptance_rate": self.acceptance_rate, "mean_accepted_length": self.mean_accepted_length}

    def merge(self, other: "SpeculativeStats") -> None:
        for name in ("rounds", "drafted", "accepted", "generated"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def accept_drafts(
    p: torch.Tensor,
    q: torch.Tensor | None,
    drafts: torch.Tensor,
    cfg: SamplingConfig,
    generator: torch.Generator | None = None,
) -> tuple[int, torch.Tensor]:
    """The verification rule: how many drafts to keep, and the full model's next token.

    Args:
        p: (k + 1, V) full-model probabilities (sampling) or logits (greedy) at the k + 1 verified positions.
        q: (k, V) draft probabilities at the k drafted positions (unused when greedy).
        drafts: (k,) the draft tokens.
        cfg: Sampling settings (greedy when ``cfg.do_sample`` is False).
        generator: For the uniform draws and the resample.

    Returns:
        (a, token): a accepted drafts (0..k) and the (1,) token that follows them.
    """
    k = drafts.shape[0]
    if k == 0:  # nothing drafted: an ordinary decoding step
        return 0, (p[:1].argmax(-1) if not cfg.do_sample else sample_from_probs(p[:1], generator))
    if not cfg.do_sample:
        target = p.argmax(-1)  # (k + 1,)
        a = int((target[:k] == drafts).long().cumprod(0).sum())
        return a, target[a : a + 1]
    idx = torch.arange(k, device=p.device)
    p_d, q_d = p[idx, drafts], q[idx, drafts]  # (k,)
    r = torch.rand(k, generator=generator, device=p.device)
    # Accept with probability min(1, p/q), written without a division (q(d) > 0: d was drawn from q).
    ok = r * q_d < p_d
    a = int(ok.long().cumprod(0).sum())  # one host sync per round
    if a == k:
        return a, sample_from_probs(p[k : k + 1], generator)
    residual = (p[a] - q[a]).clamp(min=0)
    if not bool(residual.sum() > 0):  # p == q at this position: rejection had probability 0
        residual = p[a]
    return a, sample_from_probs(residual[None], generator)


def _check(model: BalconyModel, exit: Exit, draft_length: int, draft_threshold: float | None) -> int:
    j = model.resolve_exit(exit)
    n = model.num_layers
    if j >= n:
        raise ValueError(
            f"speculative decoding needs a draft exit below the full model: exit={exit!r} is layer {j} of {n}; "
            f"pick one of the exit layers {model.exit_layers} (e.g. exit='S')"
        )
    if not isinstance(draft_length, int) or isinstance(draft_length, bool) or draft_length < 1:
        raise ValueError(f"draft_length={draft_length!r} must be an integer >= 1 (tokens drafted per verify pass)")
    if draft_threshold is not None and not 0.0 <= draft_threshold < 1.0:
        raise ValueError(f"draft_threshold={draft_threshold!r} must be in [0, 1) or None")
    return j


def speculative_stream(
    model: BalconyModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    exit: Exit = "S",
    draft_length: int = 4,
    draft_threshold: float | None = None,
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
    stats: SpeculativeStats | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the (1,) tokens of one sequence as verify passes accept them.

    Args:
        model: The Balcony model.
        input_ids: (1, T) prompt ids.
        attention_mask: Optional (1, T) mask (left padding is allowed).
        exit: Draft budget (name or exit layer), below the full model.
        draft_length: Most tokens drafted per round (gamma >= 1).
        draft_threshold: Stop drafting once the exit's top-1 probability is below this (Kangaroo-style).
        max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id, pad_token_id,
            stop_strings, tokenizer, generator: as in `balcony.engine.generate`.
        stats: Filled in as decoding goes (pass a fresh one to read the counters).

    Raises:
        ValueError: a batch of more than one sequence (use `speculative_generate`), or bad arguments.
    """
    check_inputs(input_ids, attention_mask, max_new_tokens)
    j = _check(model, exit, draft_length, draft_threshold)
    if input_ids.shape[0] != 1:
        raise ValueError(
            f"speculative_stream decodes one sequence, got batch size {input_ids.shape[0]}; "
            "speculative_generate runs a batch one sequence at a time"
        )
    cfg = SamplingConfig(do_sample, temperature, top_k, top_p)
    stats = stats if stats is not None else SpeculativeStats(j, draft_length)
    n_layers, t = model.num_layers, input_ids.shape[1]
    parts = model.parts
    # One cache for both: layers 1..N (shared by drafter and verifier), the draft exit's slot, and the
    # full budget's own exit slot if the model has an exit at layer N.
    slots = sorted(set(budget_slots(model, n_layers)) | set(budget_slots(model, j)))
    state = new_state(model, slots, 1, t + max_new_tokens + draft_length + 1, attention_mask)
    stopper = StopChecker(1, eos_token_id, stop_strings, tokenizer, pad_token_id, input_ids.device)

    def emit(token: torch.Tensor) -> bool:
        """Count and check one emitted (1,) token; True when generation is over."""
        stats.generated += 1
        stopper(token)
        return stopper.all_done() or stats.generated >= max_new_tokens

    with torch.no_grad():
        # Prefill: layers 1..j, the exit (only to fill its cache), then layers j+1..N for the first token.
        hidden = parts.embed_tokens(input_ids)
        position_ids = None if state.pad is None else (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        span = make_span(model, state, 0, t, hidden, position_ids)
        hidden = run_layers(model, state, span, hidden, 0, j)
        run_exit(model, state, span, hidden, j)
        full = run_exit(model, state, span, run_layers(model, state, span, hidden, j, n_layers), n_layers)
        logits = parts.lm_head(full[:, -1])  # (1, V)
        pending = sample(logits, cfg, generator)  # (1,): chosen by the full model, not yet run through any layer
        n = t  # committed positions: [0, n) hold valid K/V in every slot (the exit's may lag, see `lag`)
        lag = None  # (1, m, H) hidden states at layer j whose exit K/V are still to be written
        yield pending
        if emit(pending):
            return
        no_drafts = torch.zeros(0, dtype=torch.long, device=input_ids.device)
        while True:
            # --- draft: P, d1, ..., dk through layers 1..j; all but the last through the exit too.
            k_max = min(draft_length, max_new_tokens - stats.generated - 1)  # drafts past the budget are wasted
            token, hs, drafts, qs = pending, [], [], []
            last_has_exit = False
            for i in range(k_max + 1):
                x = parts.embed_tokens(token[:, None])  # (1, 1, H)
                span = make_span(model, state, n + i, 1, x)
                h = run_layers(model, state, span, x, 0, j)  # (1, 1, H)
                hs.append(h)
                if i == k_max:
                    lag = h if lag is None else torch.cat([lag, h], 1)
                    break
                if lag is not None:  # positions whose exit K/V are missing go first
                    h = torch.cat([lag, h], 1)
                    span = make_span(model, state, n + i - lag.shape[1], h.shape[1], h)
                    lag = None
                e = run_exit(model, state, span, h, j)[:, -1]  # (1, H)
                q_logits = parts.lm_head(e)  # (1, V)
                q = logits_to_probs(q_logits, cfg) if (cfg.do_sample or draft_threshold is not None) else None
                if draft_threshold is not None and float(q.max()) < draft_threshold:
                    last_has_exit = True  # the exit is unsure: stop here, keep what is drafted so far
                    break
                token = sample_from_probs(q, generator) if cfg.do_sample else q_logits.argmax(-1)  # (1,)
                drafts.append(token)
                qs.append(q)
            k = len(drafts)
            drafts_t = torch.cat(drafts) if drafts else no_drafts
            # --- verify: layers j+1..N on the k + 1 hidden states drafting left, in one pass.
            hv = torch.cat(hs, 1)  # (1, k + 1, H)
            span = make_span(model, state, n, k + 1, hv)
            out = run_exit(model, state, span, run_layers(model, state, span, hv, j, n_layers), n_layers)
            p_logits = parts.lm_head(out)[0]  # (k + 1, V)
            p = logits_to_probs(p_logits, cfg) if cfg.do_sample else p_logits
            q_all = torch.cat(qs) if (cfg.do_sample and qs) else None
            a, nxt = accept_drafts(p, q_all, drafts_t, cfg, generator)
            stats.rounds += 1
            stats.drafted += k
            stats.accepted += a
            # --- roll back: keep P, d1..da; the exit's missing K/V are kept only if all drafts survived.
            n = n + a + 1
            state.cache.crop(n)
            if a < k or last_has_exit:
                lag = None
            for tok in [drafts_t[i : i + 1] for i in range(a)] + [nxt]:
                yield tok
                if emit(tok):
                    return
            pending = nxt


def speculative_generate(
    model: BalconyModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    exit: Exit = "S",
    draft_length: int = 4,
    draft_threshold: float | None = None,
    max_new_tokens: int = 32,
    pad_token_id: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    compile: bool = False,
    **kwargs,
) -> tuple[torch.Tensor, SpeculativeStats]:
    """Self-speculative generation; returns ((B, T + new) ids, stats).

    A batch is decoded one sequence at a time (each without its padding) and
    the outputs are right-filled with the pad token (default: the first EOS id).

    Args:
        model: The Balcony model.
        input_ids: (B, T) prompt ids, left-padded when lengths differ.
        attention_mask: (B, T) 1 for real tokens, 0 for padding.
        exit: Draft budget (name or exit layer), below the full model.
        draft_length: Most tokens drafted per verify pass (>= 1).
        draft_threshold: Stop a draft early below this exit top-1 probability.
        max_new_tokens: Tokens to add at most.
        pad_token_id, eos_token_id: As in `balcony.engine.generate`.
        compile: Accepted for API symmetry; speculative decoding runs eagerly.
        **kwargs: do_sample, temperature, top_k, top_p, stop_strings, tokenizer, generator.

    Example:
        >>> out, stats = speculative_generate(model, ids, exit="S", draft_length=4)  # doctest: +SKIP
        >>> stats.acceptance_rate, stats.mean_accepted_length  # doctest: +SKIP
    """
    check_inputs(input_ids, attention_mask, max_new_tokens)
    j = _check(model, exit, draft_length, draft_threshold)
    stats = SpeculativeStats(j, draft_length)
    rows = []
    for b in range(input_ids.shape[0]):
        ids = input_ids[b : b + 1]
        if attention_mask is not None:
            ids = ids[:, attention_mask[b].bool()]  # one sequence needs no padding
        row_stats = SpeculativeStats(j, draft_length)
        toks = list(
            speculative_stream(
                model, ids, exit=j, draft_length=draft_length, draft_threshold=draft_threshold,
                max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id, stats=row_stats, **kwargs,
            )
        )
        stats.merge(row_stats)
        rows.append(torch.cat(toks))
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    fill = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    width = max(r.shape[0] for r in rows)
    new = torch.full((len(rows), width), fill, dtype=input_ids.dtype, device=input_ids.device)
    for b, r in enumerate(rows):
        new[b, : r.shape[0]] = r
    return torch.cat([input_ids, new], 1), stats
