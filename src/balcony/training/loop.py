"""Where exits are trained: self-distillation of the Balcony exits, on Accelerate.

One frozen pass of the base per batch yields the teacher's final state and the
hidden state at every exit; each exit's loss flows only into its own module
(`balcony.training.objective`). The LM head is applied inside the loss a chunk of
tokens at a time (`balcony.training.chunked`), so no (batch x seq x vocab)
tensor is held for all exits.

Three things make training cheap per token on a small machine, all optional:
- ``cache_features``: run the frozen pass once and reuse it every epoch
  (`balcony.training.features`), so later epochs do exit-only work;
- ``warmup_loss="logit_mse"``: a first phase that matches the exits' centred
  logits through the head's Gram matrix (H^2 per token instead of V x H);
- ``warm_start="lstsq"``: before step 0, fit each exit's MLP output projection in
  closed form so the exit starts near the final hidden state (`balcony.training.warmstart`).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..modeling.config import BalconyConfig
from ..modeling.loading import (
    DEFAULT_EXITS,
    DEFAULT_MODEL,
    cache_dir,
    default_exit_layers,
    is_default,
    load_base,
)
from ..modeling.model import BalconyModel
from .checkpoint import _checkpoint, latest_checkpoint, load_checkpoint
from .config import TrainConfig
from .data import DataConfig, batches_per_epoch, epoch_order, prepare_data
from .evaluate import distill_metrics
from .features import FeatureCache, build_feature_cache
from .objective import DistillObjective
from .packing import PackedData
from .run_log import RunLogger


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
        model = BalconyModel.from_pretrained(base, cfg.exits_from, is_trainable=True)
        for j in cfg.exit_layers or []:
            if j not in model.config.exit_layers:
                model.add_exit(j)
    else:
        n = base.config.num_hidden_layers
        layers = cfg.exit_layers or (DEFAULT_EXITS[DEFAULT_MODEL] if is_default(cfg.model) else default_exit_layers(n))
        kind = "norm" if cfg.recipe == "sorted" else cfg.exit_kind
        torch.manual_seed(cfg.seed)
        model = BalconyModel(base, BalconyConfig(exit_layers=list(layers), exit_kind=kind, init=cfg.init, budget_names=cfg.budget_names))
    if cfg.recipe == "sorted" or (cfg.recipe == "pretrain" and cfg.exit_kind == "norm"):
        # No exit modules: every exit reads through the base's own (shared, trained) final norm
        # (pretrain + exit_kind norm is Sorted pretraining from scratch, the paper's Table 4 baseline).
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
