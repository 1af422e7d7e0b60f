"""The study's Markdown: the plan, one table per panel (scores and paired differences against the reference), and the claims."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from ..eval.report import EvalReport, ReportRow, _task_label
from .claims import ClaimResult, benchmark_average_difference
from .plan import Study


def _pm(p: Mapping[str, float] | None, digits: int = 2, scale: float = 1.0) -> str:
    if not p:
        return ""
    return f"{scale * p['diff']:+.{digits}f} ± {scale * p['se']:.{digits}f}"


def _num(x: float | None, digits: int = 2) -> str:
    return "" if x is None or x != x else f"{x:.{digits}f}"


def panel_table(report: EvalReport, study: Study, variants: Sequence[str], labels: Mapping[str, str] | None = None) -> str:
    """Markdown rows of `variants` (and plain early exit, the full model): tasks, average, text metrics, paired differences."""
    labels = labels or {}
    tasks = [_task_label(t, report.shown[t], report.percent[t]) for t in report.tasks]
    cols = ["variant", "budget", "layer", *tasks]
    if report.tasks:
        cols.append("avg")
    text = any(r.distill for r in report.rows)
    if text:
        cols += ["KL", "agree %", "NLL"]
    cols += ["Δ avg vs ref"] if report.tasks else []
    cols += ["Δ KL vs ref", "Δ agree vs ref (pts)", "Δ NLL vs ref"] if text else []
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(cols) - 2)) + "|"]
    order = [m for m in (*variants, "early-exit") if m in {r.method for r in report.rows}]
    if study.from_scratch:
        order = [m for m in order if m != "early-exit"]
    rows: list[ReportRow] = [r for m in order for r in sorted((r for r in report.rows if r.method == m), key=lambda r: r.layer)]
    full = next((r for r in report.rows if r.key == "full"), None)
    if full is not None and not study.from_scratch:
        rows.append(full)
    for r in rows:
        name = "full model (base)" if r.key == "full" else labels.get(r.method, r.method)
        cells = [name, r.budget, str(r.layer)] + [_num(r.scores.get(t)) for t in report.tasks]
        if report.tasks:
            cells.append(_num(r.average))
        if text:
            d = r.distill or {}
            cells += [_num(d.get("kl"), 3), _num(None if "agreement" not in d else 100 * d["agreement"], 1), _num(d.get("nll"), 3)]
        if report.tasks:
            cells.append(_pm(benchmark_average_difference(report, r)))
        if text:
            pt = r.paired_text
            cells += [_pm(pt.get("kl"), 3), _pm(pt.get("agreement"), 2), _pm(pt.get("nll"), 3)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def claims_markdown(claims: Sequence[ClaimResult]) -> str:
    """One paragraph per claim: the statement, the verdict in bold and why, then notes."""
    out = []
    for c in claims:
        out.append(f"**Claim {c.claim}: {c.verdict.upper()}.** {c.statement}  \n{c.reason}.")
        for n in c.notes:
            out.append(f"- {n}")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def study_markdown(
    report: EvalReport,
    study: Study,
    claims: Sequence[ClaimResult],
    plan: Mapping[str, Any],
    labels: Mapping[str, str] | None = None,
    figure: str | None = None,
) -> str:
    """The whole study as Markdown: plan, per-panel tables, claims."""
    labels = labels or {}
    out = [f"# Study {study.name}", ""]
    out.append(f"{plan['steps']} optimizer steps of {plan['tokens_per_step']:,} tokens per variant "
               f"({plan['steps'] * plan['tokens_per_step']:,} training tokens each, the same rows in the same order), "
               f"lr {plan['reference_config']['lr']}, seed {plan['reference_config']['seed']}.")
    if plan.get("dropped"):
        out += ["", "Turned off for every variant (so that each differs from the reference in its factor alone):"]
        out += [f"- `{k}`: {why}" for k, why in plan["dropped"].items()]
    if plan.get("wall_seconds"):
        out += ["", "Wall time per phase (s): " + ", ".join(f"{k} {v:.0f}" for k, v in plan["wall_seconds"].items())]
    if figure:
        out += ["", f"![{study.name}]({figure})"]
    for panel in study.panels:
        present = [v for v in panel.variants if any(r.method == v for r in report.rows)]
        if len(present) < 2:
            continue
        out += ["", f"## {panel.title} (claim {panel.claim})", "", panel_table(report, study, present, labels)]
    others = [v.name for v in study.variants if v.name not in {n for p in study.panels for n in p.variants}]
    others = [v for v in others if any(r.method == v for r in report.rows)]
    if others:
        out += ["", "## Context (outside the claims)", "", panel_table(report, study, [study.reference, *others], labels)]
    out += ["", "Δ columns: variant minus reference at the same layer on the same items (± one paired standard error; "
            "text metrics window by window, benchmarks item by item; a full model's row is paired with the base's).", ""]
    out += ["## Claims", "", claims_markdown(claims)]
    return "\n".join(out)
