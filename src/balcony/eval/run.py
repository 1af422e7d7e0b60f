"""`run_evaluation`: check every input, load once, score tasks and text, write the table and plots."""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .harness import ENGINES, evaluate_tasks, resolve_tasks
from .report import RESULT_FILES, EvalReport, make_report
from .texts import distillation_metrics, load_texts
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
    log: Callable[[str], None] | None = print,
) -> EvalReport:
    """Score every budget (and the baselines) on tasks and a text set; write the table and plots.

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
    report = make_report(variants, task_results, distill, bench=bench, metric=metric, meta=meta, paired_against=paired_against)
    if out_dir:
        plots = {}
        if plot:
            from .plots import plot_report

            plots = plot_report(report, out_dir, bench=bench)
        report.meta["files"] = {**{k: str(out_dir / name) for k, name in RESULT_FILES.items()}, **{k: str(p) for k, p in plots.items()}}
        report.write(out_dir)
    if tmp:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return report
