"""Plots like the paper's Figure 4: accuracy against speed-up and against parameters, one line per method.

Measured speed-ups come from a ``balcony bench`` JSON (`read_bench`). The reader
is tolerant; the expected schema is::

    {"budgets": [
        {"budget": "S", "layer": 14, "speedup": 1.92},
        {"budget": "XL", "layer": 30, "speedup": 1.0},
        {"budget": "S", "method": "early-exit", "speedup": 2.01}
    ]}

Per entry: the budget name (``budget``, or ``name``/``exit``) and/or its exit
layer (``layer``/``exit_layer``); the speed-up (``speedup``, ``speed_up`` or
``speed-up``) or, instead, a throughput (``tokens_per_s``, ``tok_s``,
``throughput``) or latency (``latency_ms``, ``latency_s``, ``seconds``) from which
speed-ups are taken relative to the full model's entry (the deepest layer, or a
budget named full / XL). ``method`` is optional; entries without it describe the
Balcony exits. The list may also be the top level, or ``budgets`` may map
names to numbers (``{"budgets": {"S": 1.9, "M": 1.6}}``) or to entry objects.
Methods without measurements are drawn at their ideal speed-up (full
parameters / parameters), dashed and marked "(ideal)".

matplotlib is imported only when plotting, with the Agg backend (PNG, no display).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:
    from .report import EvalReport

__all__ = ["BenchPoint", "match_speedup", "plot_report", "read_bench"]

_NAME_KEYS = ("budget", "name", "exit", "budget_name")
_LAYER_KEYS = ("layer", "exit_layer", "layers", "exit")
_SPEED_KEYS = ("speedup", "speed_up", "speed-up", "speedup_x")
_RATE_KEYS = ("tokens_per_s", "tok_s", "tok_per_s", "tokens_per_second", "throughput", "decode_tok_s")
_TIME_KEYS = ("latency_ms", "latency_s", "latency", "seconds", "time_s")
_LIST_KEYS = ("budgets", "results", "rows", "points")
_FULL_NAMES = ("full", "xl", "none", "base")


@dataclass
class BenchPoint:
    """One measured budget.

    Attributes:
        speedup: Speed-up over the full model (1.0 for the full model).
        budget: Budget name, when given.
        layer: Exit layer, when given.
        method: Method, when given (None: the Balcony exits).
    """

    speedup: float
    budget: str | None = None
    layer: int | None = None
    method: str | None = None


def _first(entry: Mapping[str, Any], keys: Sequence[str], kind: type | tuple) -> Any:
    for k in keys:
        v = entry.get(k)
        if isinstance(v, kind) and not isinstance(v, bool):
            return v
    return None


def read_bench(path: str | os.PathLike) -> list[BenchPoint]:
    """Measured speed-ups from a ``balcony bench`` JSON (see the module docstring for the schema).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: it is not JSON, or holds no entry with a budget and a speed-up;
            the message names the file and the expected schema.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"bench JSON {str(p)!r} does not exist")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"bench JSON {str(p)!r} is not JSON: {e}") from e
    entries: Any = data
    if isinstance(data, Mapping):
        entries = next((data[k] for k in _LIST_KEYS if k in data), None)
    if isinstance(entries, Mapping):
        entries = [
            {"budget": name, **(value if isinstance(value, Mapping) else {"speedup": value})} for name, value in entries.items()
        ]
    if not isinstance(entries, list):
        entries = []
    raw = []
    for e in entries:
        if not isinstance(e, Mapping):
            continue
        name = _first(e, _NAME_KEYS, str)
        layer = _first(e, _LAYER_KEYS, int)
        if name is None and layer is None:
            continue
        method = _first(e, ("method", "kind"), str)
        raw.append((e, name, layer, method))
    points = []
    for e, name, layer, method in raw:
        speed = _first(e, _SPEED_KEYS, (int, float))
        if speed is None:
            speed = _relative(e, raw)
        if speed is not None and speed > 0:
            points.append(BenchPoint(float(speed), name, layer, method))
    if not points:
        raise ValueError(
            f"bench JSON {str(p)!r} holds no usable entries: expected "
            '{"budgets": [{"budget": "S", "layer": 14, "speedup": 1.9}, ...]} '
            "(or tokens_per_s / latency_ms per budget instead of speedup)"
        )
    return points


def _relative(entry: Mapping[str, Any], raw: list) -> float | None:
    """Speed-up from a throughput or latency, relative to the full model's entry of the same method."""
    same = [r for r in raw if r[3] == entry.get("method", entry.get("kind"))] or raw
    full = next((r for r in same if (r[1] or "").lower() in _FULL_NAMES), None)
    if full is None:
        with_layer = [r for r in same if r[2] is not None]
        full = max(with_layer, key=lambda r: r[2]) if with_layer else None
    if full is None:
        return None
    rate, full_rate = _first(entry, _RATE_KEYS, (int, float)), _first(full[0], _RATE_KEYS, (int, float))
    if rate and full_rate:
        return rate / full_rate
    t, full_t = _first(entry, _TIME_KEYS, (int, float)), _first(full[0], _TIME_KEYS, (int, float))
    if t and full_t:
        return full_t / t
    return None


def match_speedup(points: Sequence[BenchPoint] | None, method: str, budget: str, layer: int) -> float | None:
    """The measured speed-up of `method` at `budget` / `layer`, or None.

    Entries without a method describe the Balcony exits (and the full model).
    """
    if not points:
        return None
    for p in points:
        owner = (p.method or "balcony").lower()
        if owner != method.lower() and not (method == "full" and p.method is None):
            continue
        if (p.budget is not None and p.budget.lower() == budget.lower()) or (p.layer is not None and p.layer == layer):
            return p.speedup
    return None


def _short(task: str) -> str:
    from .tasks import OFFLINE_TASKS, offline_key

    key = offline_key(task)
    return key if key and OFFLINE_TASKS[key].task == task else task


def plot_report(report: "EvalReport", output_dir: str | os.PathLike, *, bench: Sequence[BenchPoint] | None = None) -> dict[str, Path]:
    """Write accuracy_vs_speedup.png and accuracy_vs_params.png for `report`.

    The y axis is the task average (or, without tasks, top-1 agreement with the
    full model); each method is one line through its budgets and the full model.

    Returns:
        {"plot_speedup": path, "plot_params": path}, or {} when there is nothing to plot.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if report.tasks:
        y_of = lambda r: r.average
        y_label = "average accuracy (%)" if all(report.percent.get(t) for t in report.tasks) else "task average"
    elif any(r.distill for r in report.rows):
        y_of = lambda r: None if not r.distill else 100 * r.distill["agreement"]
        y_label = "top-1 agreement with the full model (%)"
    else:
        return {}
    full = next((r for r in report.rows if r.key == "full"), None)
    methods = list(dict.fromkeys(r.method for r in report.rows if r.key != "full"))
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for kind, x_label, fname in (
        ("speedup", "speed-up over the full model (x)", "accuracy_vs_speedup.png"),
        ("params", "non-embedding parameters (M)", "accuracy_vs_params.png"),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
        for i, method in enumerate(methods):
            own_full = any(r.layer == full.layer for r in report.rows if r.method == method) if full else True
            rows = [r for r in report.rows if r.method == method] + ([full] if full and not own_full else [])
            rows = [r for r in rows if y_of(r) is not None]
            if not rows:
                continue
            measured = all(r.speedup is not None for r in rows)
            if kind == "speedup":
                xs = [r.speedup if measured else r.ideal_speedup for r in rows]
            else:
                xs = [r.params / 1e6 for r in rows]
            pts = sorted(zip(xs, [y_of(r) for r in rows]))
            label = method + (" (ideal)" if kind == "speedup" and not measured else "")
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker="o",
                linestyle="-" if kind == "params" or measured else "--",
                color=f"C{i}",
                label=label,
            )
        if full and y_of(full) is not None:
            fx = 1.0 if kind == "speedup" else full.params / 1e6
            ax.plot([fx], [y_of(full)], marker="*", markersize=14, color="black", linestyle="none", label="full model")
        if kind == "speedup" and not all(r.speedup is not None for r in report.rows):
            x_label += "; ideal = parameter ratio where not measured"
        ax.set_xlabel(x_label, fontsize=9)
        ax.set_ylabel(y_label)
        title_tasks = ", ".join(_short(t) for t in report.tasks) if report.tasks else "distillation metrics"
        ax.set_title(f"{y_label.split(' (')[0]} vs {'speed-up' if kind == 'speedup' else 'parameters'}\n{title_tasks}", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / fname
        fig.savefig(path)
        plt.close(fig)
        paths[f"plot_{kind}"] = path
    return paths


def plot_token_exits(points: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Top-1 agreement against speed-up: the token-level threshold curve, fixed budgets and early exit as points.

    The x axis is the measured decode speed-up where a `balcony bench --thresholds` JSON supplied one
    for every point, else the ideal speed-up from compute (the axis label says which).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = all(p.get("measured_speedup") is not None for p in points if not str(p["label"]).startswith("early-exit"))
    x_of = (lambda p: p.get("measured_speedup")) if measured else (lambda p: p["ideal_speedup"])
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    sets: dict[str, list] = {}  # one curve per exit set (every exit, or the subset a calibration chose)
    for p in points:
        if p.get("threshold") is not None:
            key = "" if not p.get("exits") else str(p["label"]).split("[", 1)[1].split("]", 1)[0]
            sets.setdefault(key, []).append(p)
    for (key, members), color in zip(sorted(sets.items()), ("tab:blue", "tab:green", "tab:red", "tab:purple", "tab:brown")):
        curve = sorted(members, key=lambda p: p["threshold"])
        label = "token-level exits" + (f" (stopping only at {key})" if key else "")
        ax.plot([x_of(p) for p in curve], [100 * p["agreement"] for p in curve], "o-", color=color, label=label)
        for p in curve:
            ax.annotate(f"{p['threshold']:.2g}", (x_of(p), 100 * p["agreement"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    fixed = [p for p in points if p.get("threshold") is None and not str(p["label"]).startswith("early-exit")]
    if fixed:
        ax.plot([x_of(p) for p in fixed], [100 * p["agreement"] for p in fixed], "s--", color="tab:orange", label="fixed budgets")
        for p in fixed:
            ax.annotate(str(p["label"]), (x_of(p), 100 * p["agreement"]), textcoords="offset points", xytext=(4, -10), fontsize=8)
    early = [p for p in points if str(p["label"]).startswith("early-exit") and p.get("ideal_speedup") == p.get("ideal_speedup")]
    if early and not measured:
        ax.plot([p["ideal_speedup"] for p in early], [100 * p["agreement"] for p in early], "^:", color="tab:gray", label="plain early exit")
    ax.set_xlabel("measured decode speed-up over the full model (x)" if measured else "ideal speed-up from compute (x)")
    ax.set_ylabel("top-1 agreement with the full model (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
