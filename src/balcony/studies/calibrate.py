"""Turning a time budget into optimizer steps: a few timed steps of every variant, then equal steps for all.

Variants cost different amounts per step (a recipe that trains the base runs a
backward pass through it; an MLP exit is half a decoder layer), but an equal-compute
ablation gives each the same tokens and steps. So the budget fixes the steps:
``steps = budget / sum over variants of seconds per step``, with each variant's
seconds per step measured by training it for a few steps on a sliver of the data.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
from pathlib import Path
from typing import Callable, Mapping

from ..training.config import TrainConfig
from ..training.loop import train
from .plan import tokens_per_step


def step_seconds(log_path: str | Path) -> list[float]:
    """Seconds each logged optimizer step took, from a run's ``log.jsonl`` (logged every step).

    The log has the running token count and tokens per second at each step; their
    ratio is the training time so far, and its differences are the steps' times.
    """
    times = []
    for line in Path(log_path).read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec and rec.get("tokens_per_s"):
            times.append((rec["step"], rec["tokens"] / rec["tokens_per_s"]))
    times.sort()
    return [b - a for (_, a), (_, b) in zip([(0, 0.0)] + times, times)]


def measure_step_seconds(
    configs: Mapping[str, TrainConfig],
    workdir: str | Path,
    *,
    probe_steps: int = 3,
    log: Callable[[str], None] | None = print,
) -> dict[str, float]:
    """Seconds per optimizer step of each variant, from `probe_steps` timed steps after a warm-up step.

    Each variant trains ``probe_steps + 1`` steps on just as many batches in
    ``workdir/<name>`` (deleted afterwards); the first step (allocations, first-touch)
    is not counted and the median of the others is returned.

    Raises:
        ValueError: `probe_steps` < 1.
    """
    if probe_steps < 1:
        raise ValueError(f"probe_steps={probe_steps} must be >= 1")
    out = {}
    for name, cfg in configs.items():
        where = Path(workdir) / name
        shutil.rmtree(where, ignore_errors=True)
        steps = probe_steps + 1
        probe = dataclasses.replace(
            cfg,
            max_steps=steps,
            max_tokens=steps * tokens_per_step(cfg),
            eval_tokens=0,
            log_every=1,
            save_every=0,
            output_dir=str(where),
            resume=False,
            progress=False,
            warm_start_tokens=min(cfg.warm_start_tokens, steps * tokens_per_step(cfg)),
            loss_vocab_tokens=min(cfg.loss_vocab_tokens, steps * tokens_per_step(cfg)),
        )
        train(probe)
        seconds = step_seconds(where / "log.jsonl")[1:]
        out[name] = statistics.median(seconds) if seconds else float("nan")
        shutil.rmtree(where, ignore_errors=True)
        if log:
            log(f"[ablate] {name}: {out[name]:.2f} s per step (median of {len(seconds)} timed steps)")
    return out


def steps_for_budget(seconds_per_step: Mapping[str, float], budget_minutes: float) -> int:
    """The equal step count that fits every variant's training into `budget_minutes` (at least 1).

    Example:
        >>> steps_for_budget({"a": 1.0, "b": 3.0}, budget_minutes=2)
        30

    Raises:
        ValueError: a budget <= 0, or no usable measurement.
    """
    if not budget_minutes > 0:
        raise ValueError(f"budget_minutes={budget_minutes} must be > 0")
    per_step = sum(s for s in seconds_per_step.values() if s == s)
    if not per_step > 0:
        raise ValueError(f"no usable step time among {dict(seconds_per_step)}: give the steps yourself (--steps)")
    return max(1, int(budget_minutes * 60 // per_step))
