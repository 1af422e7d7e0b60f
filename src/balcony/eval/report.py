"""The evaluation table (Table-1 style): rows per variant, task columns, averages, drops, paired lines; text / Markdown / CSV / JSON."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from .harness import TaskResults
from .stats import paired_difference
from .variants import EARLY_EXIT, FULL, Variant


def primary_metric(metrics: Mapping[str, float], higher_is_better: Mapping[str, bool] | None = None, prefer: str | None = None) -> str | None:
    """The metric a task is shown with: `prefer`, else acc, exact_match, acc_norm, f1, else the first higher-is-better one."""
    hib = higher_is_better or {}
    for name in ([prefer] if prefer else []) + ["acc", "exact_match", "acc_norm", "f1"]:
        if name in metrics:
            return name
    for name in metrics:
        if hib.get(name, True):
            return name
    return next(iter(metrics), None)


@dataclass
class ReportRow:
    """One row of the table.

    Attributes:
        key, method, budget, layer, params: the variant (params: non-embedding).
        scores: task -> shown value (fractions as percentages).
        average: mean of the higher-is-better shown values (None without tasks).
        drop: average minus the full model's average (points; 0 for the full model).
        distill: {"kl", "agreement", "ppl", ...} on the text set, when given.
        speedup: measured speed-up from `balcony bench`, when given.
        ideal_speedup: compute of the full model / compute of this row (layers, exit, norm and LM head).
        metrics: task -> every metric the harness reported (unscaled).
        paired: task -> metric -> `paired_difference` of this row against the reference row
            (plain early exit at the same layer by default, see `make_report`'s `paired_against`)
            over the same documents ("diff"/"se" in points where the column is a percentage),
            plus "against": that row's key. Empty for the reference rows themselves.
        paired_text: The same for the text metrics, window by window: "kl" (nats/token),
            "agreement" (points) and "nll" (nats/token) minus the reference's.
    """

    key: str
    method: str
    budget: str
    layer: int
    params: int
    scores: dict[str, float] = field(default_factory=dict)
    average: float | None = None
    drop: float | None = None
    distill: dict[str, float] | None = None
    speedup: float | None = None
    ideal_speedup: float = 1.0
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    paired: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    paired_text: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class EvalReport:
    """The evaluation table and what it was made from.

    Attributes:
        rows: Full model first, then each method's budgets by depth.
        tasks: Task column names (harness task names).
        shown: task -> the metric shown in its column.
        percent: task -> whether the column is a fraction shown in percent.
        meta: Model, exits, limit, timings, ...
    """

    rows: list[ReportRow]
    tasks: list[str]
    shown: dict[str, str]
    percent: dict[str, bool]
    meta: dict[str, Any] = field(default_factory=dict)

    def row(self, key: str) -> ReportRow:
        """The row of variant `key` (``"full"``, ``"balcony/S"``, ...)."""
        for r in self.rows:
            if r.key == key:
                return r
        raise KeyError(f"no row {key!r}: rows are {', '.join(r.key for r in self.rows)}")

    # ---------------------------------------------------------------- tables
    def columns(self) -> list[str]:
        cols = ["method", "budget", "layer", "params", "ideal x"]
        if any(r.speedup is not None for r in self.rows):
            cols.append("speed-up")
        cols += [_task_label(t, self.shown[t], self.percent[t]) for t in self.tasks]
        if self.tasks:
            cols += ["avg", "drop vs full"]
        if any(r.distill for r in self.rows):
            cols += ["KL(full||exit)", "top-1 agree %", "ppl"]
        return cols

    def records(self) -> list[list[str]]:
        """The table's cells as strings, one list per row."""
        has_speed = any(r.speedup is not None for r in self.rows)
        has_distill = any(r.distill for r in self.rows)
        out = []
        for r in self.rows:
            cells = [r.method, r.budget, str(r.layer), _fmt_params(r.params), f"{r.ideal_speedup:.2f}"]
            if has_speed:
                cells.append("" if r.speedup is None else f"{r.speedup:.2f}")
            cells += [_fmt(r.scores.get(t)) for t in self.tasks]
            if self.tasks:
                cells += [_fmt(r.average), "" if r.drop is None else f"{r.drop:+.2f}"]
            if has_distill:
                d = r.distill or {}
                cells += [_fmt(d.get("kl"), 4), _fmt(None if "agreement" not in d else 100 * d["agreement"]), _fmt(d.get("ppl"))]
            out.append(cells)
        return out

    def to_text(self) -> str:
        """An aligned plain-text table."""
        cols, rows = self.columns(), self.records()
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        line = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(r) for r in rows] + self.paired_lines())

    def paired_lines(self) -> list[str]:
        """Each row against its reference row (plain early exit by default), item by item: difference +- standard error."""
        lines = []
        text_labels = {"kl": "text KL", "agreement": "text top-1 agree %", "nll": "text NLL"}
        for r in self.rows:
            for t, by_metric in r.paired.items():
                for name, p in by_metric.items():
                    label = _task_label(t, name, self.percent.get(t, False))
                    lines.append(f"  {r.key:<14} {label:<22} {p['diff']:+.2f} +- {p['se']:.2f}  "
                                 f"({p['wins']} items won, {p['losses']} lost of {p['n']})")
            for name, p in r.paired_text.items():
                lines.append(f"  {r.key:<14} {text_labels.get(name, name):<22} {p['diff']:+.4f} +- {p['se']:.4f}  "
                             f"(vs {p['against']}, {p['n']} windows)")
        if lines:
            reference = self.meta.get("paired_against", EARLY_EXIT)
            what = "plain early exit" if reference == EARLY_EXIT else f"{reference!r}"
            against = (f"paired: each row minus {what} at the same layer (full models minus the evaluated base), "
                       "on the same items (diff +- standard error)")
            lines = ["", against] + lines
        return lines

    def to_markdown(self) -> str:
        """A GitHub Markdown table."""
        esc = lambda cells: [c.replace("|", "\\|") for c in cells]
        cols, rows = esc(self.columns()), [esc(r) for r in self.records()]
        out = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(cols) - 2)) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(out)

    def to_csv(self) -> str:
        """CSV with numbers at full precision (no formatting)."""
        buf = io.StringIO()
        writer = csv.writer(buf)
        distill_keys = ["kl", "agreement", "ppl"] if any(r.distill for r in self.rows) else []
        writer.writerow(
            ["method", "budget", "layer", "params", "ideal_speedup", "speedup"] + self.tasks + (["average", "drop"] if self.tasks else []) + distill_keys
        )
        for r in self.rows:
            writer.writerow(
                [r.method, r.budget, r.layer, r.params, f"{r.ideal_speedup:.6g}", "" if r.speedup is None else r.speedup]
                + [r.scores.get(t, "") for t in self.tasks]
                + ([("" if r.average is None else r.average), ("" if r.drop is None else r.drop)] if self.tasks else [])
                + [(r.distill or {}).get(k, "") for k in distill_keys]
            )
        return buf.getvalue()

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-friendly."""
        return {
            "tasks": self.tasks,
            "shown_metric": self.shown,
            "percent": self.percent,
            "rows": [r.__dict__ for r in self.rows],
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EvalReport":
        """The inverse of `to_dict`."""
        return cls(
            rows=[ReportRow(**r) for r in data["rows"]],
            tasks=list(data["tasks"]),
            shown=dict(data["shown_metric"]),
            percent=dict(data["percent"]),
            meta=dict(data.get("meta", {})),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EvalReport":
        """Read a results.json written by `write` (e.g. to re-plot with a bench JSON)."""
        p = Path(path)
        if p.is_dir():
            p = p / RESULT_FILES["json"]
        if not p.is_file():
            raise FileNotFoundError(f"no evaluation results at {str(p)!r}")
        return cls.from_dict(json.loads(p.read_text()))

    def write(self, output_dir: str | os.PathLike) -> dict[str, Path]:
        """Write results.json, results.csv, results.md and results.txt into `output_dir`."""
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {kind: out / name for kind, name in RESULT_FILES.items()}
        paths["json"].write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        paths["csv"].write_text(self.to_csv())
        paths["markdown"].write_text(self.to_markdown() + "\n")
        paths["text"].write_text(self.to_text() + "\n")
        return paths


RESULT_FILES = {"json": "results.json", "csv": "results.csv", "markdown": "results.md", "text": "results.txt"}


def _task_label(task: str, metric: str, percent: bool) -> str:
    from .tasks import OFFLINE_TASKS, offline_key

    key = offline_key(task)
    name = key if key and OFFLINE_TASKS[key].task == task else task
    return f"{name} {metric}" + (" %" if percent else "")


def _fmt_params(n: int) -> str:
    """134515008 -> "134.5M", 25344 -> "25.3K"."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    if abs(x) >= 1e5:  # an untrained exit's perplexity
        return f"{x:.3g}"
    return f"{x:.{digits}f}"


def make_report(
    variants: Sequence[Variant],
    task_results: TaskResults | None = None,
    distill: Mapping[str, Mapping[str, float]] | None = None,
    *,
    bench: Sequence[Any] | None = None,
    metric: str | None = None,
    meta: Mapping[str, Any] | None = None,
    paired_against: str = EARLY_EXIT,
) -> EvalReport:
    """Assemble the table: per-task shown metric, average, drop vs the full model, distillation, speed-ups.

    Args:
        variants: The rows, from `build_variants`.
        task_results: From `evaluate_tasks`.
        distill: From `distillation_metrics` (with ``per_window=True`` its windows give the
            paired text lines; they are not kept in the rows).
        bench: Points from `balcony.eval.plots.read_bench` (measured speed-ups).
        metric: Preferred metric per task column (default acc, then exact_match, ...).
        meta: Extra information for the JSON.
        paired_against: The method every other row is compared with, item by item, at the
            same layer (default plain early exit); a baseline's own full model is compared
            with the evaluated model's (``full``).

    Raises:
        ValueError: `paired_against` is not a method among the variants.
    """
    methods = list(dict.fromkeys(v.method for v in variants))
    if paired_against not in methods and paired_against != EARLY_EXIT:
        raise ValueError(f"paired_against={paired_against!r} is not one of the evaluated methods: {', '.join(methods)}")
    from .plots import match_speedup

    tasks = list(task_results.scores[variants[0].key]) if task_results and task_results.scores else []
    if task_results and any(t in tasks for t in task_results.requested):
        tasks = [t for t in task_results.requested if t in tasks]  # a group's row, not its subtasks
    shown, percent = {}, {}
    for t in tasks:
        hib = task_results.higher_is_better.get(t, {})
        shown[t] = primary_metric(task_results.scores[variants[0].key][t], hib, metric)
        values = [task_results.scores[v.key][t].get(shown[t]) for v in variants]
        percent[t] = hib.get(shown[t], True) and all(x is None or 0.0 <= x <= 1.0 for x in values)
    tasks = [t for t in tasks if shown[t] is not None]
    full_params = next(v.params for v in variants if v.full)
    rows = []
    for v in variants:
        scores = {}
        for t in tasks:
            x = task_results.scores[v.key][t].get(shown[t])
            if x is not None:
                scores[t] = 100 * x if percent[t] else x
        averaged = [scores[t] for t in tasks if t in scores and task_results.higher_is_better.get(t, {}).get(shown[t], True)]
        rows.append(
            ReportRow(
                key=v.key,
                method=v.method,
                budget=v.budget,
                layer=v.layer,
                params=v.params,
                scores=scores,
                average=sum(averaged) / len(averaged) if averaged else None,
                distill={k: x for k, x in distill[v.key].items() if k != "windows"} if distill and v.key in distill else None,
                speedup=1.0 if v.full and bench else (match_speedup(bench, v.method, v.budget, v.layer) if bench else None),
                # compute per token: layers + exit + norm + the LM head (as `balcony bench` counts it)
                ideal_speedup=(full_params + v.model.parts.lm_head.weight.numel()) / (v.params + v.model.parts.lm_head.weight.numel()),
                metrics=task_results.scores[v.key] if task_results else {},
            )
        )
    full_avg = rows[0].average if rows and variants[0].full else None
    for r in rows:
        r.drop = None if r.average is None or full_avg is None else r.average - full_avg
    twins = {v.layer: v.key for v in variants if v.method == paired_against and not v.full}
    primary_full = next((v.key for v in variants if v.key == FULL), None)
    for r, v in zip(rows, variants):
        twin = primary_full if v.full else twins.get(r.layer)
        if twin is None or twin == r.key or r.method == paired_against:
            continue
        if task_results and task_results.items:
            mine, theirs = task_results.items.get(r.key, {}), task_results.items.get(twin, {})
            for t in tasks:
                for name in sorted(set(mine.get(t, {})) & set(theirs.get(t, {}))):
                    a, b = mine[t][name], theirs[t][name]
                    if len(a) != len(b):
                        continue
                    p = paired_difference(a, b)
                    if percent[t]:
                        p["diff"], p["se"] = 100 * p["diff"], 100 * p["se"]
                    r.paired.setdefault(t, {})[name] = {**p, "against": twin}
        windows = (distill or {}).get(r.key, {}).get("windows"), (distill or {}).get(twin, {}).get("windows")
        if windows[0] and windows[1]:
            for name in ("kl", "agreement", "nll"):
                p = paired_difference(windows[0][name], windows[1][name])
                if name == "agreement":
                    p["diff"], p["se"] = 100 * p["diff"], 100 * p["se"]
                r.paired_text[name] = {**p, "against": twin}
    order = {m: i for i, m in enumerate(dict.fromkeys(v.method for v in variants))}
    rows.sort(key=lambda r: (r.key != FULL, order[r.method], r.layer))
    return EvalReport(rows=rows, tasks=tasks, shown=shown, percent=percent, meta={**dict(meta or {}), "paired_against": paired_against})
