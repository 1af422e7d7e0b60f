"""`run_evaluation`: check every input, load once, score tasks and text, write the table and plots."""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..inference.options import ExitPolicy
from ..inference.token_exits import auto_label
from .harness import ENGINES, evaluate_tasks, resolve_tasks
from .report import RESULT_FILES, EvalReport, make_report
from .texts import distillation_metrics, load_texts
from .thresholds import calibrate as calibrate_threshold
from .thresholds import curve, token_scores
from .variants import BALCONY, EARLY_EXIT, FULL, build_variants, load_balcony


def _split_list(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [p.strip() for p in value.split(",") if p.strip()]
    return [str(p).strip() for p in value if str(p).strip()]


def parse_baselines(spec: str | Sequence[str] | Mapping[str, str] | None) -> dict[str, str]:
    """``"name=dir,name2=dir2"`` (or a list of ``name=dir``) -> {name: dir}.

    Raises:
        ValueError: an item is not ``name=dir``, or a name repeats.
        FileNotFoundError: a directory does not exist.
    """
    if not spec:
        return {}
    items = list(spec.items()) if isinstance(spec, Mapping) else [tuple(p.split("=", 1)) if "=" in p else (p, None) for p in _split_list(spec)]
    out: dict[str, str] = {}
    for name, path in items:
        if path is None or not str(name).strip() or not str(path).strip():
            raise ValueError(f"baseline {name!r} is not NAME=DIR (e.g. --baseline sorted=runs/sorted-exits)")
        name = str(name).strip()
        if name in out:
            raise ValueError(f"baseline name {name!r} is given twice")
        if not Path(str(path)).expanduser().is_dir() and str(path).count("/") != 1:
            raise FileNotFoundError(f"baseline {name!r}: exits directory {str(path)!r} does not exist")
        out[name] = str(Path(str(path)).expanduser()) if Path(str(path)).expanduser().is_dir() else str(path)
    return out


def _plan_tasks(tasks: str | Sequence[str] | None, task_data: Mapping[str, Path]) -> list[str]:
    """Task names for the harness: offline aliases become balcony_* when their data is given."""
    from .tasks import OFFLINE_TASKS, offline_key

    names = _split_list(tasks)
    if not names:
        return [OFFLINE_TASKS[k].task for k in OFFLINE_TASKS if k in task_data]
    out = []
    for name in names:
        key = offline_key(name)
        if key and key in task_data:
            out.append(OFFLINE_TASKS[key].task)
        elif key and name.lower() == OFFLINE_TASKS[key].task:
            raise ValueError(f"task {name!r} reads local data: give it with --task-data {key}=PATH")
        else:
            out.append(name)
    return list(dict.fromkeys(out))


def _target_agreement(spec: str, scores, model) -> float:
    """`--calibrate L` (a budget: its agreement on the text) or `--calibrate 0.55` (an agreement) -> a fraction."""
    try:
        value = float(spec)
    except ValueError:
        layer = model.resolve_exit(spec)
        if layer not in scores.agree:
            raise ValueError(f"--calibrate {spec!r}: budget {spec} is not one of the exits token-level exits use "
                             f"({scores.checkpoints})") from None
        return float(scores.agree[layer].mean())
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"--calibrate {spec!r}: an agreement target must be a fraction in [0, 1], or a budget name such as L")
    return value


def _measured_token_speedups(path) -> dict[str, float]:
    """label -> measured batch-1 decode speed-up, from a `balcony bench --thresholds` JSON (empty if it has none)."""
    data = json.loads(Path(path).read_text())
    runs = data.get("token_exits") or {}
    rows = runs.get("text_batch1") or runs.get("batch1") or {}  # along held-out text when the bench ran on it
    out = {k: float(r["speedup"]) for k, r in rows.items()}
    full = next((k for k in rows if rows[k].get("speedup") == 1.0 and not k.startswith("auto@")), None)
    if full is not None:
        out["full"] = out.pop(full)
    return out


def run_evaluation(
    *,
    model: str | None = None,
    exits: str | None = None,
    tasks: str | Sequence[str] | None = None,
    task_data: str | Mapping[str, str] | None = None,
    include_path: str | Sequence[str] | None = None,
    text: str | Sequence[str] | None = None,
    baselines: str | Mapping[str, str] | None = None,
    early_exit: bool = True,
    paired_against: str = EARLY_EXIT,
    method: str = BALCONY,
    budgets: str | Sequence[str | int] | None = None,
    exit_layers: Sequence[int] | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    engine: str = "shared",
    metric: str | None = None,
    seq_len: int = 512,
    text_tokens: int = 8192,
    output: str | os.PathLike | None = None,
    bench_json: str | os.PathLike | None = None,
    plot: bool = True,
    dtype: str = "float32",
    device: str | None = None,
    thresholds: Sequence[float] | None = None,
    calibrate: str | None = None,
    confidence_vocab: int | None = None,
    log: Callable[[str], None] | None = print,
) -> EvalReport:
    """Score every budget (and the baselines) on tasks and a text set; write the table and plots.

    With `thresholds` (and/or `calibrate`: a budget name whose agreement to match, or an agreement
    fraction), token-level exits are scored on the text set too (`balcony.eval.thresholds`): each
    threshold's mean layers, ideal speed-up, KL and agreement, beside the fixed budgets and early exit,
    in ``report.meta["token_exits"]`` and token_exits.png; measured speed-ups come from a bench JSON
    written by ``balcony bench --thresholds``.

    Inputs are all checked (task names, data files, baselines, bench JSON, text)
    before the model is loaded. See `evaluate_command` for the arguments; `method`
    names the rows of `exits` (default ``balcony``).

    Returns:
        The `EvalReport` (also written into `output` when given).
    """
    from .tasks import parse_task_data, prepare_tasks, task_data_from_env

    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r} is not one of {ENGINES}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit} must be >= 1 (items per task)")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    data = parse_task_data(task_data) if task_data else task_data_from_env()
    task_names = _plan_tasks(tasks, data)
    if not task_names and not text:
        raise ValueError("nothing to evaluate: give --tasks / --task-data and/or --text")
    baseline_dirs = parse_baselines(baselines)
    methods = [method, *([EARLY_EXIT] if early_exit else []), *baseline_dirs]
    if paired_against not in methods and paired_against != EARLY_EXIT:
        raise ValueError(f"paired_against={paired_against!r} is not one of the evaluated methods: {', '.join(methods)}")
    out_dir = Path(output) if output else None
    include = _split_list(include_path)
    for p in include:
        if not Path(p).is_dir():
            raise FileNotFoundError(f"include path {p!r} is not a directory")
    tmp = None
    if data and any(n.startswith("balcony_") for n in task_names):
        task_dir = out_dir / "tasks" if out_dir else Path(tmp := tempfile.mkdtemp(prefix="balcony-tasks-"))
        include.insert(0, str(prepare_tasks(data, task_dir)))
    manager = resolve_tasks(task_names, include) if task_names else None
    bench = None
    if bench_json:
        from .plots import read_bench

        bench = read_bench(bench_json)
    passages = load_texts(text) if text else None
    thresholds = [float(t) for t in thresholds or []]
    bad = [t for t in thresholds if not 0.0 <= t <= 1.0]
    if bad:
        raise ValueError(f"thresholds {bad} are outside [0, 1]")
    if (thresholds or calibrate) and not passages:
        raise ValueError("--thresholds / --calibrate score token-level exits on a text set: give --text")
    policy = ExitPolicy(confidence_vocab=confidence_vocab)  # validated before the model loads

    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m, tok, trained = load_balcony(model, exits, exit_layers=exit_layers, dtype=dtype, device=device)
    for w in caught:
        if log:
            log(f"[eval] warning: {w.message}")
    variants = build_variants(m, early_exit=early_exit, baselines=baseline_dirs, budgets=_split_list(budgets) if isinstance(budgets, str) else budgets,
                              method=method)
    if log:
        log(f"[eval] {len(variants)} variants: {', '.join(v.key for v in variants)} (model loaded in {time.perf_counter() - t0:.1f} s)")
    meta: dict[str, Any] = {
        "model": m.config.base_model_name_or_path,
        "exits": exits,
        "trained_exits": trained,
        "baselines": baseline_dirs,
        "tasks": task_names,
        "limit": limit,
        "num_fewshot": num_fewshot,
        "engine": engine,
        "batch_size": batch_size,
        "text": str(text) if isinstance(text, (str, os.PathLike)) else None if text is None else f"{len(passages)} passages",
        "seq_len": seq_len,
        "text_tokens": text_tokens,
        "bench_json": None if bench_json is None else str(bench_json),
    }
    task_results = None
    if task_names:
        t1 = time.perf_counter()
        task_results = evaluate_tasks(
            variants, tok, task_names, task_manager=manager, limit=limit, batch_size=batch_size, num_fewshot=num_fewshot, engine=engine, log=log
        )
        meta["task_seconds"] = time.perf_counter() - t1
        meta["task_samples"] = task_results.samples
    distill = None
    if passages:
        t1 = time.perf_counter()
        distill = distillation_metrics(variants, tok, passages, seq_len=seq_len, max_tokens=text_tokens, batch_size=batch_size, progress=log is not None,
                                       per_window=True)
        meta["distill_seconds"] = time.perf_counter() - t1
        meta["distill_tokens"] = distill[FULL]["tokens"]
    if thresholds or calibrate:
        t1 = time.perf_counter()
        scores = token_scores(m, tok, passages, policy=policy, seq_len=seq_len, max_tokens=text_tokens, batch_size=batch_size)
        points = curve(scores, thresholds, model=m)
        if calibrate:
            target = _target_agreement(calibrate, scores, m)
            best = calibrate_threshold(scores, target)  # every exit may stop a token
            best.label = f"auto@{best.threshold:.4g} (calibrated)"
            searched = calibrate_threshold(scores, target, search_exits=True)  # and which exits pay to check
            named = None if searched.exits is None else [scores.budgets.get(j, str(j)) for j in searched.exits]
            searched.label = auto_label(float(f"{searched.threshold:.4g}"), named) + " (calibrated, exit set searched)"
            points[len(thresholds):len(thresholds)] = [best] + ([searched] if searched.exits is not None else [])
            meta["calibrated"] = {"target": calibrate, "target_agreement": target, **best.to_dict()}
            meta["calibrated_exit_set"] = {"target": calibrate, "target_agreement": target, "exit_names": named, **searched.to_dict()}
        measured = _measured_token_speedups(bench_json) if bench_json else {}
        for p in points:
            key = p.label.split(" ")[0] if p.threshold is not None else p.label
            p.measured_speedup = measured.get(key)
        meta["token_exits"] = [p.to_dict() for p in points]
        meta["token_exit_seconds"] = time.perf_counter() - t1
    report = make_report(variants, task_results, distill, bench=bench, metric=metric, meta=meta, paired_against=paired_against)
    if out_dir:
        plots = {}
        if plot:
            from .plots import plot_report

            plots = plot_report(report, out_dir, bench=bench)
            if report.meta.get("token_exits"):
                from .plots import plot_token_exits

                plots["plot_token_exits"] = plot_token_exits(report.meta["token_exits"], out_dir / "token_exits.png")
        report.meta["files"] = {**{k: str(out_dir / name) for k, name in RESULT_FILES.items()}, **{k: str(p) for k, p in plots.items()}}
        report.write(out_dir)
    if tmp:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return report
