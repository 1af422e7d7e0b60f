"""Run logging: JSONL always, TensorBoard and W&B when asked for and installed."""

from __future__ import annotations

import json
from pathlib import Path


class RunLogger:
    """JSONL always; TensorBoard and W&B when asked for and installed."""

    def __init__(self, output_dir: Path, report_to: list[str], config: dict, enabled: bool = True):
        self.enabled = enabled
        self.path = output_dir / "log.jsonl"
        self.tb = self.wandb = None
        if not enabled:
            return
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(output_dir / "tensorboard"))
            except ImportError:
                print("[balcony] tensorboard is not installed; logging to JSONL only")
        if "wandb" in report_to:
            try:
                import wandb

                self.wandb = wandb.init(project="balcony", config=config, dir=str(output_dir), resume="allow")
            except ImportError:
                print("[balcony] wandb is not installed; logging to JSONL only")

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        step = record.get("step", 0)
        for k, v in record.items():
            if isinstance(v, (int, float)) and k != "step":
                if self.tb is not None:
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(record, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
