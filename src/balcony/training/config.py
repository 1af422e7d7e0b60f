"""`TrainConfig`: every option of a training run, validated; YAML files and KEY=VALUE overrides map onto it."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RECIPES = ("balcony", "unfrozen", "sorted", "pretrain")


LOSSES = ("kl", "kl+ce", "ce", "reverse_kl", "jsd")


PRECISIONS = ("fp32", "bf16", "fp16", "auto")


DTYPES = ("auto", "float32", "bfloat16", "float16")


STRATEGIES = ("ddp", "fsdp")


WARMUP_LOSSES = (None, "logit_mse")


CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class TrainConfig:
    """Everything a training run needs; YAML files map onto it and CLI overrides patch it.

    Args:
        model: Base model (hub id or path; None = embedded SmolLM2-135M-Instruct).
        exit_layers: Exit layers (default: 14/17/20 on the embedded model, else 0.47/0.56/0.66 of N).
        exit_kind: decoder | mlp | attention | norm.
        init: last_layer | random | identity.
        budget_names: Names of the budgets (exits then full model).
        train_exits: Train only these exits (others frozen and untouched); default all.
        exits_from: Start from exits saved in this directory (e.g. to add one more exit).
        recipe: balcony (frozen base, the paper) | unfrozen (base trains too) |
            sorted (no exit modules; whole model trained with the loss at every exit through
            the shared norm and head) | pretrain (random base + exits, mean CE over every
            sub-model and the full model; with exit_kind norm the exits share the base's final
            norm: Sorted pretraining).
        dataset: Hub id or local txt/jsonl/parquet file or directory; None = the generated default corpus.
        dataset_config, split, text_field, messages_field, streaming: How to read `dataset`.
        corpus_tokens: Tokens of generated default corpus when `dataset` is None.
        seq_len: Tokens per row (packed, positions reset per document).
        max_tokens: Use at most this many training tokens (None: all).
        eval_tokens: Held-out tokens for periodic evaluation.
        loss: kl | kl+ce | ce | reverse_kl | jsd.
        ce_weight: Weight of the CE term for kl+ce.
        temperature: Distillation temperature.
        warmup_loss: None or logit_mse (head-free first phase).
        warmup_fraction: Share of the optimizer steps spent in the warm-up loss phase.
        warm_start: None or lstsq: before the first step, fit each exit's MLP output projection
            in closed form to the final hidden state (`balcony.training.warmstart`), on up to
            `warm_start_tokens` cached tokens.
        warm_start_tokens: Tokens the lstsq fit reads.
        loss_vocab: None (the whole vocabulary) or k: distil over the k vocabulary entries that
            carry the most teacher probability on the first `loss_vocab_tokens` training tokens,
            the teacher renormalised over them (`balcony.training.losses.teacher_vocab`). The head's
            products shrink V/k times; the exits are still evaluated and used with the full head.
            A k at or above the model's vocabulary size distils over the whole vocabulary.
        loss_vocab_tokens: Tokens the loss vocabulary is chosen on.
        cache_features: Run the frozen pass once and reuse it across epochs.
        feature_dtype: float16 | float32 storage of cached features.
        epochs: Passes over the training rows (fractions allowed).
        max_steps: Stop after this many optimizer steps (overrides epochs when set).
        batch_size: Rows per micro-batch (per process).
        grad_accum: Micro-batches per optimizer step.
        lr: Peak learning rate (paper: 5e-4).
        weight_decay: AdamW weight decay.
        warmup_ratio: Share of steps for linear LR warm-up before the cosine decay.
        max_grad_norm: Gradient clipping (0: off).
        precision: fp32 | bf16 | fp16 | auto (the default: bf16 on a GPU that supports it, or when
            `dtype` asks for a bf16 base, else fp32): the autocast precision of the forward passes. Exits and optimizer state stay float32
            (master weights) whatever it is.
        dtype: auto | float32 | bfloat16 | float16: the dtype the frozen base (the teacher) is
            loaded in. auto: the precision's dtype when the base is frozen (bf16 on a GPU), float32
            when it trains (recipes unfrozen / sorted / pretrain keep fp32 master weights).
        device: auto | cuda | mps | cpu: where a single process trains (auto: CUDA, then MPS,
            else the CPU). Under ``accelerate launch`` each process takes its own GPU.
        strategy: ddp (every process holds the whole model, gradients all-reduced) or fsdp
            (exit parameters, gradients and optimizer state sharded across processes, and the
            frozen base's decoder layers too); see docs/training-at-scale.md.
        gradient_checkpointing: Recompute activations in backward (for unfrozen/sorted/pretrain).
        checkpoint_exits: Recompute each exit layer's activations in backward: ~3% more compute
            for ~90 MB less peak memory per exit on the embedded model at 8x256 tokens.
        chunk_size: Tokens per logits chunk in the loss.
        seed: Random seed (data order and init).
        output_dir: Where checkpoints, logs and the final exits go.
        save_every: Checkpoint every N optimizer steps (0: only at the end).
        eval_every: Evaluate every N optimizer steps (0: only before and after).
        log_every: Log every N optimizer steps.
        keep_checkpoints: How many checkpoints to keep.
        resume: Continue from the newest checkpoint in output_dir if there is one.
        report_to: Loggers besides JSONL: tensorboard, wandb (used when installed).
        progress: Show progress bars.
    """

    model: str | None = None
    exit_layers: list[int] | None = None
    exit_kind: str = "decoder"
    init: str = "last_layer"
    budget_names: list[str] | None = None
    train_exits: list[int] | None = None
    exits_from: str | None = None
    recipe: str = "balcony"
    dataset: str | None = None
    dataset_config: str | None = None
    split: str = "train"
    text_field: str = "text"
    messages_field: str | None = None
    streaming: bool = False
    corpus_tokens: int = 200_000
    seq_len: int = 256
    max_tokens: int | None = None
    eval_tokens: int = 8192
    loss: str = "kl"
    ce_weight: float = 0.0
    temperature: float = 1.0
    warmup_loss: str | None = None
    warmup_fraction: float = 0.0
    warm_start: str | None = None
    warm_start_tokens: int = 65536
    loss_vocab: int | None = None
    loss_vocab_tokens: int = 65536
    cache_features: bool = False
    feature_dtype: str = "float16"
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    precision: str = "auto"
    dtype: str = "auto"
    device: str | None = None
    strategy: str = "ddp"
    gradient_checkpointing: bool = False
    checkpoint_exits: bool = True
    chunk_size: int = 512
    seed: int = 0
    output_dir: str = "runs/balcony"
    save_every: int = 100
    eval_every: int = 0
    log_every: int = 10
    keep_checkpoints: int = 2
    resume: bool = True
    report_to: list[str] = field(default_factory=list)
    progress: bool = True

    def __post_init__(self) -> None:
        def one_of(name: str, allowed: tuple) -> None:
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {allowed}")

        one_of("recipe", RECIPES)
        one_of("loss", LOSSES)
        one_of("precision", PRECISIONS)
        one_of("dtype", DTYPES)
        one_of("strategy", STRATEGIES)
        if self.device is not None and str(self.device).split(":")[0] not in ("auto", "cuda", "mps", "cpu"):
            raise ValueError(f"device={self.device!r} is not one of ('auto', 'cuda', 'mps', 'cpu') (or 'cuda:N')")
        if self.dtype in ("bfloat16", "float16") and self.recipe != "balcony":
            raise ValueError(f"dtype={self.dtype!r} would train the base in {self.dtype}: recipe={self.recipe!r} trains the base, "
                             "which needs float32 master weights; use dtype=float32 (or auto) with precision=bf16 for a bf16 forward")
        if self.dtype in ("bfloat16", "float16") and self.precision == "fp32":
            raise ValueError(f"dtype={self.dtype!r} with precision='fp32': the float32 exits cannot run on {self.dtype} hidden states "
                             "without autocast; use precision=bf16 (or fp16, or auto), or dtype=float32")
        one_of("warmup_loss", WARMUP_LOSSES)
        one_of("warm_start", (None, "lstsq"))
        one_of("feature_dtype", ("float16", "float32", "bfloat16"))
        for name in ("seq_len", "batch_size", "grad_accum", "chunk_size", "corpus_tokens", "log_every", "keep_checkpoints", "warm_start_tokens",
                     "loss_vocab_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive integer")
        for name in ("save_every", "eval_every", "eval_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}={v!r} must be a non-negative integer")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps={self.max_steps} must be >= 1")
        if not self.epochs > 0:
            raise ValueError(f"epochs={self.epochs} must be > 0")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction={self.warmup_fraction} must be in [0, 1)")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if self.warmup_loss and not self.warmup_fraction:
            raise ValueError(f"warmup_loss={self.warmup_loss!r} needs warmup_fraction > 0")
        if self.warmup_loss and self.recipe != "balcony":
            raise ValueError(f"warmup_loss={self.warmup_loss!r} works with the frozen-base recipe only, not recipe={self.recipe!r}")
        if self.warm_start and (self.recipe != "balcony" or self.exit_kind not in ("decoder", "mlp")):
            raise ValueError(f"warm_start={self.warm_start!r} fits a decoder or MLP exit on a frozen base, not exit_kind={self.exit_kind!r} with recipe={self.recipe!r}")
        if self.loss_vocab is not None:
            if isinstance(self.loss_vocab, bool) or not isinstance(self.loss_vocab, int) or self.loss_vocab < 1:
                raise ValueError(f"loss_vocab={self.loss_vocab!r} must be a positive integer (entries of the vocabulary) or null")
            if self.recipe != "balcony" or self.loss not in ("kl", "reverse_kl", "jsd"):
                raise ValueError(f"loss_vocab={self.loss_vocab} needs a frozen base and a pure distillation loss (kl, reverse_kl, jsd), "
                                 f"not recipe={self.recipe!r} with loss={self.loss!r}: next-token labels may fall outside it")
        if self.cache_features and self.recipe != "balcony":
            raise ValueError(f"cache_features needs a frozen base (recipe 'balcony'), not recipe={self.recipe!r}")
        if self.loss == "kl+ce" and not self.ce_weight > 0:
            self.ce_weight = 1.0
        for r in self.report_to:
            if r not in ("tensorboard", "wandb"):
                raise ValueError(f"report_to entry {r!r} is not one of ('tensorboard', 'wandb')")

    # -- YAML + overrides ---------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> "TrainConfig":
        """Load a YAML config (a path, or the name of a shipped config) and apply overrides."""
        import yaml

        p = Path(path)
        if not p.is_file():
            shipped = CONFIG_DIR / f"{path}.yaml"
            if not shipped.is_file():
                names = sorted(f.stem for f in CONFIG_DIR.glob("*.yaml"))
                raise FileNotFoundError(f"config {str(path)!r} is neither a file nor a shipped config ({', '.join(names)})")
            p = shipped
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{p} must hold a mapping of TrainConfig fields, got {type(data).__name__}")
        return cls.from_dict({**data, **(overrides or {})}, source=str(p))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown training options {unknown}; known: {', '.join(sorted(known))}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["lr=1e-4", "exit_layers=[4,8]"]`` -> {"lr": 0.0001, "exit_layers": [4, 8]} (values parsed as YAML)."""
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not KEY=VALUE (e.g. lr=1e-4)")
        key, value = item.split("=", 1)
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        out[key.strip().replace("-", "_")] = parsed
    return out


def _split_overrides(text: str) -> list[str]:
    """Split "a=1,b=[1,2],c=x" on commas that are not inside brackets."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{("
        depth -= ch in "]})"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return [p.strip() for p in parts if p.strip()]
