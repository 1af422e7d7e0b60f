"""balcony: one deployed LLM that answers at several compute budgets.

A frozen Hugging Face decoder-only model plus a Balcony module (one decoder layer,
a norm and the shared LM head) at a few exit layers, trained by self-distillation.

Layout (imports point one way, left to right; `tests/test_layout.py` checks it):

    cli  ->  serving / eval / bench / training  ->  modeling  ->  inference  ->  metrics, _version

* `balcony.modeling`: the config, the per-family map where exits are built, `BalconyModel`
  (forward at a budget, distillation forward, save/load like a PEFT adapter), loading
  base models, and the cost model. `BalconyModel.generate` / `.quantize` call into
  `balcony.inference`, as HF's `PreTrainedModel.generate` calls its generation mixin.
* `balcony.inference`: decoding on a model's parts (sampling, KV cache, spans and
  masks, the fast layer path, stopping, the engine, self-speculative decoding,
  weight-only quantization) and the `DecodeOptions` / `DraftOptions` it takes.
* `balcony.training`: config, data, generated corpus, cached features, warm start,
  losses, objective, checkpoints and the loop (`balcony train`).
* `balcony.eval`: variants, lm-eval harness adapter, text metrics, report and plots (`balcony eval`).
* `balcony.bench`: speed and memory measurements (`balcony bench`).
* `balcony.serving`: the OpenAI-compatible server (`balcony serve`).
* `balcony.metrics`: the only code that measures KL / top-1 agreement / perplexity.
"""

from ._version import __version__
from .inference.engine import generate, generate_stream
from .inference.options import DecodeOptions, DraftOptions, ExitPolicy
from .inference.sampling import SamplingConfig
from .inference.speculative import (
    SpeculativeStats,
    speculative_generate,
    speculative_stream,
)
from .inference.token_exits import (
    TokenExitStats,
    token_exit_generate,
    token_exit_stream,
)
from .modeling.config import BalconyConfig
from .modeling.cost import ideal_speedup, kv_cache_bytes
from .modeling.distill import DistillOutput
from .modeling.loading import DEFAULT_EXITS, default_model, load_base
from .modeling.model import BalconyModel, BalconyOutput

__all__ = [
    "BalconyConfig",
    "BalconyModel",
    "BalconyOutput",
    "DEFAULT_EXITS",
    "DecodeOptions",
    "DistillOutput",
    "DraftOptions",
    "ExitPolicy",
    "SamplingConfig",
    "SpeculativeStats",
    "TokenExitStats",
    "__version__",
    "default_model",
    "generate",
    "generate_stream",
    "ideal_speedup",
    "kv_cache_bytes",
    "load_base",
    "speculative_generate",
    "speculative_stream",
    "token_exit_generate",
    "token_exit_stream",
]
