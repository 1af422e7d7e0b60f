"""The study's figure: one panel per claim, each variant's score at every budget (the paper's Figure 5 layout).

The top row is the paper's measure, the average benchmark score per budget; the
bottom row top-1 agreement with the full model on held-out text, the measure that
separates variants at small scale (next-token NLL for a from-scratch study, which
has no teacher). Plain early exit is drawn dashed for reference, the full model as a
star. matplotlib is imported here only (PNG, Agg backend).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..eval.report import EvalReport
from .plan import Study


def _rows_of(report: EvalReport, method: str, depth: int):
    """(budget label, layer, row) of `method` by depth, with the full model it serves at the end."""
    rows = sorted((r for r in report.rows if r.method == method), key=lambda r: r.layer)
    if not any(r.layer == depth for r in rows):
        full = next((r for r in report.rows if r.key == "full"), None)
        rows = rows + ([full] if full else [])
    return rows


def draw_study_figure(report: EvalReport, study: Study, path: str | os.PathLike, *, labels: dict[str, str] | None = None) -> Path:
    """Write the study's figure to `path` (PNG) and return it.

    Args:
        report: The study's evaluation.
        study: The study (its panels choose the lines).
        path: Output PNG.
        labels: variant name -> legend label (default the names).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or {}
    depth = max(r.layer for r in report.rows)
    measures = []
    if report.tasks and not study.from_scratch:
        measures.append(("average", "average benchmark score (%)", lambda r: r.average))
    if study.from_scratch:
        measures.append(("nll", "next-token NLL on held-out text (nats)", lambda r: None if not r.distill else r.distill["nll"]))
    elif any(r.distill for r in report.rows):
        measures.append(("agreement", "top-1 agreement with the full model (%)", lambda r: None if not r.distill else 100 * r.distill["agreement"]))
    if not measures:
        raise ValueError("the report has neither task scores nor text metrics to draw")
    present = {r.method for r in report.rows}
    panels = [p for p in study.panels if any(v in present for v in p.variants)]
    fig, axes = plt.subplots(len(measures), len(panels), figsize=(4.6 * len(panels), 3.6 * len(measures)), dpi=120, squeeze=False)
    for col, panel in enumerate(panels):
        for row, (key, y_label, y_of) in enumerate(measures):
            ax = axes[row][col]
            if "early-exit" in present and not study.from_scratch:
                pts = [(r.layer, y_of(r)) for r in _rows_of(report, "early-exit", depth) if r.layer < depth and y_of(r) is not None]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle="--", color="0.6", marker=".", label="plain early exit")
            for i, name in enumerate(v for v in panel.variants if v in present):
                pts = [(r.layer, y_of(r)) for r in _rows_of(report, name, depth) if y_of(r) is not None]
                if not pts:
                    continue
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=f"C{i}", linewidth=2.2 if name == study.reference else 1.4,
                        label=labels.get(name, name))
            full = next((r for r in report.rows if r.key == "full"), None)
            if full is not None and y_of(full) is not None:
                ax.plot([depth], [y_of(full)], marker="*", markersize=13, color="black", linestyle="none", label="full model")
            layers = sorted({r.layer for r in report.rows})
            names = {r.layer: r.budget for r in report.rows if r.method == study.reference or r.key == "full"}
            ax.set_xticks(layers)
            ax.set_xticklabels([f"{names.get(j, '')}\n{j}" for j in layers], fontsize=8)
            ax.set_xlabel("budget / exit layer", fontsize=8)
            ax.set_ylabel(y_label, fontsize=8)
            if row == 0:
                ax.set_title(f"{panel.title} (claim {panel.claim})", fontsize=9)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
