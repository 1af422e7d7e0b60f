"""Token-level exits (``exit="auto"``): each token leaves at the first exit confident enough; deeper KV is filled later.

A decode step for the token at cache position p, with checkpoints j_1 < ... < j_k < N (the exits of
the `ExitPolicy`) and the full model last:

1. Run the token through layers 1..j_1 and exit j_1. If the exit's confidence (top-1 probability,
   `ExitPolicy`) is above the threshold, emit its token: the step ends here.
2. Otherwise run the segment of layers j_1+1..j_2, then exit j_2, and so on; after the last exit,
   layers j_k+1..N, the final norm and the head decide.

A token that left early has no K/V in the layers it skipped, yet every later token must attend to it
at every layer. So the hidden state of each position at each checkpoint is kept, and the next time a
token needs a segment, the positions that skipped it run through that segment *together with it*, in
one batched pass (its span starts at the first position the segment lacks): layers 1..j never run
twice, and at batch 1 a pass over a few positions costs about what one does (the weights are read
once). Each exit's own attention cache lags exactly like the segment before it and is filled in the
same pass. Attention at every layer therefore always sees every earlier token, and the base layers'
hidden states are exactly the full model's: the output at position p is the output of the exit that
stopped it, as a full forward of every exit would give it (`tests/test_token_exits.py` checks this).

A batch runs together: the step goes as deep as its least confident unfinished row needs, rows that
already left keep flowing (their deeper K/V is then filled on the way, not later). So a batch costs
the depth of its deepest row at each step; the speed-up shrinks as the batch grows. Checking "has every
row left?" is one host sync per checkpoint, the price of a data-dependent depth.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch

from .cache import budget_slots
from .engine import run_exit, run_layers
from .options import DecodeOptions, ExitPolicy, resolve_options, resolve_policy
from .quantize import head_rows
from .sampling import sample
from .spans import make_span, new_state
from .stopping import StopChecker, check_inputs, check_teacher_tokens

if TYPE_CHECKING:  # types only: inference runs on any model with `parts` and `exits`
    from ..modeling.model import BalconyModel


AUTO_EXIT = "auto"
"""The `exit` value that selects token-level exits."""


@dataclass
class TokenExitStats:
    """Where the tokens of a token-level generation left.

    Attributes:
        checkpoints: The exit layers that could stop a token, then N (the full model).
        counts: layer -> tokens decided there (every row of a batch counts).
        steps: Decode steps (prefill included).
        catchup_positions: Positions run through a segment after they had left (the backfill).
    """

    checkpoints: list[int]
    counts: dict[int, int] = field(default_factory=dict)
    steps: int = 0
    catchup_positions: int = 0

    @property
    def tokens(self) -> int:
        return sum(self.counts.values())

    @property
    def mean_layers(self) -> float:
        """Mean depth at which a token's output was decided (N for the full model)."""
        return sum(j * c for j, c in self.counts.items()) / max(self.tokens, 1)

    def fraction(self, layer: int) -> float:
        """Share of tokens decided at `layer`."""
        return self.counts.get(layer, 0) / max(self.tokens, 1)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokens": self.tokens, "mean_layers": self.mean_layers}


def auto_label(threshold: float, exits: Sequence[str] | None = None) -> str:
    """The name of token-level exits at `threshold` in tables and benchmarks: ``auto@0.8``, or ``auto@0.8[S,L]``
    when only the exits named in `exits` may stop a token."""
    return f"auto@{float(threshold):g}" + ("" if not exits else "[" + ",".join(str(e) for e in exits) + "]")


def confidence(logits: torch.Tensor) -> torch.Tensor:
    """(..., V) logits -> (...) top-1 probability, in float32 (exp(max - logsumexp), no softmax held)."""
    x = logits.float()
    return (x.max(-1).values - torch.logsumexp(x, -1)).exp()


def checkpoints(model: BalconyModel, policy: ExitPolicy) -> list[int]:
    """The exit layers that may stop a token (ascending, below N), then N.

    Raises:
        ValueError: a policy exit that is not an exit below the full model (named, with the accepted ones).
    """
    n = model.num_layers
    if policy.exits is None:
        layers = [j for j in model.exit_layers if j < n]
    else:
        layers = []
        for e in policy.exits:
            j = model.resolve_exit(e)
            if j >= n:
                raise ValueError(f"exits={policy.exits!r}: {e!r} is the full model, not an exit a token can leave at; "
                                 f"exit layers below it: {[k for k in model.exit_layers if k < n]}")
            layers.append(j)
    if not layers:
        raise ValueError(f"token-level exits need an exit below the full model; this model has exit layers {model.exit_layers}")
    return sorted(set(layers)) + [n]


def token_exit_stream(
    model: BalconyModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    options: DecodeOptions | None = None,
    policy: ExitPolicy | None = None,
    stats: TokenExitStats | None = None,
    cancel: Callable[[], bool] | None = None,
    teacher_tokens: torch.Tensor | None = None,
    **kwargs: Any,
) -> Iterator[torch.Tensor]:
    """Yield (B,) new tokens, each from the first exit confident enough (see the module docstring).

    Args:
        model: The Balcony model.
        input_ids: (B, T) prompt ids, left-padded when lengths differ.
        attention_mask: (B, T) 1 for real tokens, 0 for padding.
        options: How to decode (`DecodeOptions`: length, sampling, stopping; ``compile`` is ignored).
        policy: Where tokens leave (`ExitPolicy`: threshold, exits, confidence vocabulary).
        stats: Filled in as decoding goes.
        cancel: Asked before each decode step; True ends the stream (a server abandoning a request).
        teacher_tokens: (B, >= max_new_tokens - 1) ids fed after each step instead of the chosen tokens
            (teacher-forced decoding along a given text; the stream still yields the exits' choices).
        **kwargs: `DecodeOptions` and `ExitPolicy` fields, overriding `options` and `policy`.

    Example:
        >>> for tok in token_exit_stream(model, ids, threshold=0.8, max_new_tokens=16): ...  # doctest: +SKIP
    """
    policy, kwargs = resolve_policy(policy, kwargs)
    opts, _ = resolve_options(options, kwargs)
    check_inputs(input_ids, attention_mask, opts.max_new_tokens)
    points = checkpoints(model, policy)
    stats = stats if stats is not None else TokenExitStats(points)
    n, parts = model.num_layers, model.parts
    cfg, tau = opts.sampling, float(policy.threshold)
    b, t = input_ids.shape
    max_len = t + opts.max_new_tokens
    slots = sorted({s for j in points for s in budget_slots(model, j)})
    state = new_state(model, slots, b, max_len, attention_mask)
    head = parts.lm_head
    score_head = head_rows(head, policy.confidence_vocab) if policy.confidence_vocab else head
    forced = check_teacher_tokens(teacher_tokens, b, opts.max_new_tokens, state.arange.device)
    stopper = StopChecker(b, opts.eos_token_id, opts.stop_strings, opts.tokenizer, opts.pad_token_id, state.arange.device)
    # saved[j]: (B, max_len, H) hidden state after layer j, for positions that still have to go deeper.
    saved: dict[int, torch.Tensor] = {}
    filled = {j: 0 for j in points}  # segment ending at j (and exit j's cache): positions [0, filled[j]) hold K/V

    def step(x: torch.Tensor, pos: int, length: int, position_ids: torch.Tensor | None) -> torch.Tensor:
        """Tokens at [pos, pos + length) -> (B,) next tokens; fills caches as deep as some unfinished row needs."""
        done = stopper.done.clone()
        token = torch.full((b,), opts.fill_token, dtype=torch.long, device=x.device)
        hidden, prev = x, 0
        end = pos + length
        for j in points:
            start = filled[j]  # < pos when earlier positions skipped this segment: they run now, with the new ones
            inp = hidden if start == pos else torch.cat([saved[prev][:, start:pos], hidden], 1)
            span = make_span(model, state, start, end - start, inp, None if position_ids is None else position_ids[:, start:end])
            out = run_layers(model, state, span, inp, prev, j)  # (B, end - start, H)
            stats.catchup_positions += b * (pos - start)
            filled[j] = end
            if j == n:
                final = run_exit(model, state, span, out, n)
                chosen = sample(head(final[:, -1:])[:, -1], cfg, opts.generator)
                token = torch.where(done, token, chosen)
                stats.counts[n] = stats.counts.get(n, 0) + int((~done).sum())
                break
            if j not in saved:
                saved[j] = out.new_empty(b, max_len, out.shape[-1])
            saved[j][:, start:end] = out
            e = run_exit(model, state, span, out, j)[:, -1:]  # (B, 1, H); exit j's cache filled for the span
            scored = score_head(e)[:, -1]
            leave = ~done & (confidence(scored) > tau)
            if bool(leave.any()):  # host sync: the depth of the step depends on it
                # The head that scored the whole vocabulary already gave the logits to emit from: not run twice.
                chosen = sample(scored if score_head is head else head(e)[:, -1], cfg, opts.generator)
                token = torch.where(leave, chosen, token)
                stats.counts[j] = stats.counts.get(j, 0) + int(leave.sum())
                done = done | leave
                if bool(done.all()):
                    break
            hidden, prev = out[:, -(end - pos):], j
        stats.steps += 1
        return token

    with torch.no_grad():
        position_ids = None
        if state.pad is not None:  # HF's rule for padded prompts (as the engine's prefill)
            position_ids = (attention_mask.to(state.arange.device).long().cumsum(-1) - 1).clamp(min=0)
            full_pos = state.arange[None] - state.pad[:, None]
            position_ids = torch.cat([position_ids, full_pos[:, t:]], 1)
        token = stopper(step(parts.embed_tokens(input_ids), 0, t, position_ids))
        for i in range(opts.max_new_tokens):
            yield token
            if i == opts.max_new_tokens - 1 or stopper.all_done() or (cancel is not None and cancel()):
                return
            fed = token if forced is None else forced[:, i]
            token = stopper(step(parts.embed_tokens(fed[:, None]), t + i, 1, position_ids))


def token_exit_generate(
    model: BalconyModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    options: DecodeOptions | None = None,
    policy: ExitPolicy | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, TokenExitStats]:
    """Token-level exits over a batch; returns ((B, T + new) ids, stats). See `token_exit_stream`.

    Example:
        >>> out, stats = token_exit_generate(model, ids, threshold=0.8, max_new_tokens=32)  # doctest: +SKIP
        >>> stats.mean_layers  # doctest: +SKIP
        16.9
    """
    policy, kwargs = resolve_policy(policy, kwargs)
    stats = TokenExitStats(checkpoints(model, policy))
    tokens = list(token_exit_stream(model, input_ids, attention_mask, options=options, policy=policy, stats=stats, **kwargs))
    return torch.cat([input_ids, torch.stack(tokens, dim=1).to(input_ids.dtype)], dim=1), stats
