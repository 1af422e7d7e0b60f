"""`balcony eval`."""

from __future__ import annotations

import sys

from ..eval.run import run_evaluation
from ..eval.thresholds import CurvePoint, format_curve
from ..modeling.loading import pick_device, pick_dtype
from .common import parse_floats
from .registry import command


@command(name="eval")
def evaluate_command(
    tasks: str | None = None,
    task_data: str | None = None,
    include_path: str | None = None,
    text: str | None = None,
    model: str | None = None,
    exits: str | None = None,
    baseline: list[str] | None = None,
    early_exit: bool = True,
    paired_against: str = "early-exit",
    budgets: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    engine: str = "shared",
    metric: str | None = None,
    seq_len: int = 512,
    text_tokens: int = 8192,
    output: str = "outputs/eval",
    bench_json: str | None = None,
    plot: bool = True,
    dtype: str = "auto",
    device: str | None = None,
    thresholds: str | None = None,
    calibrate: str | None = None,
    confidence_vocab: int | None = None,
) -> int:
    """Score every budget on tasks and a text set; print and write a Table-1 style table and plots.

    Rows: the full model, each budget (with its non-embedding parameters), plain early exit at
    the same layers and every --baseline (a baseline directory with a base/ folder, written by a
    recipe that trains the base, is scored on that base, with its own full-model row); columns:
    tasks, their average, the drop against the full model, and KL / top-1 agreement / perplexity
    on --text. Writes results.{txt,md,csv,json}
    and accuracy_vs_speedup.png / accuracy_vs_params.png into --output.

    Args:
        tasks: Comma-separated lm-eval task names (downloaded by the harness) or piqa, arc_easy, lambada for the offline copies given by --task-data (default: every task with --task-data).
        task_data: Local data for the offline tasks: piqa=PATH,arc_easy=PATH,lambada=PATH[,piqa-labels=PATH] (default: $BALCONY_TASK_DATA).
        include_path: Extra lm-eval task YAML folders, comma-separated.
        text: Text set for the distillation metrics: a .txt (passages split by blank lines) or .jsonl ("text" field) file.
        model: Base model: hub id or local path (default: the embedded SmolLM2-135M-Instruct).
        exits: Trained exits directory (or hub id); without it, fresh untrained exits are scored (with a warning).
        baseline: Other exits to compare, as NAME=DIR (repeatable, or comma-separated; same base model).
        early_exit: Include plain early exit (final norm + head) at the same layers.
        paired_against: The method every row is compared with item by item at its layer (paired difference +- standard error on tasks and text windows): early-exit, balcony (the --exits) or a --baseline name.
        budgets: Only these budgets of --exits (names or layers, comma-separated); the full model is always scored.
        limit: Items per task (None: all).
        batch_size: Sequences per forward pass.
        num_fewshot: Few-shot examples per task (default: each task's own).
        engine: shared (one forward feeds every budget) or harness (the harness's own loop, once per budget).
        metric: Metric shown per task (default: acc, else exact_match, acc_norm, f1).
        seq_len: Tokens per window for the distillation metrics.
        text_tokens: Tokens of --text to score in all.
        output: Folder for the table, JSON/CSV/Markdown and plots.
        bench_json: `balcony bench` JSON with measured speed-ups ({"budgets": [{"budget": "S", "speedup": 1.9}, ...]}).
        plot: Write the PNG plots.
        dtype: Weights dtype: auto (bfloat16 on CUDA, else float32), float32, bfloat16, float16.
        device: cpu, cuda, cuda:1, mps (default: CUDA, then MPS, else the CPU).
        thresholds: Also score token-level exits on --text at these thresholds, comma-separated (e.g. 0.5,0.7,0.9): mean layers, speed-up, KL, agreement, beside the fixed budgets.
        calibrate: Also choose the fastest threshold whose agreement on --text matches this budget (e.g. L) or this agreement fraction (e.g. 0.55).
        confidence_vocab: Token-level exits score confidence over the first this many token ids only (e.g. 8192; default all).
    """
    device = pick_device(device)
    report = run_evaluation(
        model=model,
        exits=exits,
        tasks=tasks,
        task_data=task_data,
        include_path=include_path,
        text=text,
        baselines=",".join(baseline) if baseline else None,
        early_exit=early_exit,
        paired_against=paired_against,
        budgets=budgets,
        limit=limit,
        batch_size=batch_size,
        num_fewshot=num_fewshot,
        engine=engine,
        metric=metric,
        seq_len=seq_len,
        text_tokens=text_tokens,
        output=output,
        bench_json=bench_json,
        plot=plot,
        dtype=pick_dtype(dtype, device),
        device=device,
        thresholds=parse_floats(thresholds, "--thresholds") if thresholds else None,
        calibrate=calibrate,
        confidence_vocab=confidence_vocab,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    print(report.to_text())
    if report.meta.get("token_exits"):
        print("\ntoken-level exits on --text (teacher forced; ideal speed-up from compute, measured from --bench-json):")
        print(format_curve([CurvePoint(**p) for p in report.meta["token_exits"]]))
    if not report.meta.get("trained_exits"):
        print("(exits untrained: pass --exits DIR for trained ones)")
    files = report.meta.get("files", {})
    if files:
        print(f"wrote {', '.join(sorted(files.values()))}")
    return 0
