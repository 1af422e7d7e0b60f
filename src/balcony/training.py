"""Where exits are trained: self-distillation of the Balcony exits, on Accelerate.

One frozen pass of the base per batch yields the teacher's final state and the
hidden state at every exit; each exit's loss flows only into its own module. The
LM head is applied inside the loss a chunk of tokens at a time, so no
(batch x seq x vocab) tensor is held for all exits.

Three things make training cheap per token on a small machine, all optional:
- ``cache_features``: run the frozen pass once and reuse it every epoch
  (`balcony.features`), so later epochs do exit-only work;
- ``warmup_loss="logit_mse"``: a first phase that matches the exits' centred
  logits through the head's Gram matrix (H^2 per token instead of V x H), before
  the KL phase refines the full distribution;
- ``warm_start="lstsq"``: before step 0, fit each exit's MLP output projection in
  closed form so the exit starts near the final hidden state (`balcony.warmstart`).
The paper's recipe (KL only, no caching) stays available as ``recipe: paper``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .cli import command
from .config import BalconyConfig
from .data import DataConfig, PackedData, batches_per_epoch, epoch_order, prepare_data
from .features import FeatureCache, build_feature_cache
from .loading import DEFAULT_EXITS, DEFAULT_MODEL, cache_dir, default_exit_layers, is_default, load_base
from .losses import centered_gram, logit_mse_loss, multi_exit_distill_loss
from .metrics import distill_metrics
from .model import BalconyModel

RECIPES = ("balcony", "unfrozen", "sorted", "pretrain")
LOSSES = ("kl", "kl+ce", "ce", "reverse_kl", "jsd")
PRECISIONS = ("fp32", "bf16", "fp16", "auto")
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
            sub-model and the full model).
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
            in closed form to the final hidden state (`balcony.warmstart`), on up to
            `warm_start_tokens` cached tokens.
        warm_start_tokens: Tokens the lstsq fit reads.
        loss_vocab: None (the whole vocabulary) or k: distil over the k vocabulary entries that
            carry the most teacher probability on the first `loss_vocab_tokens` training tokens,
            the teacher renormalised over them (`balcony.losses.teacher_vocab`). The head's
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
        precision: fp32 | bf16 | fp16 | auto (bf16 where the device supports it, else fp32).
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
    precision: str = "fp32"
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


# -- model and data set-up ---------------------------------------------------


def build_training_model(cfg: TrainConfig) -> tuple[BalconyModel, Any]:
    """Base + exits as the recipe asks, with the right parameters trainable."""
    base, tok = load_base(cfg.model)
    if cfg.recipe == "pretrain":
        # Same architecture, fresh weights: pretraining the dynamic model from scratch.
        torch.manual_seed(cfg.seed)
        fresh = type(base)(base.config)
        fresh.config._name_or_path = f"{base.config._name_or_path} (from scratch)"
        base = fresh.eval()
    if cfg.exits_from:
        model = BalconyModel.from_pretrained(base, cfg.exits_from)
        for j in cfg.exit_layers or []:
            if j not in model.config.exit_layers:
                model.add_exit(j)
    else:
        n = base.config.num_hidden_layers
        layers = cfg.exit_layers or (DEFAULT_EXITS[DEFAULT_MODEL] if is_default(cfg.model) else default_exit_layers(n))
        kind = "norm" if cfg.recipe == "sorted" else cfg.exit_kind
        torch.manual_seed(cfg.seed)
        model = BalconyModel(base, BalconyConfig(exit_layers=list(layers), exit_kind=kind, init=cfg.init, budget_names=cfg.budget_names))
    if cfg.recipe == "sorted":
        # No exit modules: every exit reads through the base's own (shared, trained) final norm.
        for j in model.config.exit_layers:
            model.exits[str(j)].norm = model.parts.norm
    if cfg.recipe in ("unfrozen", "sorted", "pretrain"):
        model.unfreeze_base()
    if cfg.train_exits:
        for j in cfg.train_exits:
            model.resolve_exit(j)
            if j not in model.config.exit_layers:
                raise ValueError(f"train_exits has {j}, which is not an exit: exits are {model.config.exit_layers}")
        for j in model.config.exit_layers:
            if j not in cfg.train_exits:
                model.exits[str(j)].requires_grad_(False)
    model.checkpoint_exits = cfg.checkpoint_exits
    if cfg.gradient_checkpointing:
        if model.base_trainable:
            model.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for ex in model.exits.values():
            if ex.layer is not None and hasattr(ex.layer, "gradient_checkpointing"):
                ex.layer.gradient_checkpointing = True
    return model, tok


def load_training_data(cfg: TrainConfig, tok, model: BalconyModel) -> tuple[PackedData, PackedData | None]:
    """Train/held-out rows from `cfg.dataset`, or the generated default corpus."""
    dataset = cfg.dataset
    if dataset is None:
        from .corpus import generated_corpus

        dataset = str(generated_corpus(model, tok, num_tokens=cfg.corpus_tokens, seed=cfg.seed, progress=cfg.progress))
    data_cfg = DataConfig(
        dataset=dataset,
        config_name=cfg.dataset_config,
        split=cfg.split,
        text_field=cfg.text_field,
        messages_field=cfg.messages_field,
        streaming=cfg.streaming,
        seq_len=cfg.seq_len,
        max_tokens=None if cfg.max_tokens is None else cfg.max_tokens + cfg.eval_tokens,
        eval_tokens=cfg.eval_tokens or None,
        seed=cfg.seed,
    )
    max_pos = getattr(model.base.config, "max_position_embeddings", None)
    # One cache file per (dataset, seq_len); prepare_data rebuilds it when the fingerprint changes.
    key = hashlib.sha256(f"{Path(dataset).resolve() if Path(dataset).exists() else dataset}|{cfg.seq_len}|{cfg.text_field}".encode()).hexdigest()[:16]
    cache = cache_dir() / "tokenized" / f"{key}.safetensors"
    train, held_out = prepare_data(data_cfg, tok, max_positions=max_pos, cache_path=cache)
    if len(train) == 0:
        raise ValueError(f"dataset {dataset!r} gave no training rows of {cfg.seq_len} tokens")
    return train, held_out


# -- the objective --------------------------------------------------------------


class DistillObjective(nn.Module):
    """The training loss as a module, so Accelerate/DDP can wrap it.

    ``forward(batch)`` returns ``(loss, per_exit)``: the sum over trained exits of the
    configured loss (mean over tokens), and each exit's value for logging.
    """

    def __init__(self, model: BalconyModel, cfg: TrainConfig):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.exits = [j for j in model.config.exit_layers if any(p.requires_grad for p in model.exits[str(j)].parameters()) or model.base_trainable]
        if not self.exits:
            raise ValueError("no exit has trainable parameters: check train_exits and the recipe")
        self.register_buffer("gram", centered_gram(model.parts.lm_head.weight), persistent=False)
        self.loss_head: nn.Linear | None = None

    def set_loss_vocab(self, indices: torch.Tensor | None) -> None:
        """Distil over these vocabulary entries only (None: the whole vocabulary again)."""
        if indices is None:
            self.loss_head = None
            return
        weight = self.model.parts.lm_head.weight
        head = nn.Linear(weight.shape[1], len(indices), bias=False, device=weight.device, dtype=weight.dtype)
        head.weight.data = weight.detach()[indices.to(weight.device)]  # indexing copies the rows
        self.loss_head = head.requires_grad_(False)

    def _loss_kwargs(self) -> dict:
        cfg = self.cfg
        kind = {"kl+ce": "kl"}.get(cfg.loss, cfg.loss)
        return {"kind": kind, "temperature": cfg.temperature, "ce_weight": cfg.ce_weight if cfg.loss == "kl+ce" else 0.0}

    def forward(self, batch: dict, phase: str = "main") -> tuple[torch.Tensor, torch.Tensor]:
        model, cfg = self.model, self.cfg
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        if "taps" in batch:  # cached frozen pass: run the exits only
            exit_h = model.run_exits({j: batch["taps"][j] for j in self.exits}, mask, batch["position_ids"])
            teacher = batch["teacher"]
        else:
            out = model.distill_forward(ids, mask, batch.get("position_ids"), exits=self.exits)
            exit_h, teacher = out.exit_hidden, out.teacher_hidden
        token_mask = None if mask is None else mask.bool()
        if phase == "warmup":
            per = torch.stack([logit_mse_loss(exit_h[j], teacher, self.gram, token_mask) for j in self.exits])
            return per.sum(), per.detach()
        labels = None
        if cfg.loss in ("ce", "kl+ce") or cfg.recipe in ("unfrozen", "sorted", "pretrain"):
            labels = torch.full_like(ids, -100)
            labels[:, :-1] = batch.get("labels", ids)[:, 1:]  # position t predicts token t + 1
        hidden = [exit_h[j] for j in self.exits]
        kwargs = self._loss_kwargs()
        if cfg.recipe in ("sorted", "pretrain"):
            kwargs = {"kind": "ce"}
        head = self.loss_head if self.loss_head is not None else model.parts.lm_head
        total, per = multi_exit_distill_loss(hidden, teacher, head, labels, mask=token_mask, chunk_size=cfg.chunk_size, **kwargs)
        if model.base_trainable:
            # The full model is trained too: its own LM loss keeps it a language model.
            full, _ = multi_exit_distill_loss([teacher], None, model.parts.lm_head, labels, mask=token_mask, chunk_size=cfg.chunk_size, kind="ce")
            total = total + full
            if cfg.recipe == "pretrain":  # mean over every sub-model and the full model
                total = total / (len(hidden) + 1)
        return total, per


# -- checkpoints ------------------------------------------------------------------


def _rng_state() -> dict:
    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete ``checkpoint-<step>`` directory, or None."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    done = [p for p in root.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def save_checkpoint(path: Path, model: BalconyModel, optimizer, scheduler, state: dict) -> None:
    """Exit weights (or the whole model when it trains), optimizer, scheduler, RNG and data position.

    Written to a temporary directory and renamed, so a kill mid-save never leaves a
    checkpoint that looks complete.
    """
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    if model.base_trainable:
        model.base.save_pretrained(tmp / "base")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state()}, tmp / "optimizer.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def load_checkpoint(path: Path, model: BalconyModel, optimizer, scheduler) -> dict:
    from .config import BalconyConfig

    saved = BalconyConfig.load(path)
    if saved.exit_layers != model.config.exit_layers:
        raise ValueError(f"checkpoint {path} has exits {saved.exit_layers}, this run has {model.config.exit_layers}: use another output_dir or resume=false")
    model.load_exits(path)
    if model.base_trainable and (path / "base").is_dir():
        from safetensors.torch import load_file

        state = {}
        for f in sorted((path / "base").glob("*.safetensors")):
            state.update(load_file(f))
        model.base.load_state_dict(state, strict=False)
    blob = torch.load(path / "optimizer.pt", weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    _set_rng_state(blob["rng"])
    return json.loads((path / "trainer_state.json").read_text())


# -- logging -------------------------------------------------------------------------


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


# -- the loop ----------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What `train` returns: where the exits are and how they scored."""

    output_dir: str
    steps: int
    tokens: int
    seconds: float
    tokens_per_second: float
    before: dict[int, dict[str, float]]
    after: dict[int, dict[str, float]]


def _metrics_table(before: dict, after: dict, model: BalconyModel) -> str:
    lines = [f"{'budget':<7}{'layer':>6}  {'KL before':>10}{'KL after':>10}  {'agree before':>13}{'agree after':>12}"]
    for j in sorted(after):
        name = next((n for n, l in model.budgets.items() if l == j), str(j))
        b = before.get(j, {})
        lines.append(
            f"{name:<7}{j:>6}  {b.get('kl', float('nan')):>10.3f}{after[j]['kl']:>10.3f}  "
            f"{b.get('agreement', float('nan')):>13.3f}{after[j]['agreement']:>12.3f}"
        )
    return "\n".join(lines)


def train(cfg: TrainConfig) -> TrainResult:
    """Train Balcony exits as `cfg` says; resumable, multi-process through Accelerate.

    Example:
        >>> result = train(TrainConfig.from_yaml("smollm2-quick"))  # doctest: +SKIP
        >>> result.after[14]["agreement"]  # doctest: +SKIP
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    # Without a GPU, cpu=True lets Accelerate see a torchrun-style launch as multi-process CPU training (gloo).
    accelerator = Accelerator(mixed_precision={"fp32": "no"}.get(precision, precision), gradient_accumulation_steps=cfg.grad_accum,
                              cpu=not torch.cuda.is_available())
    main = accelerator.is_main_process
    set_seed(cfg.seed)
    out_dir = Path(cfg.output_dir)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    model, tok = build_training_model(cfg)
    model.to(accelerator.device)
    train_rows, eval_rows = load_training_data(cfg, tok, model)
    if cfg.max_tokens is not None:
        keep = max(1, cfg.max_tokens // cfg.seq_len)
        train_rows = train_rows._rows(slice(0, keep))
    # Each process trains on its own interleaved share of the rows.
    if accelerator.num_processes > 1:
        idx = torch.arange(accelerator.process_index, len(train_rows), accelerator.num_processes)
        train_rows = PackedData(train_rows.input_ids[idx], train_rows.position_ids[idx],
                                None if train_rows.attention_mask is None else train_rows.attention_mask[idx])
    per_epoch = batches_per_epoch(train_rows, cfg.batch_size)
    if per_epoch == 0:
        raise ValueError(f"{len(train_rows)} training rows of {cfg.seq_len} tokens are fewer than batch_size={cfg.batch_size}")
    steps_per_epoch = max(1, per_epoch // cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup_steps = int(cfg.warmup_fraction * total_steps) if cfg.warmup_loss else 0

    objective = DistillObjective(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    state = {"step": 0, "micro_step": 0, "epoch": 0, "batch_in_epoch": 0, "tokens": 0, "seconds": 0.0}
    ckpt = latest_checkpoint(out_dir) if cfg.resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer, scheduler)
        if main:
            print(f"[balcony] resuming from {ckpt} (step {state['step']} of {total_steps})")
    objective, optimizer, scheduler = accelerator.prepare(objective, optimizer, scheduler)

    compute_dtype = next(model.base.parameters()).dtype
    eval_features: FeatureCache | None = None
    if cfg.cache_features and eval_rows is not None and main:
        # The base is frozen, so every evaluation would rerun the same held-out frozen pass (a quarter
        # of its time on the embedded model): run it once, in float32 so the metrics stay exact.
        eval_features = build_feature_cache(model, eval_rows, batch_size=cfg.batch_size, dtype=torch.float32, progress=False)

    def eval_batches():
        for s in range(0, len(eval_rows), cfg.batch_size):
            rows = slice(s, s + cfg.batch_size)
            batch = eval_rows[rows] if eval_features is None else eval_features.batch(rows, compute_dtype)
            yield _to_device(batch, accelerator.device)

    def evaluate() -> dict[int, dict[str, float]]:
        if eval_rows is None or len(eval_rows) == 0:
            return {}
        was = model.training
        model.eval()
        res = distill_metrics(model, eval_batches(), chunk_size=cfg.chunk_size)
        model.train(was)
        return res

    logger = RunLogger(out_dir, cfg.report_to, cfg.to_dict(), enabled=main)
    before = state.get("before") or (evaluate() if main else {})
    state["before"] = {str(k): v for k, v in before.items()}
    before = {int(k): v for k, v in state["before"].items()}
    if main and before:
        logger.log({"step": state["step"], "event": "eval", **{f"kl/{j}": m["kl"] for j, m in before.items()},
                    **{f"agreement/{j}": m["agreement"] for j, m in before.items()}})

    features: FeatureCache | None = None
    if cfg.cache_features:
        features = build_feature_cache(model, train_rows, batch_size=cfg.batch_size, dtype=getattr(torch, cfg.feature_dtype), progress=cfg.progress and main)
    fit = cfg.warm_start and state["step"] == 0
    pick = cfg.loss_vocab is not None and "loss_vocab" not in state and cfg.loss_vocab < model.parts.lm_head.weight.shape[0]
    start_features = features
    if start_features is None and (fit or pick):  # one small frozen pass for the warm start and the loss vocabulary
        tokens = max(cfg.warm_start_tokens if fit else 0, cfg.loss_vocab_tokens if pick else 0)
        keep = max(1, min(len(train_rows), tokens // cfg.seq_len))
        start_features = build_feature_cache(model, train_rows._rows(slice(0, keep)), batch_size=cfg.batch_size,
                                             dtype=getattr(torch, cfg.feature_dtype), progress=False)
    if fit:
        _lstsq_warm_start(model, cfg, start_features, objective_exits(objective), accelerator, logger)
    if cfg.loss_vocab is not None:
        _set_loss_vocab(getattr(objective, "module", objective), cfg, start_features, train_rows, state, accelerator, logger)

    bar = None
    if cfg.progress and main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=state["step"], desc="training exits", unit="step")
    model.train()
    t_start = time.perf_counter() - state["seconds"]
    interrupted = False
    try:
        while state["step"] < total_steps:
            exhausted = True
            for batch, rows in _with_rows(train_rows, cfg, state):
                if features is not None:
                    batch = features.batch(rows, compute_dtype)
                batch = _to_device(batch, accelerator.device)
                phase = "warmup" if state["step"] < warmup_steps else "main"
                with accelerator.accumulate(objective):
                    loss, per_exit = objective(batch, phase=phase)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                state["batch_in_epoch"] += 1
                state["micro_step"] += 1
                state["tokens"] += int(batch["input_ids"].numel()) * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue
                state["step"] += 1
                state["seconds"] = time.perf_counter() - t_start
                per = {f"{phase}/{j}": float(v) for j, v in zip(objective_exits(objective), per_exit.tolist())}
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({str(j): f"{float(v):.3f}" for j, v in zip(objective_exits(objective), per_exit.tolist())}, refresh=False)
                if main and (state["step"] % cfg.log_every == 0 or state["step"] == total_steps):
                    logger.log({"step": state["step"], "loss": float(loss.detach()), "lr": scheduler.get_last_lr()[0], "tokens": state["tokens"],
                                "tokens_per_s": state["tokens"] / max(state["seconds"], 1e-9), "phase": phase, **per})
                if cfg.eval_every and state["step"] % cfg.eval_every == 0 and main:
                    res = evaluate()
                    logger.log({"step": state["step"], "event": "eval", **{f"kl/{j}": m["kl"] for j, m in res.items()},
                                **{f"agreement/{j}": m["agreement"] for j, m in res.items()}})
                if cfg.save_every and state["step"] % cfg.save_every == 0 and state["step"] < total_steps:
                    _checkpoint(accelerator, out_dir, model, optimizer, scheduler, state, cfg.keep_checkpoints)
                if state["step"] >= total_steps:
                    exhausted = False
                    break
            if exhausted:
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
    except KeyboardInterrupt:
        interrupted = True
        _checkpoint(accelerator, out_dir, model, optimizer, scheduler, state, cfg.keep_checkpoints)
        if main:
            print(f"\n[balcony] interrupted: checkpoint saved at step {state['step']}; run the same command to resume")
        raise
    finally:
        if bar is not None:
            bar.close()
        if interrupted:
            logger.close()

    accelerator.wait_for_everyone()
    seconds = time.perf_counter() - t_start
    after = evaluate() if main else {}
    if main:
        model.save_pretrained(out_dir)
        if model.base_trainable:
            model.base.save_pretrained(out_dir / "base")
            tok.save_pretrained(out_dir / "base")
        summary = {"step": state["step"], "event": "done", "tokens": state["tokens"], "seconds": seconds,
                   "before": {str(k): v for k, v in before.items()}, "after": {str(k): v for k, v in after.items()}}
        logger.log(summary)
        (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
        if after:
            print(_metrics_table(before, after, model))
        print(f"[balcony] exits saved to {out_dir} ({state['tokens']:,} tokens, {seconds:.0f} s, {state['tokens'] / max(seconds, 1e-9):.0f} tok/s)")
    logger.close()
    return TrainResult(str(out_dir), state["step"], state["tokens"], seconds, state["tokens"] / max(seconds, 1e-9), before, after)


def objective_exits(objective) -> list[int]:
    return getattr(objective, "module", objective).exits


def _lstsq_warm_start(model: BalconyModel, cfg: TrainConfig, features: FeatureCache, exits: list[int],
                      accelerator, logger: "RunLogger") -> None:
    """The closed-form warm start before step 0; every process ends with rank 0's fit."""
    from accelerate.utils import broadcast

    from .warmstart import MLP_OUT, lstsq_warm_start

    t = time.perf_counter()
    r2 = lstsq_warm_start(model, features, exits, max_tokens=cfg.warm_start_tokens, batch_size=cfg.batch_size)
    if accelerator.num_processes > 1:
        for j in exits:
            w = model.exits[str(j)].layer.get_submodule(MLP_OUT).weight
            w.data.copy_(broadcast(w.data.contiguous(), from_process=0))
    if accelerator.is_main_process:
        logger.log({"step": 0, "event": "warm_start", "seconds": time.perf_counter() - t, **{f"r2/{j}": v for j, v in r2.items()}})
        if cfg.progress:
            print("[balcony] lstsq warm start, R² per exit: " + ", ".join(f"{j}: {v:.3f}" for j, v in r2.items()))


def _set_loss_vocab(objective: DistillObjective, cfg: TrainConfig, features: FeatureCache | None, rows: PackedData, state: dict,
                    accelerator, logger: "RunLogger") -> None:
    """Choose the loss vocabulary once (rank 0's choice on every process); a resume reads it from the checkpoint."""
    from accelerate.utils import broadcast

    from .losses import teacher_vocab

    model = objective.model
    weight = model.parts.lm_head.weight
    if cfg.loss_vocab >= weight.shape[0]:  # e.g. a shipped config on a small-vocabulary model: nothing to cut
        if accelerator.is_main_process:
            logger.log({"step": state["step"], "event": "loss_vocab", "entries": weight.shape[0], "coverage": 1.0, "seconds": 0.0})
            if cfg.progress:
                print(f"[balcony] loss_vocab={cfg.loss_vocab} >= the model's {weight.shape[0]} vocabulary entries: distilling over all of them")
        return
    if "loss_vocab" in state:
        objective.set_loss_vocab(torch.tensor(state["loss_vocab"], dtype=torch.long))
        return
    t = time.perf_counter()
    keep = max(1, min(len(features), cfg.loss_vocab_tokens // cfg.seq_len))
    mask = None if rows.attention_mask is None else rows.attention_mask[:keep].to(weight.device)
    indices, coverage = teacher_vocab(weight, features.teacher[:keep].to(weight.device), cfg.loss_vocab, mask=mask, chunk_size=cfg.chunk_size)
    if accelerator.num_processes > 1:
        indices = broadcast(indices.contiguous(), from_process=0)
    objective.set_loss_vocab(indices)
    state["loss_vocab"] = indices.tolist()
    if accelerator.is_main_process:
        logger.log({"step": state["step"], "event": "loss_vocab", "entries": len(indices), "coverage": coverage,
                    "seconds": time.perf_counter() - t})
        if cfg.progress:
            print(f"[balcony] distilling over the {len(indices)} vocabulary entries that hold {100 * coverage:.1f}% "
                  f"of the teacher's probability on {keep * cfg.seq_len:,} training tokens")


def _with_rows(rows: PackedData, cfg: TrainConfig, state: dict):
    """The rest of this epoch's batches, each with its row indices (the feature cache indexes by row)."""
    order = epoch_order(len(rows), seed=cfg.seed, epoch=state["epoch"])
    for k in range(state["batch_in_epoch"], batches_per_epoch(rows, cfg.batch_size)):
        idx = order[k * cfg.batch_size : (k + 1) * cfg.batch_size]
        yield rows[idx], idx


def _to_device(batch: dict, device) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, dict):
            out[k] = {j: t.to(device) for j, t in v.items()}
        else:
            out[k] = v.to(device)
    return out


def _checkpoint(accelerator, out_dir: Path, model, optimizer, scheduler, state, keep: int) -> None:
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    save_checkpoint(out_dir / f"checkpoint-{state['step']}", model, optimizer, scheduler, state)
    old = sorted((p for p in out_dir.glob("checkpoint-*") if not p.name.endswith(".tmp")), key=lambda p: int(p.name.split("-")[1]))
    for p in old[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


@command
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


# `balcony train` (the function is named train_command to keep `train` the Python API).
from .cli import COMMANDS as _COMMANDS  # noqa: E402

_COMMANDS["train"] = _COMMANDS.pop("train-command")
