"""`balcony train`: train exits from a config (resumable), or print the run's memory plan without loading weights."""

from __future__ import annotations

from ..training.config import TrainConfig, _split_overrides, parse_overrides
from ..training.loop import train
from ..training.memory import plan_memory
from .registry import command


@command(name="train")
def train_command(
    config: str = "smollm2-quick",
    set: str | None = None,
    output_dir: str | None = None,
    dataset: str | None = None,
    model: str | None = None,
    max_steps: int | None = None,
    resume: bool = True,
    device: str | None = None,
    dtype: str | None = None,
    plan: bool = False,
    processes: int = 1,
) -> int:
    """Train Balcony exits by self-distillation (resumes from the last checkpoint).

    Args:
        config: A YAML file, or a shipped config: smollm2-quick, smollm2-default, llama3-8b-paper, llama2-7b-paper.
        set: Comma-separated overrides KEY=VALUE of any config field, e.g. "lr=1e-4,epochs=2".
        output_dir: Where checkpoints, logs and the trained exits go (overrides the config).
        dataset: Hub id or local txt/jsonl/parquet file or directory (default: the generated corpus).
        model: Base model hub id or path (default: the config's, or the embedded model).
        max_steps: Stop after this many optimizer steps.
        resume: Continue from the newest checkpoint in output_dir.
        device: auto, cuda, mps or cpu (default: CUDA, then MPS, else the CPU; under accelerate launch each process takes its GPU).
        dtype: Dtype of the frozen base: auto, float32, bfloat16 or float16 (auto: bfloat16 with bf16 precision, e.g. on a GPU).
        plan: Print the memory plan per process (parameters, optimizer state, activations, peak), computed on the meta device without downloading weights, and exit.
        processes: With --plan: the number of processes (GPUs) to plan for.
    """
    overrides = parse_overrides(_split_overrides(set)) if set else {}
    for key, value in (("output_dir", output_dir), ("dataset", dataset), ("model", model), ("max_steps", max_steps),
                       ("device", device), ("dtype", dtype)):
        if value is not None:
            overrides[key] = value
    overrides["resume"] = resume
    cfg = TrainConfig.from_yaml(config, overrides)
    if plan:
        print(plan_memory(cfg, processes=processes).table())
        return 0
    train(cfg)
    return 0
