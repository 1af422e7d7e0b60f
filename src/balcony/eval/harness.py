"""Driving lm-evaluation-harness: resolve task names, score every variant, keep per-item values for paired comparisons."""

from __future__ import annotations

import difflib
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from .variants import Variant

ENGINES = ("shared", "harness")


@dataclass
class TaskResults:
    """Harness results per variant.

    Attributes:
        scores: variant key -> task -> metric -> value (the harness's numbers, unscaled).
        samples: task -> number of documents scored.
        higher_is_better: task -> metric -> bool.
        seconds: variant key -> wall time of its harness run.
        requested: The task names asked for (a group's subtasks also appear in `scores`).
        items: variant key -> task -> metric -> per-document values in document order, for the
            metrics whose harness score is the mean over documents (acc, acc_norm, exact_match):
            what paired comparisons between variants are computed from (`paired_difference`).
    """

    scores: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    items: dict[str, dict[str, dict[str, list[float]]]] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)
    higher_is_better: dict[str, dict[str, bool]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    requested: list[str] = field(default_factory=list)


def resolve_tasks(tasks: Sequence[str], include_path: Sequence[str | os.PathLike] | None = None):
    """An lm-eval `TaskManager` that knows every task in `tasks`.

    Only the include paths are indexed when they hold all the tasks (fast); the
    harness's own task index (about 10 s) is added when some are not there.

    Raises:
        ValueError: a task is found nowhere; the message names it and close matches.
    """
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in include_path or []]
    if not tasks:
        raise ValueError("no tasks to evaluate")
    manager = TaskManager(include_path=paths or None, include_defaults=False) if paths else None
    if manager is None or any(t not in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=paths or None)
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        hints = []
        for t in missing:
            close = difflib.get_close_matches(t, manager.all_tasks, n=3)
            hints.append(f"unknown task {t!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        where = f" in the harness's tasks or {', '.join(paths)}" if paths else " in the harness's tasks"
        raise ValueError("; ".join(hints) + where + ". Offline PIQA/ARC-Easy/LAMBADA need --task-data NAME=PATH.")
    return manager


def _split_metric(key: str) -> tuple[str, str] | None:
    """``"acc,none"`` -> ("acc", "none"); None for stderr entries and non-metrics."""
    if "," not in key:
        return None
    name, filt = key.split(",", 1)
    if name.endswith("_stderr"):
        return None
    return name, filt


def evaluate_tasks(
    variants: Sequence[Variant],
    tokenizer,
    tasks: Sequence[str],
    *,
    include_path: Sequence[str | os.PathLike] | None = None,
    task_manager=None,
    limit: int | float | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    engine: str = "shared",
    log: Callable[[str], None] | None = None,
) -> TaskResults:
    """Run lm-eval tasks at every variant.

    With ``engine="shared"``, loglikelihood requests (multiple choice, loglikelihood,
    rolling loglikelihood) are scored for every variant from one base pass and cached,
    so later variants cost no forward passes; generation tasks run per variant.
    ``engine="harness"`` runs the harness's own `HFLM` loop once per variant.

    Args:
        variants: From `build_variants`.
        tokenizer: The base model's tokenizer.
        tasks: lm-eval task (or group) names.
        include_path: Folders of extra task YAMLs.
        task_manager: A ready `TaskManager` (else one from `resolve_tasks`).
        limit: Documents per task (None: all).
        batch_size: Sequences per forward pass.
        num_fewshot: Few-shot examples (None: each task's default).
        engine: ``shared`` or ``harness``.
        log: Progress messages (e.g. print).

    Returns:
        `TaskResults`.
    """
    import logging

    import lm_eval

    from .lm_eval_model import SharedBudgetsLM

    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r} is not one of {ENGINES}")
    manager = task_manager or resolve_tasks(tasks, include_path)
    lm_logger = logging.getLogger("lm_eval")
    level = lm_logger.level
    lm_logger.setLevel(logging.ERROR)  # HFLM warns that it was handed a ready model: expected here
    try:
        lm = SharedBudgetsLM(list(variants), tokenizer, batch_size=batch_size, shared=engine == "shared")
    finally:
        lm_logger.setLevel(max(level, logging.WARNING))
    out = TaskResults(requested=list(tasks))
    for v in variants:
        lm.select(v.key)
        t0 = time.perf_counter()
        res = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            task_manager=manager,
            limit=limit,
            num_fewshot=num_fewshot,
            bootstrap_iters=0,
            log_samples=True,
            verbosity="WARNING",
        )
        out.seconds[v.key] = time.perf_counter() - t0
        scores: dict[str, dict[str, float]] = {}
        for task, metrics in res["results"].items():
            row = {}
            for key, value in metrics.items():
                split = _split_metric(key)
                if split is None or not isinstance(value, (int, float)):
                    continue
                name, filt = split
                row[name if filt == "none" else f"{name}[{filt}]"] = float(value)
            scores[task] = row
            hib = res.get("higher_is_better", {}).get(task, {})
            out.higher_is_better.setdefault(task, {k: bool(b) for k, b in hib.items() if b is not None})
            n = res.get("n-samples", {}).get(task, {})
            if n:
                out.samples[task] = int(n.get("effective", n.get("original", 0)))
        out.scores[v.key] = scores
        out.items[v.key] = _per_document(res.get("samples") or {}, scores)
        if log:
            summary = ", ".join(f"{t}: " + "/".join(f"{m} {x:.4g}" for m, x in s.items()) for t, s in scores.items())
            log(f"[eval] {v.key:<18} {out.seconds[v.key]:6.1f} s  {summary}")
    return out


def _per_document(samples: Mapping[str, Sequence[Mapping[str, Any]]], scores: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, list[float]]]:
    """task -> metric -> values per document (by doc_id), kept only where their mean is the harness's score."""
    out: dict[str, dict[str, list[float]]] = {}
    for task, docs in samples.items():
        if task not in scores or not docs:
            continue
        docs = sorted(docs, key=lambda d: d.get("doc_id", 0))
        for name, score in scores[task].items():
            values = [d.get(name) for d in docs]
            if not all(isinstance(x, (int, float)) for x in values):
                continue  # e.g. perplexity: per document a (loglikelihood, length) pair
            values = [float(x) for x in values]
            if abs(sum(values) / len(values) - score) <= 1e-9 * max(1.0, abs(score)):
                out.setdefault(task, {})[name] = values
    return out
