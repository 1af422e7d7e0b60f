"""`balcony ablate`."""

from __future__ import annotations

import sys

from .registry import command


@command(name="ablate")
def ablate_command(
    study: str = "figure5",
    output: str = "runs/ablate",
    model: str | None = None,
    exits: list[int] | None = None,
    config: str = "smollm2-default",
    set: str | None = None,
    dataset: str | None = None,
    text_field: str = "text",
    steps: int | None = None,
    budget_minutes: float | None = None,
    variants: str | None = None,
    text: str | None = None,
    tasks: str | None = None,
    task_data: str | None = None,
    limit: int | None = None,
    text_tokens: int = 16384,
    eval_seq_len: int = 512,
    evaluate: bool = True,
    scratch_layers: int = 8,
    scratch_hidden: int = 256,
    scratch_vocab: int = 4096,
    progress: bool = True,
) -> int:
    """Run one of the paper's ablation studies at equal compute and decide its claims (resumes when rerun).

    figure5 trains, on the same tokens for the same steps, the reference (decoder exit initialised
    from the last layer, KL, frozen base) and one variant per ablated factor: random init, MLP-only
    and attention-only exits, KL+CE, unfrozen base, Sorted fine-tuning (claims 1-3). table4 pretrains
    a small Llama from scratch with Balcony exits and with Sorted sub-models (claim 4). All variants
    are evaluated in one run, each paired item by item with the reference; OUTPUT gets the figure,
    the tables, claims.json and the evaluation.

    Args:
        study: figure5 or table4.
        output: Study folder; rerun the same command to resume (finished variants are skipped).
        model: Base model for figure5: hub id or local path (default: the embedded SmolLM2-135M-Instruct).
        exits: Exit layers, e.g. 14,17,20 (table4 default: 1/4, 1/2 and 3/4 of the depth).
        config: The best-known recipe the variants start from: a shipped config name or a YAML file.
        set: Comma-separated TrainConfig overrides for every variant, e.g. "lr=1e-3,seq_len=512".
        dataset: Training corpus: hub id or local txt/jsonl/parquet (figure5 default: the generated corpus; table4: required).
        text_field: The corpus's text column.
        steps: Optimizer steps per variant (default: what fits --budget-minutes).
        budget_minutes: Training minutes for all variants together: each variant's step time is measured, then all get the same steps.
        variants: Only these variants, comma-separated (the reference always runs).
        text: Held-out text for KL / top-1 agreement / NLL, paired window by window (.txt or .jsonl).
        tasks: lm-eval tasks (default: every task with --task-data).
        task_data: Offline task data: piqa=PATH,arc_easy=PATH,lambada=PATH[,piqa-labels=PATH].
        limit: Items per task.
        text_tokens: Tokens of --text to score.
        eval_seq_len: Tokens per window of --text (each window is one paired observation).
        evaluate: Evaluate and judge the claims after training.
        scratch_layers: table4: layers of the from-scratch model.
        scratch_hidden: table4: its hidden size (4 heads, 2 KV heads, MLP 3x).
        scratch_vocab: table4: its BPE vocabulary, fitted to --dataset.
        progress: Show progress bars.
    """
    from ..studies import ScratchSpec, run_study
    from ..training.config import _split_overrides, parse_overrides

    log = lambda s: print(s, file=sys.stderr, flush=True)
    result = run_study(
        study,
        output=output,
        model=model,
        exits=exits,
        config=config,
        overrides=parse_overrides(_split_overrides(set)) if set else None,
        dataset=dataset,
        text_field=text_field,
        steps=steps,
        budget_minutes=budget_minutes,
        variants=variants,
        text=text,
        tasks=tasks,
        task_data=task_data,
        limit=limit,
        text_tokens=text_tokens,
        eval_seq_len=eval_seq_len,
        evaluate=evaluate,
        scratch=ScratchSpec(layers=scratch_layers, hidden=scratch_hidden, intermediate=3 * scratch_hidden, vocab=scratch_vocab),
        progress=progress,
        log=log,
    )
    for c in result.claims:
        print(f"claim {c.claim}: {c.verdict.upper()} - {c.reason}")
    if result.markdown:
        print(f"wrote {result.markdown}" + (f" and {result.figure}" if result.figure else ""))
    return 0
