"""Deciding the paper's claims from paired differences: held, not held or inconclusive, with the standard errors that decide it.

Every variant row of the evaluation is paired, item by item, with the reference
row at the same layer (`balcony.eval.report.make_report` with ``paired_against``).
A difference counts when it is more than `Z` standard errors from zero. KL and
top-1 agreement with the full model on held-out text decide claims 1-3 (the
sensitive measures at this scale: benchmark accuracies move by less than their
noise); next-token NLL on held-out text decides claim 4, where there is no teacher.
Benchmark differences are reported beside them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..eval.report import EvalReport, ReportRow
from .plan import Study

Z = 2.0
HIGHER_IS_BETTER = {"kl": False, "agreement": True, "nll": False}
HELD, NOT_HELD, INCONCLUSIVE = "held", "not held", "inconclusive"


def significant(p: Mapping[str, float], z: float = Z) -> bool:
    """True when a paired difference is more than `z` standard errors from zero."""
    diff, se = p["diff"], p["se"]
    if se != se:  # nan: fewer than two items
        return False
    return abs(diff) > z * se if se > 0 else diff != 0


def winner(p: Mapping[str, float], metric: str) -> str:
    """``variant``, ``reference`` or ``tie``: who is significantly better on `metric` (the diff is variant minus reference)."""
    if not significant(p):
        return "tie"
    better = p["diff"] > 0 if HIGHER_IS_BETTER.get(metric, True) else p["diff"] < 0
    return "variant" if better else "reference"


def pair_outcome(row: ReportRow, metrics: tuple[str, ...]) -> str:
    """``reference`` / ``variant`` when every metric significantly favours it, ``mixed`` when they disagree, else ``unclear``."""
    wins = {winner(row.paired_text[m], m) for m in metrics if m in row.paired_text}
    if not wins:
        return "unclear"
    if wins == {"reference"}:
        return "reference"
    if wins == {"variant"}:
        return "variant"
    if {"reference", "variant"} <= wins:
        return "mixed"
    return "unclear"


def benchmark_average_difference(report: EvalReport, row: ReportRow) -> dict[str, float] | None:
    """The paired difference of the task average (mean of the tasks' shown metrics), tasks taken as independent."""
    parts = [row.paired.get(t, {}).get(report.shown[t]) for t in report.tasks]
    parts = [p for p in parts if p]
    if not parts or len(parts) != len(report.tasks):
        return None
    diff = sum(p["diff"] for p in parts) / len(parts)
    se = math.sqrt(sum(p["se"] ** 2 for p in parts)) / len(parts)
    return {"diff": diff, "se": se}


@dataclass
class Comparison:
    """One variant against the reference at one budget."""

    variant: str
    budget: str
    outcome: str
    text: dict[str, dict[str, float]]
    benchmark: dict[str, float] | None = None


@dataclass
class ClaimResult:
    """A claim, its verdict and the comparisons that decide it."""

    claim: int
    statement: str
    verdict: str
    reason: str
    comparisons: list[Comparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"claim": self.claim, "statement": self.statement, "verdict": self.verdict, "reason": self.reason,
                "comparisons": [c.__dict__ for c in self.comparisons], "notes": self.notes}


def _comparisons(report: EvalReport, study: Study, variants: tuple[str, ...], metrics: tuple[str, ...]) -> list[Comparison]:
    out = []
    budgets = [r.budget for r in report.rows if r.method == study.reference and r.key != "full" and r.layer < _depth(report)]
    for v in variants:
        for b in budgets:
            row = next((r for r in report.rows if r.method == v and r.budget == b), None)
            if row is None or not row.paired_text:
                continue
            out.append(Comparison(v, b, pair_outcome(row, metrics), {m: dict(row.paired_text[m]) for m in row.paired_text},
                                  benchmark_average_difference(report, row)))
    return out


def _depth(report: EvalReport) -> int:
    return max(r.layer for r in report.rows)


def judge_claims(report: EvalReport, study: Study, full_model: Mapping[str, Any] | None = None) -> list[ClaimResult]:
    """Each of the study's claims, decided from `report` (paired against the study's reference).

    Args:
        report: The evaluation, made with ``paired_against=study.reference`` and text windows.
        study: The study.
        full_model: For claim 3, `balcony.studies.runner.check_full_models`'s result: variant ->
            {"exact": bool, "max_abs_diff": float, ...}.

    Returns:
        One `ClaimResult` per claim whose panel has variants in the report.
    """
    results = []
    present = {r.method for r in report.rows}
    for panel in study.panels:
        others = tuple(v for v in panel.variants if v != study.reference and v in present)
        statement = study.claims[panel.claim]
        if not others:
            continue
        metrics = ("nll",) if panel.claim == 4 else ("kl", "agreement")
        comps = _comparisons(report, study, others, metrics)
        outcomes = [c.outcome for c in comps]
        missing = [v for v in panel.variants if v not in present]
        notes = [f"variants not run: {', '.join(missing)}"] if missing else []
        what = "next-token NLL on held-out text" if panel.claim == 4 else "KL and top-1 agreement on held-out text"
        if not comps:
            results.append(ClaimResult(panel.claim, statement, INCONCLUSIVE, "no paired text comparisons (evaluate with --text)", notes=notes))
            continue
        if panel.claim in (1, 4):
            if all(o == "reference" for o in outcomes):
                verdict, reason = HELD, f"the reference is better on {what} by more than {Z:g} SE in all {len(comps)} comparisons"
            elif any(o == "variant" for o in outcomes):
                bad = [f"{c.variant}/{c.budget}" for c in comps if c.outcome == "variant"]
                verdict, reason = NOT_HELD, f"significantly better than the reference on {what}: {', '.join(bad)}"
            else:
                n = sum(o == "reference" for o in outcomes)
                verdict, reason = INCONCLUSIVE, f"the reference is significantly better in {n} of {len(comps)} comparisons, none significantly worse"
        elif panel.claim == 2:
            if any(o == "variant" for o in outcomes):
                gain = [f"{c.budget}" for c in comps if c.outcome == "variant"]
                verdict, reason = NOT_HELD, f"KL+CE is significantly better on {what} at {', '.join(gain)}"
            elif any(o == "mixed" for o in outcomes):
                verdict, reason = INCONCLUSIVE, f"KL+CE is better on one of {what.split(' on ')[0]} and worse on the other at some budget"
            else:
                n = sum(o == "reference" for o in outcomes)
                verdict, reason = HELD, f"KL+CE gains significantly at no budget (the plain KL reference is significantly better at {n} of {len(comps)})"
        else:
            verdict, reason, extra = _claim3(comps, others, what, full_model)
            notes += extra
        results.append(ClaimResult(panel.claim, statement, verdict, reason, comps, notes))
    return results


def _claim3(comps: list[Comparison], others: tuple[str, ...], what: str, full_model: Mapping[str, Any] | None) -> tuple[str, str, list[str]]:
    notes = []
    parts = []
    verdicts = []
    for v in others:
        mine = [c for c in comps if c.variant == v]
        wins = sum(c.outcome == "reference" for c in mine)
        losses = sum(c.outcome == "variant" for c in mine)
        parts.append(f"frozen beats {v} at {wins} of {len(mine)} budgets, loses at {losses}")
        verdicts.append(HELD if wins * 2 > len(mine) else NOT_HELD if losses * 2 > len(mine) else INCONCLUSIVE)
    exact_ok = None
    if full_model:
        frozen_exact = all(info["exact"] for name, info in full_model.items() if not info.get("trains_base"))
        trained_changed = all(not info["exact"] for name, info in full_model.items() if info.get("trains_base") and name in others)
        exact_ok = frozen_exact and trained_changed
        for name, info in full_model.items():
            if info.get("trains_base"):
                notes.append(f"{name}: full model changed (max |logit difference| {info['max_abs_diff']:.3g} on the probe text)")
        notes.append("every frozen variant's full model reproduces the base's logits exactly" if frozen_exact
                     else "a frozen variant's full model differs from the base")
    reason = "; ".join(parts) + f" ({what})"
    if exact_ok is False:
        return NOT_HELD, reason + "; the full-model check failed", notes
    if all(v == HELD for v in verdicts):
        return (HELD if exact_ok else INCONCLUSIVE), reason + ("" if exact_ok else "; full models not checked"), notes
    if any(v == NOT_HELD for v in verdicts):
        return NOT_HELD, reason, notes
    return INCONCLUSIVE, reason, notes
