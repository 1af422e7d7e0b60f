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

Host syncs: a round waits for the device once, to learn how many drafts were
accepted (that number decides what is emitted and where the next round
writes); the emitted ids come back in the same pause, and EOS / stop strings
are checked on them on the host. Drafting with `draft_threshold` waits once
more per drafted token (whether to draft another depends on the exit's
confidence), and a `draft_width` round once more before verifying (whether
to verify the candidates at all). Nothing else in a round reads the device.

What a round costs at batch 1, where a pass over a layer costs about the same
for 1 to 3 positions (its weights are read once): in units of one decoder
layer, full-depth decoding costs N + H per token (H: the LM head, 8 layers'
worth on SmolLM2-135M). A round with one draft costs N + H (P's own pass and
the verify pass share layers 1..N), plus E + H_d for the exit and the draft
head, plus j for the draft's own pass through layers 1..j, which is wasted
when the draft is rejected. So a draft pays off only when it is accepted with
probability above (j + E + H_d) / (N + H): 0.43-0.59 for SmolLM2's exits at
14-20 with an 8192-id draft head. Three knobs lower the cost or raise the odds:

* `draft_vocab`: the draft head scores only the first ids (8192 of 49152:
  H_d = H / 6; BPE vocabularies list frequent tokens first);
* `draft_threshold`: draft only when the exit is sure (Kangaroo-style), so
  drafts that would be rejected are not paid for;
* `draft_width`: the exit's top 2-3 tokens go through layers 1..j side by
  side (one weight pass) and are verified together (a tree of depth 1), so a
  drafted position is accepted more often for the same cost.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Iterator

import torch

from .cache import budget_slots
from .devices import check_generator, execution_device
from .engine import run_exit, run_layers
from .options import DecodeOptions, DraftOptions, resolve_options
from .quantize import head_rows
from .sampling import SamplingConfig, logits_to_probs, sample, sample_from_probs
from .spans import make_span, new_state, tree_span
from .stopping import StopChecker, check_inputs

if TYPE_CHECKING:  # types only: inference runs on any model with `parts` and `exits`
    from ..modeling.model import BalconyModel, Exit


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
    a = int(ok.long().cumprod(0).sum())  # the round's one host sync
    if a == k:
        return a, sample_from_probs(p[k : k + 1], generator)
    residual = (p[a] - q[a]).clamp(min=0)
    # p == q at this position (rejection had probability 0): draw from p; chosen on the device, no second sync.
    residual = torch.where(residual.sum() > 0, residual, p[a])
    return a, sample_from_probs(residual[None], generator)


def _draft_exit(model: BalconyModel, exit: Exit) -> int:
    """The draft exit layer, which must be below the full model."""
    j = model.resolve_exit(exit)
    n = model.num_layers
    if j >= n:
        raise ValueError(
            f"speculative decoding needs a draft exit below the full model: exit={exit!r} is layer {j} of {n}; "
            f"pick one of the exit layers {model.exit_layers} (e.g. exit='S')"
        )
    return j


def speculative_stream(
    model: BalconyModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    exit: Exit = "S",
    options: DecodeOptions | None = None,
    draft: DraftOptions | None = None,
    stats: SpeculativeStats | None = None,
    **kwargs: Any,
) -> Iterator[torch.Tensor]:
    """Yield the (1,) tokens of one sequence as verify passes accept them.

    Args:
        model: The Balcony model.
        input_ids: (1, T) prompt ids.
        attention_mask: Optional (1, T) mask (left padding is allowed).
        exit: Draft budget (name or exit layer), below the full model.
        options: How to decode (`DecodeOptions`); sampling keeps the full model's distribution.
        draft: How to draft (`DraftOptions`):
            ``draft_length``: most tokens drafted per round (gamma >= 1);
            ``draft_threshold``: stop drafting once the exit's top-1 probability is below this (Kangaroo-style);
            ``draft_vocab``: draft among the first token ids only (None: all). The draft head then reads
            that many rows of the LM head; BPE vocabularies list frequent tokens first, so few drafts
            are lost. The output is unchanged (greedy: still the full model's; sampling: still its distribution);
            ``draft_width``: candidates drafted for the next position (greedy, draft_length=1): the
            exit's top tokens go through layers 1..j side by side and are verified in one pass (a tree
            of depth 1). At batch 1 a few positions cost one weight pass, so 2-3 candidates cost about
            what one does and are accepted more often; `draft_threshold` then gates the round on the
            candidates' total probability, and `stats.drafted` counts rounds that drafted.
        stats: Filled in as decoding goes (pass a fresh one to read the counters).
        **kwargs: `DecodeOptions` and `DraftOptions` fields, overriding `options` and `draft`.

    Raises:
        ValueError: a batch of more than one sequence (use `speculative_generate`), or bad arguments.
    """
    opts, dr = resolve_options(options, kwargs, draft, drafting=True)
    check_inputs(input_ids, attention_mask, opts.max_new_tokens)
    j = _draft_exit(model, exit)
    dr.check(opts)
    if input_ids.shape[0] != 1:
        raise ValueError(
            f"speculative_stream decodes one sequence, got batch size {input_ids.shape[0]}; "
            "speculative_generate runs a batch one sequence at a time"
        )
    cfg, generator, max_new_tokens = opts.sampling, opts.generator, opts.max_new_tokens
    draft_length, draft_threshold, draft_vocab, draft_width = dr.draft_length, dr.draft_threshold, dr.draft_vocab, dr.draft_width
    stats = stats if stats is not None else SpeculativeStats(j, draft_length)
    n_layers, t = model.num_layers, input_ids.shape[1]
    parts = model.parts
    draft_head = head_rows(parts.lm_head, draft_vocab) if draft_vocab else parts.lm_head
    # One cache for both: layers 1..N (shared by drafter and verifier), the draft exit's slot, and the
    # full budget's own exit slot if the model has an exit at layer N.
    slots = sorted(set(budget_slots(model, n_layers)) | set(budget_slots(model, j)))
    check_generator(generator, execution_device(model))
    state = new_state(model, slots, 1, t + max_new_tokens + max(draft_length, draft_width) + 1, attention_mask)
    eos = set(opts.eos_ids)
    # Stop strings are matched on host ids, so their checker lives on the CPU: no device sync per token.
    strings = StopChecker(1, None, opts.stop_strings, opts.tokenizer, None, torch.device("cpu")) if opts.stop_strings else None

    def emit(tokens: list[torch.Tensor]) -> tuple[int, bool]:
        """(how many of a round's (1,) tokens to yield, whether generation ends with them).

        Their ids come back in one copy: the round already waited for the device to count its accepted drafts.
        """
        ids = torch.cat(tokens).tolist()
        for i, tid in enumerate(ids):
            stats.generated += 1
            if strings is not None:
                strings(torch.tensor([tid]))
            if tid in eos or (strings is not None and strings.all_done()) or stats.generated >= max_new_tokens:
                return i + 1, True
        return len(ids), False

    with torch.no_grad():
        # Prefill: layers 1..j, the exit (only to fill its cache), then layers j+1..N for the first token.
        hidden = parts.embed_tokens(input_ids)
        position_ids = None if state.pad is None else (attention_mask.to(state.arange.device).long().cumsum(-1) - 1).clamp(min=0)
        span = make_span(model, state, 0, t, hidden, position_ids)
        hidden = run_layers(model, state, span, hidden, 0, j)
        run_exit(model, state, span, hidden, j)
        full = run_exit(model, state, span, run_layers(model, state, span, hidden, j, n_layers), n_layers)
        logits = parts.lm_head(full[:, -1])  # (1, V)
        pending = sample(logits, cfg, generator)  # (1,): chosen by the full model, not yet run through any layer
        n = t  # committed positions: [0, n) hold valid K/V in every slot (the exit's may lag, see `lag`)
        lag = None  # (1, m, H) hidden states at layer j whose exit K/V are still to be written
        _, done = emit([pending])
        yield pending
        if done:
            return
        no_drafts = torch.zeros(0, dtype=torch.long, device=input_ids.device)
        while True:
            k_max = min(draft_length, max_new_tokens - stats.generated - 1)  # drafts past the budget are wasted
            if draft_width > 1 and k_max >= 1:
                toks, n, lag = _tree_round(model, state, pending, n, lag, j, draft_head, draft_width, draft_threshold, stats)
                m, done = emit(toks)
                yield from toks[:m]
                if done:
                    return
                pending = toks[-1]
                continue
            # --- draft: P, d1, ..., dk through layers 1..j; all but the last through the exit too.
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
                q_logits = draft_head(e)  # (1, V) or (1, draft_vocab)
                q = logits_to_probs(q_logits, cfg) if cfg.do_sample else None
                if draft_threshold is not None:
                    # The exit's top-1 probability (greedy: at temperature 1), exp(max - logsumexp): one host sync.
                    top1 = q.max() if q is not None else (q_logits.max() - torch.logsumexp(q_logits.float(), -1)).exp()
                    if float(top1) < draft_threshold:
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
            if q_all is not None and q_all.shape[-1] < p.shape[-1]:  # a draft vocabulary: no mass on the other ids
                q_all = torch.nn.functional.pad(q_all, (0, p.shape[-1] - q_all.shape[-1]))
            a, nxt = accept_drafts(p, q_all, drafts_t, cfg, generator)
            stats.rounds += 1
            stats.drafted += k
            stats.accepted += a
            # --- roll back: keep P, d1..da; the exit's missing K/V are kept only if all drafts survived.
            n = n + a + 1
            state.cache.crop(n)
            if a < k or last_has_exit:
                lag = None
            toks = [drafts_t[i : i + 1] for i in range(a)] + [nxt]
            m, done = emit(toks)
            yield from toks[:m]
            if done:
                return
            pending = nxt


def _tree_round(
    model: BalconyModel,
    state,
    pending: torch.Tensor,
    n: int,
    lag: torch.Tensor | None,
    j: int,
    draft_head,
    width: int,
    threshold: float | None,
    stats: SpeculativeStats,
) -> tuple[list[torch.Tensor], int, torch.Tensor | None]:
    """One greedy round drafting `width` candidates for one position; returns (tokens to emit, new n, new lag).

    P (at cache index n) runs through layers 1..j and the exit (with any lagging positions); the exit's
    top-`width` tokens run through layers 1..j side by side at indices n+1..n+width; then [P, candidates]
    run through layers j+1..N in one pass. A candidate equal to the full model's token after P is
    accepted, with the full model's token after it; its K/V move to index n + 1 in every slot.
    """
    parts, n_layers = model.parts, model.num_layers
    x = parts.embed_tokens(pending[:, None])  # (1, 1, H)
    span = make_span(model, state, n, 1, x)
    hp = run_layers(model, state, span, x, 0, j)  # (1, 1, H) P after layer j
    h = hp
    if lag is not None:  # positions whose exit K/V are missing go first
        h = torch.cat([lag, hp], 1)
        span = make_span(model, state, n - lag.shape[1], h.shape[1], h)
    q_logits = draft_head(run_exit(model, state, span, h, j)[:, -1])[0]  # (V,)
    top = q_logits.topk(min(width, q_logits.shape[-1]))
    go = threshold is None or float((top.values - torch.logsumexp(q_logits.float(), -1)).exp().sum()) >= threshold
    stats.rounds += 1
    if not go:  # the exit is unsure: an ordinary step for P through layers j+1..N
        span = make_span(model, state, n, 1, hp)
        out = run_exit(model, state, span, run_layers(model, state, span, hp, j, n_layers), n_layers)
        return [parts.lm_head(out[:, -1]).argmax(-1)], n + 1, None
    cands = top.indices  # (m,) distinct tokens
    m = cands.shape[0]
    xc = parts.embed_tokens(cands[None])  # (1, m, H)
    hc = run_layers(model, state, tree_span(model, state, n, n + 1, m, xc), xc, 0, j)
    hv = torch.cat([hp, hc], 1)  # (1, 1 + m, H)
    span = tree_span(model, state, n, n, m + 1, hv)
    out = run_exit(model, state, span, run_layers(model, state, span, hv, j, n_layers), n_layers)
    target = parts.lm_head(out)[0].argmax(-1)  # (1 + m,): the full model's token after P, after each candidate
    stats.drafted += 1
    hits = (cands == target[0]).tolist()  # the round's verify sync: which candidate (if any) the full model chose
    if True not in hits:
        state.cache.crop(n + 1)
        return [target[:1]], n + 1, None
    b = hits.index(True)
    stats.accepted += 1
    cache = state.cache
    if b:  # the accepted candidate's K/V to index n + 1, where the next round expects them
        for s in cache.slots:
            layer = cache.layers[s]
            if layer.is_initialized and layer.filled > n + 1 + b:
                layer.keys[:, :, n + 1] = layer.keys[:, :, n + 1 + b]
                layer.values[:, :, n + 1] = layer.values[:, :, n + 1 + b]
    cache.crop(n + 2)
    return [cands[b : b + 1], target[b + 1 : b + 2]], n + 2, hc[:, b : b + 1]


def speculative_generate(
    model: BalconyModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    exit: Exit = "S",
    options: DecodeOptions | None = None,
    draft: DraftOptions | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, SpeculativeStats]:
    """Self-speculative generation; returns ((B, T + new) ids, stats).

    A batch is decoded one sequence at a time (each without its padding) and
    the outputs are right-filled with the fill token (`pad_token_id`, else the first EOS id).

    Args:
        model: The Balcony model.
        input_ids: (B, T) prompt ids, left-padded when lengths differ.
        attention_mask: (B, T) 1 for real tokens, 0 for padding.
        exit: Draft budget (name or exit layer), below the full model.
        options: How to decode (`DecodeOptions`; ``compile`` is ignored: speculative decoding runs eagerly).
        draft: How to draft (`DraftOptions`, see `speculative_stream`).
        **kwargs: `DecodeOptions` and `DraftOptions` fields, overriding `options` and `draft`.

    Example:
        >>> out, stats = speculative_generate(model, ids, exit="S", draft_length=4)  # doctest: +SKIP
        >>> stats.acceptance_rate, stats.mean_accepted_length  # doctest: +SKIP
    """
    opts, dr = resolve_options(options, kwargs, draft, drafting=True)
    check_inputs(input_ids, attention_mask, opts.max_new_tokens)
    j = _draft_exit(model, exit)
    dr.check(opts)
    stats = SpeculativeStats(j, dr.draft_length)
    rows = []
    for b in range(input_ids.shape[0]):
        ids = input_ids[b : b + 1]
        if attention_mask is not None:
            ids = ids[:, attention_mask[b].bool()]  # one sequence needs no padding
        row_stats = SpeculativeStats(j, dr.draft_length)
        rows.append(torch.cat(list(speculative_stream(model, ids, exit=j, options=opts, draft=dr, stats=row_stats))))
        stats.merge(row_stats)
    width = max(r.shape[0] for r in rows)
    new = torch.full((len(rows), width), opts.fill_token, dtype=input_ids.dtype, device=input_ids.device)
    for b, r in enumerate(rows):
        new[b, : r.shape[0]] = r
    return torch.cat([input_ids, new], 1), stats
