"""The model: `BalconyConfig`, where exits are built (`arch`), `BalconyModel`, saving/loading, base models, the cost model."""

from .config import BalconyConfig
from .cost import ideal_speedup, kv_cache_bytes
from .distill import DistillOutput
from .loading import (
    DEFAULT_EXITS,
    default_exit_layers,
    default_model,
    load_base,
    pick_device,
)
from .model import BalconyModel, BalconyOutput, Exit
from .saving import check_compatible, resolve_exits_dir

__all__ = [
    "BalconyConfig", "BalconyModel", "BalconyOutput", "DEFAULT_EXITS", "DistillOutput", "Exit", "check_compatible",
    "default_exit_layers", "default_model", "ideal_speedup", "kv_cache_bytes", "load_base", "pick_device", "resolve_exits_dir",
]
