"""balcony: one deployed LLM that answers at several compute budgets.

Frozen Hugging Face decoder-only model + a Balcony module (one decoder layer,
a norm and the shared LM head) at a few exit layers, trained by self-distillation.
"""

from .config import BalconyConfig
from .generation import SamplingConfig, generate
from .loading import DEFAULT_EXITS, default_model, load_base
from .model import BalconyModel, BalconyOutput, DistillOutput

__version__ = "0.1.0"

__all__ = [
    "BalconyConfig",
    "BalconyModel",
    "BalconyOutput",
    "DistillOutput",
    "DEFAULT_EXITS",
    "SamplingConfig",
    "default_model",
    "generate",
    "load_base",
]
