"""`balcony train`."""

from __future__ import annotations

from ..training.config import TrainConfig, _split_overrides, parse_overrides
from ..training.loop import train
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
    """
    overrides = parse_overrides(_split_overrides(set)) if set else {}
    for key, value in (("output_dir", output_dir), ("dataset", dataset), ("model", model), ("max_steps", max_steps)):
        if value is not None:
            overrides[key] = value
    overrides["resume"] = resume
    cfg = TrainConfig.from_yaml(config, overrides)
    train(cfg)
    return 0
