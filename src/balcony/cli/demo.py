"""`balcony demo`, the main job on the embedded default: train exits, answer at every budget, evaluate.

1. train the exits with the quick recipe (generated corpus, cached frozen pass),
   printing per-exit KL / agreement with the full model before and after;
2. answer one prompt at every budget with the trained exits, timing each, and with token-level
   exits at a threshold calibrated on the held-out text to match the largest exit's agreement;
3. score every budget and plain early exit on the held-out text (and on tasks when
   their data is at hand), writing the table and plots next to the exits.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from ..eval.run import run_evaluation
from ..eval.thresholds import calibrate, token_scores
from ..inference.token_exits import auto_label
from ..modeling.cost import ideal_speedup
from ..modeling.loading import load_base
from ..modeling.model import BalconyModel
from ..training.config import TrainConfig
from ..training.loop import load_training_data, train
from .common import encode_prompt
from .registry import command

DEMO_PROMPT = "Explain in two sentences why the sky is blue."


def answer_at_every_budget(model, tok, prompt: str, max_new_tokens: int, threshold: float | None = None,
                           auto_exits: list[int] | None = None) -> list[dict]:
    """Greedy answer per budget (and with token-level exits at `threshold`, stopping only at `auto_exits`
    when given), with decode speed and speed-up over the full model."""
    ids = encode_prompt(tok, prompt, chat=True)
    model.generate(ids, exit=None, max_new_tokens=4)  # warm-up
    rows = []
    names = {j: name for name, j in model.budgets.items()}
    runs = [(name, j) for name, j in model.budgets.items()] + ([("auto", "auto")] if threshold is not None else [])
    for name, j in runs:
        t0 = time.perf_counter()
        if j == "auto":
            out, stats = model.generate(ids, exit="auto", threshold=threshold, exits=auto_exits, max_new_tokens=max_new_tokens,
                                        eos_token_id=None, return_stats=True)
            layer, ideal = stats.mean_layers, None
        else:
            out = model.generate(ids, exit=j, max_new_tokens=max_new_tokens, eos_token_id=None)
            layer, ideal = j, ideal_speedup(model, j)
        dt = time.perf_counter() - t0
        text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).replace("\n", " ")
        label = auto_label(float(f"{threshold:.2g}"), auto_exits and [names[k] for k in auto_exits]) if j == "auto" else name
        rows.append({"budget": label, "layer": layer, "tokens_per_s": max_new_tokens / dt,
                     "ideal_speedup": ideal, "text": text})
    full = next(r["tokens_per_s"] for r in rows if r["layer"] == model.num_layers and not str(r["budget"]).startswith("auto"))
    for r in rows:
        r["speedup"] = r["tokens_per_s"] / full
    return rows


def _hub_reachable(host: str = "huggingface.co") -> bool:
    """Whether the hub's name resolves (offline machines skip the hub tasks instead of retrying)."""
    import socket

    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


@command()
def demo(
    config: str = "smollm2-quick",
    output_dir: str = "runs/demo",
    model: str | None = None,
    prompt: str = DEMO_PROMPT,
    max_new_tokens: int = 32,
    evaluate: bool = True,
    limit: int = 100,
) -> int:
    """The main job: train exits (quick recipe), answer at every budget, evaluate every budget.

    Args:
        config: Training config (a YAML file or a shipped config name).
        output_dir: Where the exits, logs, table and plots go.
        model: Base model (default: the embedded SmolLM2-135M-Instruct).
        prompt: The prompt answered at every budget.
        max_new_tokens: Tokens generated per budget.
        evaluate: Score every budget and plain early exit at the end.
        limit: Items per task when tasks are evaluated (data from $BALCONY_TASK_DATA, or the hub).
    """

    overrides = {"output_dir": output_dir}
    if model is not None:
        overrides["model"] = model
    cfg = TrainConfig.from_yaml(config, overrides)
    print(f"== 1/3 training exits {cfg.exit_layers or ''} with '{config}' -> {output_dir}", flush=True)
    result = train(cfg)

    print("\n== 2/3 answering at every budget with the trained exits", flush=True)
    base, tok = load_base(cfg.model)
    m = BalconyModel.from_pretrained(base, output_dir)
    _, held_out = load_training_data(cfg, tok, m)
    texts = tok.batch_decode(held_out.input_ids, skip_special_tokens=True) if held_out is not None else None
    calibrated = None
    if texts:  # token-level exits: the fastest threshold that matches the largest exit's agreement on held-out text
        scores = token_scores(m, tok, texts, seq_len=cfg.seq_len, max_tokens=cfg.eval_tokens)
        largest = scores.checkpoints[-2]
        calibrated = calibrate(scores, float(scores.agree[largest].mean()), search_exits=True)
    rows = answer_at_every_budget(m, tok, prompt, max_new_tokens, None if calibrated is None else calibrated.threshold,
                                  None if calibrated is None else calibrated.exits)
    print(f"prompt: {prompt!r}")
    print(f"{'budget':<10}{'layers':>7}{'tok/s':>8}{'speed-up':>10}{'ideal':>8}  output")
    for r in rows:
        ideal = "" if r["ideal_speedup"] is None else f"{r['ideal_speedup']:.2f}x"
        print(f"{r['budget']:<10}{r['layer']:>7.1f}{r['tokens_per_s']:>8.1f}{r['speedup']:>9.2f}x{ideal:>8}  {r['text'][:70]}")
    if calibrated is not None:
        name = next(n for n, j in m.budgets.items() if j == largest)
        where = "" if calibrated.exits is None else f" (stopping only at {', '.join(scores.budgets[j] for j in calibrated.exits)})"
        print(f"auto: token-level exits at threshold {calibrated.threshold:.3g}{where}, calibrated on {scores.positions:,} held-out tokens "
              f"to match {name}'s top-1 agreement ({100 * calibrated.agreement:.1f}% there; layers per token: the mean depth "
              f"where each answer token was decided)")
    Path(output_dir, "demo_answers.json").write_text(json.dumps(rows, indent=2))

    if evaluate:
        print("\n== 3/3 evaluating every budget and plain early exit", flush=True)
        task_data = os.environ.get("BALCONY_TASK_DATA")
        tasks = None if task_data else ("piqa,arc_easy" if _hub_reachable() else None)
        if not task_data and tasks is None:
            print("[balcony] no task data and no hub: scoring the held-out text only. "
                  "Set BALCONY_TASK_DATA=piqa=PATH,arc_easy=PATH,lambada=PATH to add offline tasks.", file=sys.stderr)
        kwargs = dict(model=cfg.model, exits=output_dir, text=texts, limit=limit, output=str(Path(output_dir) / "eval"),
                      seq_len=cfg.seq_len, text_tokens=cfg.eval_tokens, log=lambda s: print(s, file=sys.stderr, flush=True))
        try:
            report = run_evaluation(tasks=tasks, task_data=task_data, **kwargs)
        except Exception as e:  # offline without task data: the hub tasks cannot download
            print(f"[balcony] tasks unavailable ({type(e).__name__}: {str(e)[:160]}); scoring the held-out text only. "
                  "Set BALCONY_TASK_DATA=piqa=PATH,arc_easy=PATH,lambada=PATH to add offline tasks.", file=sys.stderr)
            report = run_evaluation(tasks=None, task_data=None, **kwargs)
        print(report.to_text())
        files = report.meta.get("files", {})
        if files:
            print(f"wrote {', '.join(sorted(files.values()))}")
    print(f"\nexits: {output_dir}  (trained on {result.tokens:,} tokens in {result.seconds:.0f} s)")
    return 0
