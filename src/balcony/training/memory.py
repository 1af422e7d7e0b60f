"""The memory plan of a training run, computed on the meta device: parameters, optimizer state, activations, peak per process.

`plan_memory` builds the run's model from the base's config alone on the meta device (no
weights are read or downloaded), then runs the real training step on it: two micro-batches
of the configured shape through `DistillObjective`, backward and AdamW steps. A dispatch mode
(`LiveBytes`) counts every tensor storage the step creates and when it is freed, so the
activation figure is what this code allocates, not a formula: the frozen pass's transients,
the exits' saved tensors, the loss's (chunk x vocabulary) buffers.

Two things the meta device cannot do are supplied: bf16/fp16 autocast (`AutocastEmulation`:
matmul-like ops run in the low dtype and casts of trainable weights are cached for the
forward, as torch.autocast does on CUDA) and fused attention (meta would decompose
scaled_dot_product_attention into (T x T) matrices; the plan uses the flash-attention kernel
with its O(T) saved state, as CUDA and the CPU run it). The plan counts allocated bytes, as
``torch.cuda.max_memory_allocated`` does; the caching allocator reserves somewhat more, and
the CUDA context (~0.5 GB) comes on top.

    balcony train --config llama3-8b-paper --plan --processes 8
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..modeling.loading import default_model_path, is_default
from .build import build_training_model
from .config import TrainConfig
from .objective import DistillObjective

# Base configs written out by hand, so the plan of a shipped config needs no hub access.
KNOWN_BASES: dict[str, dict[str, Any]] = {
    "meta-llama/Meta-Llama-3-8B": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001, hidden_act="silu",
    ),
    "meta-llama/Llama-2-7b-hf": dict(
        model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, hidden_act="silu",
    ),
}

_LOW_PRECISION_OPS = {F.linear, torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.baddbmm, torch.Tensor.matmul,
                      torch.Tensor.__matmul__, F.scaled_dot_product_attention}


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of live tensor storages created under it (and of those handed to `track`), and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self._sizes: dict[int, int] = {}
        self.now = 0
        self.peak = 0

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._sizes:
            return
        self._sizes[key] = storage.nbytes()
        self.now += self._sizes[key]
        self.peak = max(self.peak, self.now)
        # Storages keep their Python object alive while any tensor (autograd's saved ones too) uses them.
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.now -= self._sizes.pop(key, 0)

    def reset_peak(self) -> int:
        self.peak = self.now
        return self.now

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


class AutocastEmulation(TorchFunctionMode):
    """torch.autocast's policy for matmul-like ops, on a device that has no autocast (meta).

    Inputs of linear / matmul / attention run in `dtype`. The low-precision copy of a trainable
    leaf weight is made once and cached until the outermost ``with`` block ends, as autocast's
    weight cache is: during a forward it holds every exit's bf16 weights (1.3 GB for three
    exits of an 8B model) until the forward returns. Activation checkpointing re-enters it for
    its recomputation in backward (`_meta_patches`), as torch.utils.checkpoint re-enters autocast.
    """

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype
        self._cache: dict[int, torch.Tensor] = {}
        self._depth = 0

    def __enter__(self):
        self._depth += 1
        return super().__enter__()

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            self._cache.clear()
        return super().__exit__(*exc)

    def _cast(self, x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dtype == self.dtype:
            return x
        if x.is_leaf and x.requires_grad:
            if id(x) not in self._cache:
                self._cache[id(x)] = x.to(self.dtype)
            return self._cache[id(x)]
        return x.to(self.dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LOW_PRECISION_OPS:
            args = tuple(self._cast(a) for a in args)
            kwargs = {k: self._cast(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def _flash_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """scaled_dot_product_attention through the flash kernel (meta has its shape rules; O(T) saved state)."""
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(rep, dim=-3), value.repeat_interleave(rep, dim=-3)
    causal = is_causal or attn_mask is not None  # the plan's rows are causal, unpadded: the mask adds nothing
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p, causal, scale=scale)[0]


@contextlib.contextmanager
def _meta_patches(emulate: AutocastEmulation | None):
    """Let the training step run on meta: fused attention, no data-dependent packed-sequence detection, and
    activation checkpointing that recomputes under the autocast emulation (as it re-enters autocast)."""
    import torch.utils.checkpoint as ckpt
    from transformers import masking_utils

    real_sdpa, real_find, real_ckpt = F.scaled_dot_product_attention, masking_utils.find_packed_sequence_indices, ckpt.checkpoint

    def checkpoint(fn, *args, **kwargs):
        def under_emulation(*a, **k):
            active = emulate is None or emulate in torch.overrides._get_current_function_mode_stack()
            with contextlib.nullcontext() if active else emulate:
                return fn(*a, **k)

        return real_ckpt(under_emulation, *args, **kwargs)

    F.scaled_dot_product_attention = _flash_sdpa
    masking_utils.find_packed_sequence_indices = lambda *a, **k: None
    ckpt.checkpoint = checkpoint
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real_sdpa
        masking_utils.find_packed_sequence_indices = real_find
        ckpt.checkpoint = real_ckpt


def base_config(name: str | None):
    """The base model's config without its weights: written out for the paper's models, else read (local path or hub)."""
    from transformers import AutoConfig

    if name in KNOWN_BASES:
        fields = dict(KNOWN_BASES[name])
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    if is_default(name):
        return AutoConfig.from_pretrained(default_model_path())
    try:
        return AutoConfig.from_pretrained(name)
    except OSError as err:
        raise OSError(f"could not read the config of base model {name!r} for the memory plan ({err}); without the hub the plan "
                      f"knows {', '.join(KNOWN_BASES)} and local checkpoint directories") from err


@dataclass
class MemoryPlan:
    """Bytes per process of one training run (see `plan_memory`)."""

    model: str
    processes: int
    precision: str
    base_dtype: str
    rows: int
    seq_len: int
    grad_accum: int
    base_parameters: int
    base_bytes: int
    trainable_parameters: int
    trainable_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    step_bytes: int
    peak_bytes: int
    strategy: str = "ddp"
    gathered_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def state_bytes(self) -> int:
        """Parameters, gradients and optimizer state: held for the whole run."""
        return self.base_bytes + self.trainable_bytes + self.gradient_bytes + self.optimizer_bytes

    def table(self) -> str:
        """The plan as a table (GB = 1e9 bytes)."""
        gb = lambda b: f"{b / 1e9:9.2f} GB"  # noqa: E731
        global_rows = self.rows * self.grad_accum * self.processes
        if self.processes == 1:
            how = "one process"
        elif self.strategy == "ddp":
            how = "DDP: each holds all of this"
        else:
            how = f"FSDP: exits and base layers sharded {self.processes} ways"
        lines = [
            f"memory plan: {self.model}, {self.processes} process(es) ({how}), precision {self.precision}",
            f"  micro-batch {self.rows} x {self.seq_len} tokens, grad_accum {self.grad_accum}: global batch {global_rows} rows "
            f"({global_rows * self.seq_len:,} tokens) per optimizer step",
            f"  {'frozen base (' + self.base_dtype + ', ' + f'{self.base_parameters / 1e9:.2f}B params)':<52}{gb(self.base_bytes)}",
            f"  {'trainable exits (float32 master, ' + f'{self.trainable_parameters / 1e6:.0f}M params)':<52}{gb(self.trainable_bytes)}",
            f"  {'gradients (float32)':<52}{gb(self.gradient_bytes)}",
            f"  {'optimizer state (AdamW: 2 x float32)':<52}{gb(self.optimizer_bytes)}",
            f"  {'activations per micro-batch (peak, fwd + bwd)':<52}{gb(self.activation_bytes)}",
            f"  {'optimizer step (transient)':<52}{gb(self.step_bytes)}",
            *([f"  {'FSDP gathers (a layer running + the next)':<52}{gb(self.gathered_bytes)}"] if self.gathered_bytes else []),
            f"  {'peak per process (allocated)':<52}{gb(self.peak_bytes)}",
            "  (computed on the meta device by running the training step; CUDA context and allocator slack not included)",
            *(f"  note: {n}" for n in self.notes),
        ]
        return "\n".join(lines)


def plan_memory(cfg: TrainConfig, *, processes: int = 1, device: str = "cuda", config: Any = None) -> MemoryPlan:
    """The memory one process of `cfg`'s run needs, from the base's config alone.

    Args:
        cfg: The run's config (model, exits, recipe, batch_size x seq_len, precision, dtype, ...).
        processes: Processes (GPUs) of the run. Under DDP every process holds the whole model,
            so the per-process figures do not shrink; the global batch grows.
        device: The device type planned for: "cuda" (precision auto = bf16, AdamW's foreach
            kernels) or "cpu" (precision auto = fp32, AdamW's per-tensor loop).
        config: The base's config (default: `base_config(cfg.model)`).

    Example:
        >>> print(plan_memory(TrainConfig.from_yaml("llama3-8b-paper"), processes=8).table())  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM

    from .distributed import _PRECISION_DTYPE

    precision = cfg.precision
    if precision == "auto":
        precision = {"bfloat16": "bf16", "float16": "fp16"}.get(cfg.dtype, "bf16" if device == "cuda" else "fp32")
    if cfg.dtype != "auto":
        dtype = getattr(torch, cfg.dtype)
    else:
        dtype = _PRECISION_DTYPE[precision] if cfg.recipe == "balcony" else torch.float32
    config = copy.deepcopy(config) if config is not None else base_config(cfg.model)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    model, _ = build_training_model(cfg, dtype=dtype, base=base)
    notes = []
    if cfg.cache_features or cfg.warmup_loss or cfg.loss_vocab is not None:
        # These need the data; the plan is of the plain step (a frozen pass per batch, the whole vocabulary): an upper bound.
        notes.append("planned without cache_features / warmup_loss / loss_vocab: the plain step, an upper bound")
        cfg = TrainConfig(**{**cfg.to_dict(), "cache_features": False, "warmup_loss": None, "warmup_fraction": 0.0, "loss_vocab": None})
    objective = DistillObjective(model, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(0.9, 0.95), foreach=device == "cuda")
    n_base = sum(p.numel() for p in model.base.parameters() if not p.requires_grad)
    base_bytes = sum(p.numel() * p.element_size() for p in model.base.parameters() if not p.requires_grad)
    n_train = sum(p.numel() for p in trainable)
    train_bytes = sum(p.numel() * p.element_size() for p in trainable)
    ids = torch.zeros(cfg.batch_size, cfg.seq_len, dtype=torch.long, device="meta")
    batch = {"input_ids": ids, "position_ids": torch.arange(cfg.seq_len, device="meta").expand(cfg.batch_size, -1)}
    low = dtype if precision == "fp32" else _PRECISION_DTYPE[precision]
    emulate = AutocastEmulation(low) if precision != "fp32" else None

    tracker = LiveBytes()
    for t in [*objective.parameters(), *objective.buffers()] + ([objective.gram] if objective.gram is not None else []):
        tracker.track(t)
    activation = step = peak = 0
    with _meta_patches(emulate), tracker:
        # Round 1 makes the gradients and the optimizer state; round 2 is the steady state. Gradients stay
        # allocated between rounds (as DDP's bucket views do), so "activations" is what a micro-batch adds
        # on top of parameters + gradients + optimizer state.
        for _ in range(2):
            start = tracker.reset_peak()
            with emulate if emulate is not None else contextlib.nullcontext():  # the forward runs under autocast
                loss, _ = objective(batch)
            (loss / cfg.grad_accum).backward()
            del loss
            activation = tracker.peak - start
            peak = max(peak, tracker.peak)
            start = tracker.reset_peak()
            optimizer.step()
            step = tracker.peak - start
            peak = max(peak, tracker.peak)
            optimizer.zero_grad(set_to_none=False)
    optimizer_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                          if isinstance(t, torch.Tensor) and t.dim() > 0)
    gradient_bytes, gathered = n_train * 4, 0
    if cfg.strategy == "fsdp" and processes > 1:
        # Sharded state divides by P (`balcony.training.sharding`); embedding, norm and head stay whole. While a layer
        # runs its full weights are gathered, and the next one's are prefetched: two of the largest units.
        units = [*model.parts.layers, *model.exits.values()]
        unit_bytes = [sum(p.numel() * p.element_size() for p in u.parameters()) for u in units]
        layer_bytes = sum(unit_bytes[: len(model.parts.layers)])
        base_bytes = base_bytes - layer_bytes + -(-layer_bytes // processes)
        train_bytes, gradient_bytes, optimizer_bytes, step = (-(-b // processes) for b in (train_bytes, gradient_bytes, optimizer_bytes, step))
        gathered = 2 * max(unit_bytes)
        peak = base_bytes + train_bytes + gradient_bytes + optimizer_bytes + max(activation + gathered, step)
        notes.append("FSDP figures: the meta run is unsharded; sharded state and gathers are derived from it")
    return MemoryPlan(
        model=str(cfg.model or "embedded SmolLM2-135M-Instruct"), processes=processes, precision=precision,
        base_dtype=str(dtype).replace("torch.", ""), rows=cfg.batch_size, seq_len=cfg.seq_len, grad_accum=cfg.grad_accum,
        base_parameters=n_base, base_bytes=base_bytes, trainable_parameters=n_train, trainable_bytes=train_bytes,
        gradient_bytes=gradient_bytes, optimizer_bytes=optimizer_bytes, activation_bytes=activation, step_bytes=step,
        peak_bytes=peak, strategy=cfg.strategy, gathered_bytes=gathered, notes=notes,
    )
