"""Training the exits by self-distillation: `TrainConfig`, data, the generated corpus, losses, checkpoints, the loop."""

from .config import CONFIG_DIR, TrainConfig, parse_overrides
from .data import DataConfig, prepare_data
from .evaluate import distill_metrics
from .loop import TrainResult, train

__all__ = ["CONFIG_DIR", "DataConfig", "TrainConfig", "TrainResult", "distill_metrics", "parse_overrides", "prepare_data", "train"]
