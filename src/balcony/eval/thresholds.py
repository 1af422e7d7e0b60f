"""Token-level exits measured teacher-forced: the quality-compute curve over thresholds, and choosing a threshold.

Token-level exits fill every skipped layer's K/V later from the saved hidden states
(`balcony.inference.token_exits`), so the base layers see exactly the full model's hidden states and
the output at a position is the output of the exit that stopped it. One pass of the base over a text,
with every exit and plain early exit on top, therefore gives, per position, each exit's confidence,
KL to the full model, agreement and NLL; every threshold's numbers are then a lookup (`curve`), which
makes choosing a threshold for a target (`calibrate`) cheap: one pass over a held-out sample.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch

from ..inference.options import ExitPolicy
from ..inference.quantize import head_rows
from ..inference.token_exits import auto_label, checkpoints, confidence
from ..metrics import kl_per_token
from ..modeling.cost import ideal_speedup, token_exit_cost
from ..modeling.model import BalconyModel
from .texts import text_windows
from .variants import EARLY_EXIT, FULL, build_variants, exit_hidden_states

MAX_SEARCHED_EXITS = 6
"""`calibrate` searches every subset of the exits up to this many exits (2**6 - 1 = 63 sets)."""


@dataclass
class TokenScores:
    """Per-position measurements of every exit over a text set (positions that have a next token).

    Attributes:
        checkpoints: The exit layers a token may leave at, then N.
        conf: layer -> (P,) confidence of that exit (as the `ExitPolicy` scores it).
        kl, agree, nll: key -> (P,) KL(full || key), top-1 agreement with the full model, NLL of the next
            token; keys are exit layers (N: the full model) and ``"early-exit/<layer>"``.
        cost: layer -> per-token compute of a token decided there (`modeling.cost.token_exit_cost`).
        full_cost: per-token compute of the full model.
        budgets: layer -> budget name.
        subset_costs: exit layers (ascending) -> `cost` when only those exits may stop a token, for every
            non-empty subset of the exits (up to `MAX_SEARCHED_EXITS` exits).
    """

    checkpoints: list[int]
    conf: dict[int, torch.Tensor]
    kl: dict[int | str, torch.Tensor]
    agree: dict[int | str, torch.Tensor]
    nll: dict[int | str, torch.Tensor]
    cost: dict[int, int]
    full_cost: int
    budgets: dict[int, str] = field(default_factory=dict)
    subset_costs: dict[tuple[int, ...], dict[int, int]] = field(default_factory=dict)

    @property
    def positions(self) -> int:
        return int(next(iter(self.conf.values())).numel())

    def points(self, exits: Sequence[int] | None = None) -> list[int]:
        """The checkpoints when only `exits` (exit layers; None: all) may stop a token, then N.

        Raises:
            ValueError: an exit layer that was not scored (named, with the scored ones).
        """
        if exits is None:
            return list(self.checkpoints)
        scored = self.checkpoints[:-1]
        bad = [j for j in exits if j not in scored]
        if bad or not exits:
            raise ValueError(f"exits={list(exits)!r}: token-level exits were scored at exit layers {scored}")
        return sorted(set(exits)) + [self.checkpoints[-1]]

    def decide(self, threshold: float, exits: Sequence[int] | None = None) -> torch.Tensor:
        """(P,) index into `points(exits)` of the exit each position leaves at."""
        pts = self.points(exits)
        n = len(pts) - 1
        choice = torch.full((self.positions,), n, dtype=torch.long)
        for k in reversed(range(n)):  # the first confident exit wins
            choice = torch.where(self.conf[pts[k]] > threshold, torch.tensor(k), choice)
        return choice

    def costs(self, exits: Sequence[int] | None = None) -> dict[int, int]:
        """layer -> per-token compute of a token decided there, when only `exits` may stop a token."""
        pts = self.points(exits)
        if pts == self.checkpoints:
            return self.cost
        key = tuple(pts[:-1])
        if key not in self.subset_costs:
            raise ValueError(f"exits={list(key)!r}: no compute was recorded for this exit set (more than "
                             f"{MAX_SEARCHED_EXITS} exits were scored)")
        return self.subset_costs[key]


@dataclass
class CurvePoint:
    """One point of the curve: a threshold, or a fixed budget / plain early exit for comparison."""

    label: str
    threshold: float | None
    mean_layers: float
    ideal_speedup: float
    kl: float
    agreement: float
    ppl: float
    fractions: dict[int, float] = field(default_factory=dict)
    measured_speedup: float | None = None
    exits: list[int] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def token_scores(
    model: BalconyModel,
    tokenizer,
    texts: Sequence[str],
    *,
    policy: ExitPolicy | None = None,
    seq_len: int = 512,
    max_tokens: int = 8192,
    batch_size: int = 8,
    chunk: int = 256,
) -> TokenScores:
    """One base pass over `texts` feeding every exit and plain early exit; per-position scores.

    Example:
        >>> scores = token_scores(model, tok, ["Some held-out text ..."], max_tokens=4096)  # doctest: +SKIP
        >>> curve(scores, [0.5, 0.9])[0].agreement  # doctest: +SKIP
    """
    windows = text_windows(tokenizer, list(texts), seq_len, max_tokens)
    if not windows:
        raise ValueError("the text set gives no window of 2 or more tokens")
    return token_scores_of_ids(model, windows, policy=policy, batch_size=batch_size, chunk=chunk)


@torch.no_grad()
def token_scores_of_ids(
    model: BalconyModel,
    windows: Sequence[Sequence[int]],
    *,
    policy: ExitPolicy | None = None,
    batch_size: int = 8,
    chunk: int = 256,
) -> TokenScores:
    """`token_scores` on token windows (each of >= 2 ids); positions come window by window, in order."""
    policy = policy or ExitPolicy()
    points = checkpoints(model, policy)
    n = model.num_layers
    variants = [v for v in build_variants(model, early_exit=True) if v.full or v.layer in points]
    head = model.parts.lm_head
    score_head = head_rows(head, policy.confidence_vocab) if policy.confidence_vocab else head
    device = head.weight.device
    windows = [list(w) for w in windows]
    keys: list[int | str] = points + [f"{EARLY_EXIT}/{j}" for j in points[:-1]]
    acc = {name: {k: [] for k in keys} for name in ("kl", "agree", "nll")}
    conf: dict[int, list[torch.Tensor]] = {j: [] for j in points[:-1]}
    for s in range(0, len(windows), batch_size):
        batch = windows[s : s + batch_size]
        width = max(len(w) for w in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long, device=device)
        target = torch.full((len(batch), width), -100, dtype=torch.long, device=device)
        for i, w in enumerate(batch):
            ids[i, : len(w)] = torch.tensor(w)
            target[i, : len(w) - 1] = torch.tensor(w[1:])
        hidden = exit_hidden_states(variants, ids)  # right padding needs no mask: causal attention never sees it
        keep = (target != -100).reshape(-1)
        tgt = target.reshape(-1)[keep]
        rows = {}
        for v in variants:
            h = hidden[v.key].reshape(-1, hidden[v.key].shape[-1])[keep]
            rows[n if v.full else (v.layer if not v.key.startswith(EARLY_EXIT) else f"{EARLY_EXIT}/{v.layer}")] = h
        for c in range(0, len(tgt), chunk):
            teacher = _upcast(head(rows[n][c : c + chunk]))
            top = teacher.argmax(-1)
            for k in keys:
                logits = teacher if k == n else _upcast(head(rows[k][c : c + chunk]))
                acc["kl"][k].append(kl_per_token(logits, teacher))
                acc["agree"][k].append((logits.argmax(-1) == top).float())
                acc["nll"][k].append(-torch.log_softmax(logits, -1).gather(-1, tgt[c : c + chunk, None])[:, 0])
                if isinstance(k, int) and k != n:
                    conf[k].append(confidence(score_head(rows[k][c : c + chunk])).cpu())
    cat = {name: {k: torch.cat(v).cpu() for k, v in d.items()} for name, d in acc.items()}
    budgets = {j: name for name, j in model.budgets.items()}
    exits = points[:-1]
    subsets = [c for r in range(1, len(exits) + 1) for c in itertools.combinations(exits, r)] if len(exits) <= MAX_SEARCHED_EXITS else []
    return TokenScores(
        checkpoints=points, conf={j: torch.cat(v) for j, v in conf.items()}, kl=cat["kl"], agree=cat["agree"], nll=cat["nll"],
        cost=token_exit_cost(model, points, policy.confidence_vocab), full_cost=model.count_parameters(None) + head.weight.numel(),
        budgets=budgets, subset_costs={c: token_exit_cost(model, [*c, n], policy.confidence_vocab) for c in subsets},
    )


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))  # float32 at least; float64 stays float64


def curve(scores: TokenScores, thresholds: Sequence[float], *, model: BalconyModel | None = None,
          exits: Sequence[int] | None = None, budgets: bool = True) -> list[CurvePoint]:
    """Each threshold's point (mean layers, ideal speed-up, KL, agreement, perplexity), then (with
    `budgets`) each fixed budget and plain early exit at the same layers (their ideal speed-up needs
    `model`). `exits`: only these exit layers may stop a token (None: every scored exit)."""
    out = []
    pts = scores.points(exits)
    table_cost = scores.costs(exits)
    subset = None if pts == scores.checkpoints else pts[:-1]
    names = None if subset is None else [scores.budgets.get(j, str(j)) for j in subset]
    idx = torch.arange(scores.positions)
    kl, agree, nll = (torch.stack([table[j] for j in pts]) for table in (scores.kl, scores.agree, scores.nll))
    depth = torch.tensor(pts, dtype=torch.float)
    per_token = torch.tensor([float(table_cost[j]) for j in pts])
    for tau in thresholds:
        if not 0.0 <= float(tau) <= 1.0:
            raise ValueError(f"threshold {tau!r} is outside [0, 1]")
        choice = scores.decide(float(tau), exits)
        out.append(CurvePoint(
            label=auto_label(float(tau), names), threshold=float(tau), mean_layers=float(depth[choice].mean()),
            ideal_speedup=scores.full_cost / float(per_token[choice].mean()), kl=float(kl[choice, idx].mean()),
            agreement=float(agree[choice, idx].mean()), ppl=math.exp(float(nll[choice, idx].mean())),
            fractions={j: float((choice == k).float().mean()) for k, j in enumerate(pts)}, exits=subset,
        ))
    if not budgets:
        return out
    pts = scores.checkpoints
    for key in pts + [f"{EARLY_EXIT}/{j}" for j in pts[:-1]]:
        layer = key if isinstance(key, int) else int(key.split("/")[1])
        name = FULL if layer == pts[-1] else (scores.budgets.get(layer, str(layer)) if isinstance(key, int) else key.split("/")[0] + "/" + scores.budgets.get(layer, str(layer)))
        speed = 1.0 if layer == pts[-1] else (ideal_speedup(model, layer) if model is not None and isinstance(key, int) else float("nan"))
        out.append(CurvePoint(
            label=name, threshold=None, mean_layers=float(layer), ideal_speedup=speed, kl=float(scores.kl[key].mean()),
            agreement=float(scores.agree[key].mean()), ppl=math.exp(float(scores.nll[key].mean())),
        ))
    return out


def calibrate(scores: TokenScores, target_agreement: float, *, grid: int = 200, search_exits: bool = False) -> CurvePoint:
    """The threshold with the highest ideal speed-up whose agreement reaches `target_agreement`.

    With `search_exits`, also which exits may stop a token: every non-empty subset of the scored exits
    is tried (checking an exit costs its layer and a head; skipping the check can pay), and the point
    names its subset in `exits` (None: all of them).

    Raises:
        ValueError: no threshold reaches it (the full model always does, so only a target above 1).

    Example:
        >>> calibrate(scores, target_agreement=0.574).threshold  # doctest: +SKIP
        0.41
        >>> calibrate(scores, target_agreement=0.574, search_exits=True).exits  # doctest: +SKIP
        [14, 20]
    """
    if not 0.0 <= target_agreement <= 1.0:
        raise ValueError(f"target_agreement={target_agreement!r} must be a fraction in [0, 1]")
    taus = sorted({round(i / grid, 6) for i in range(grid + 1)} | {float(q) for q in _quantiles(scores, grid)})
    sets: list[Sequence[int] | None] = [None]
    if search_exits:
        sets += [list(c) for c in scores.subset_costs if list(c) != scores.checkpoints[:-1]]
    ok = [p for s in sets for p in curve(scores, taus, exits=s, budgets=False) if p.agreement >= target_agreement]
    if not ok:
        raise ValueError(f"no threshold reaches agreement {target_agreement:.3f} on this sample")
    return max(ok, key=lambda p: (p.ideal_speedup, p.agreement))


def _quantiles(scores: TokenScores, k: int) -> list[float]:
    """Thresholds just below each exit's confidence quantiles, so the grid follows where decisions change."""
    out = []
    for c in scores.conf.values():
        qs = torch.quantile(c.float(), torch.linspace(0, 1, k + 1)).tolist()
        out += [max(0.0, min(1.0, q - 1e-7)) for q in qs]
    return out


def format_curve(points: Sequence[CurvePoint]) -> str:
    """A plain-text table of curve points (columns stay aligned for any label or perplexity)."""
    w = max([16, *(len(p.label) + 2 for p in points)])
    lines = [f"{'':<{w}}{'mean layers':>12}{'ideal x':>9}{'measured x':>11}{'KL':>8}{'agree %':>9}{'ppl':>11}  exits (share of tokens)"]
    for p in points:
        measured = "" if p.measured_speedup is None else f"{p.measured_speedup:.2f}"
        shares = ", ".join(f"{j}: {100 * f:.0f}%" for j, f in p.fractions.items())
        speed = "" if math.isnan(p.ideal_speedup) else f"{p.ideal_speedup:.2f}"
        lines.append(f"{p.label:<{w}}{p.mean_layers:>12.2f}{speed:>9}{measured:>11}{p.kl:>8.3f}{100 * p.agreement:>9.2f}{p.ppl:>11.4g}  {shares}")
    return "\n".join(lines)
