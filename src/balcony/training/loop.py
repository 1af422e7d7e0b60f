"""Where exits are trained: self-distillation of the Balcony exits, on one process or several (Accelerate).

One frozen pass of the base per batch yields the teacher's final state and the
hidden state at every exit; each exit's loss flows only into its own module
(`balcony.training.objective`). The LM head is applied inside the loss a chunk of
tokens at a time (`balcony.training.chunked`), so no (batch x seq x vocab)
tensor is held for all exits.

On P processes the run is the same computation as one process with P times the batch
(`balcony.training.distributed`): rank 0 prepares the data while the others wait, every
rank runs the same number of micro-batches, gradients are accumulated by hand (DDP's
all-reduce only on the last micro-batch of a window) and the learning-rate schedule is
stepped once per optimizer step, so the LR is one function of the global step.

Three things make training cheap per token on a small machine, all optional:
- ``cache_features``: run the frozen pass once and reuse it every epoch
  (`balcony.training.features`), so later epochs do exit-only work;
- ``warmup_loss="logit_mse"``: a first phase that matches the exits' centred
  logits through the head's Gram matrix (H^2 per token instead of V x H);
- ``warm_start="lstsq"``: before step 0, fit each exit's MLP output projection in
  closed form so the exit starts near the final hidden state (`balcony.training.warmstart`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..modeling.model import BalconyModel
from .build import build_training_model, load_training_data
from .checkpoint import _checkpoint, latest_checkpoint, read_checkpoint, write_exits
from .config import TrainConfig
from .data import epoch_order
from .distributed import (
    fingerprint_rows,
    ignore_frozen_in_ddp,
    make_accelerator,
    micro_batches_per_epoch,
    peak_memory,
    rank_rows,
    resolve_device,
    resolve_precision,
    rng_state,
    same_on_every_rank,
)
from .evaluate import distill_metrics
from .features import FeatureCache, build_feature_cache
from .objective import DistillObjective
from .prelude import lstsq_warm_start_all_ranks, set_loss_vocab_all_ranks
from .run_log import RunLogger
from .sharding import check_fsdp, full_exit_state, load_optimizer_state, shard

__all__ = ["TrainResult", "build_training_model", "load_training_data", "train"]


@dataclass
class TrainResult:
    """What `train` returns: where the exits are and how they scored.

    ``seconds`` and ``tokens_per_second`` count training only (evaluations and checkpoints
    excluded); ``peak_mem_gb`` is CUDA's peak allocated memory on a GPU, else the process's peak RSS.
    """

    output_dir: str
    steps: int
    tokens: int
    seconds: float
    tokens_per_second: float
    before: dict[int, dict[str, float]]
    after: dict[int, dict[str, float]]
    peak_mem_gb: float = 0.0


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
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    device = resolve_device(cfg)
    precision, dtype = resolve_precision(cfg, device)
    accelerator = make_accelerator(cfg, device, precision)
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    fsdp = cfg.strategy == "fsdp"
    if fsdp:
        check_fsdp(cfg, world, precision)
    set_seed(cfg.seed)
    out_dir = Path(cfg.output_dir)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    model, tok = build_training_model(cfg, dtype=dtype, device=accelerator.device)
    model.to(accelerator.device)
    with accelerator.main_process_first():  # rank 0 generates / tokenises / caches; the others then read its files
        train_rows, eval_rows = load_training_data(cfg, tok, model)
    same_on_every_rank(accelerator, "the training rows (count, hash)", [len(train_rows), fingerprint_rows(train_rows.input_ids)])
    per_epoch = micro_batches_per_epoch(len(train_rows), cfg.batch_size, world)
    if per_epoch == 0:
        raise ValueError(f"{len(train_rows)} training rows of {cfg.seq_len} tokens are fewer than one global micro-batch: "
                         f"batch_size={cfg.batch_size} x {world} process(es)")
    steps_per_epoch = max(1, per_epoch // cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup_steps = int(cfg.warmup_fraction * total_steps) if cfg.warmup_loss else 0

    objective = DistillObjective(model, cfg)
    state = {"step": 0, "micro_step": 0, "epoch": 0, "batch_in_epoch": 0, "tokens": 0, "seconds": 0.0}
    ckpt = latest_checkpoint(out_dir) if cfg.resume else None
    saved = None
    if ckpt is not None:  # weights and RNG now; optimizer and scheduler once they exist (after sharding, under FSDP)
        state, saved = read_checkpoint(ckpt, model, rank=rank)
        if main:
            print(f"[balcony] resuming from {ckpt} (step {state['step']} of {total_steps})")

    compute_dtype = next(model.base.parameters()).dtype
    eval_features: FeatureCache | None = None
    sharded = False  # the model is sharded (FSDP) only after the steps below, which need it whole on every rank
    if cfg.cache_features and eval_rows is not None and (main or fsdp):
        # The base is frozen, so every evaluation would rerun the same held-out frozen pass (a quarter
        # of its time on the embedded model): run it once, in float32 so the metrics stay exact.
        eval_features = build_feature_cache(model, eval_rows, batch_size=cfg.batch_size, dtype=torch.float32, progress=False)

    def eval_batches():
        for s in range(0, len(eval_rows), cfg.batch_size):
            rows = slice(s, s + cfg.batch_size)
            batch = eval_rows[rows] if eval_features is None else eval_features.batch(rows, compute_dtype)
            yield _to_device(batch, accelerator.device)

    def evaluate() -> dict[int, dict[str, float]]:
        """Rank 0 scores the held-out rows (under the run's autocast); the other ranks wait for it.

        Sharded (FSDP), every rank runs the same evaluation: each layer's forward gathers its weights from all ranks.
        """
        res = {}
        if (main or sharded) and eval_rows is not None and len(eval_rows) > 0:
            was = model.training
            model.eval()
            with accelerator.autocast():
                res = distill_metrics(model, eval_batches(), chunk_size=cfg.chunk_size)
            model.train(was)
        accelerator.wait_for_everyone()
        return res

    logger = RunLogger(out_dir, cfg.report_to, cfg.to_dict(), enabled=main)
    before = state.get("before") or evaluate()
    state["before"] = {str(k): v for k, v in before.items()}
    before = {int(k): v for k, v in state["before"].items()}
    if main and before:
        logger.log({"step": state["step"], "event": "eval", **{f"kl/{j}": m["kl"] for j, m in before.items()},
                    **{f"agreement/{j}": m["agreement"] for j, m in before.items()}})

    features: FeatureCache | None = None
    if cfg.cache_features:
        # Every rank caches every row: micro-batches are slices of one global row order (see distributed.rank_rows).
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
        lstsq_warm_start_all_ranks(model, cfg, start_features, objective_exits(objective), accelerator, logger)
    if cfg.loss_vocab is not None:
        set_loss_vocab_all_ranks(objective, cfg, start_features, train_rows, state, accelerator, logger)
    del start_features

    if fsdp:
        shard(objective, model, accelerator.device, world)
        sharded = True
    params = [p for p in model.parameters() if p.requires_grad]  # (after sharding: FSDP's DTensor shards)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    # Not handed to accelerator.prepare, which would step it once per process per optimizer step.
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    if saved is not None:
        if (saved.get("optimizer_keys", "ids") == "names") != fsdp:
            raise ValueError(f"checkpoint {ckpt} was written with strategy={'fsdp' if not fsdp else 'ddp'}; resume it with that strategy")
        if fsdp:
            load_optimizer_state(model, optimizer, saved["optimizer"])
        else:
            optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
    if not fsdp:  # (FSDP reduces the gradients itself; autocast is entered around the forward below)
        if world > 1 and not model.base_trainable:
            ignore_frozen_in_ddp(objective)
        objective, optimizer = accelerator.prepare(objective, optimizer)

    bar = None
    if cfg.progress and main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=state["step"], desc="training exits", unit="step")
    model.train()
    # The state and generators at the start of the accumulation window in progress: what a checkpoint holds.
    window = (copy.deepcopy(state), rng_state())
    window_tokens = 0
    t_mark = time.perf_counter()
    try:
        while state["step"] < total_steps:
            order = epoch_order(len(train_rows), seed=cfg.seed, epoch=state["epoch"])
            for k in range(state["batch_in_epoch"], per_epoch):
                rows = rank_rows(order, k, cfg.batch_size, rank, world)
                batch = train_rows[rows] if features is None else features.batch(rows, compute_dtype)
                batch = _to_device(batch, accelerator.device)
                phase = "warmup" if state["step"] < warmup_steps else "main"
                sync = (state["micro_step"] + 1) % cfg.grad_accum == 0
                # DDP all-reduces gradients only on the window's last micro-batch. FSDP reduce-scatters after every
                # one: skipping it would keep the exits' full, unsharded gradients between micro-batches.
                with contextlib.nullcontext() if sync or fsdp else accelerator.no_sync(objective):
                    with accelerator.autocast():
                        loss, per_exit = objective(batch, phase=phase)
                    accelerator.backward(loss / cfg.grad_accum)
                state["batch_in_epoch"] = k + 1
                state["micro_step"] += 1
                mask = batch.get("attention_mask")
                window_tokens += int(batch["input_ids"].numel() if mask is None else mask.sum())
                if not sync:
                    continue
                if cfg.max_grad_norm > 0:
                    if fsdp:  # DTensor gradients: torch's clipping computes the global norm across the shards
                        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    else:
                        accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                lr = scheduler.get_last_lr()[0]  # the LR this step applies
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["step"] += 1
                state["tokens"] += _global_count(accelerator, window_tokens)
                window_tokens = 0
                now = time.perf_counter()
                state["seconds"] += now - t_mark
                t_mark = now
                window = (copy.deepcopy(state), rng_state())
                if bar is not None:
                    bar.update(1)
                if main and (state["step"] % cfg.log_every == 0 or state["step"] == total_steps):
                    per = {f"{phase}/{j}": v for j, v in zip(objective_exits(objective), per_exit.tolist())}
                    if bar is not None:
                        bar.set_postfix({name.split("/")[1]: f"{v:.3f}" for name, v in per.items()}, refresh=False)
                    logger.log({"step": state["step"], "loss": float(loss.detach()), "lr": lr, "tokens": state["tokens"],
                                "tokens_per_s": state["tokens"] / max(state["seconds"], 1e-9), "phase": phase,
                                **peak_memory(accelerator.device), **per})
                if cfg.eval_every and state["step"] % cfg.eval_every == 0:
                    res = evaluate()
                    if main:
                        logger.log({"step": state["step"], "event": "eval", **{f"kl/{j}": m["kl"] for j, m in res.items()},
                                    **{f"agreement/{j}": m["agreement"] for j, m in res.items()}})
                if cfg.save_every and state["step"] % cfg.save_every == 0 and state["step"] < total_steps:
                    _checkpoint(accelerator, out_dir, model, optimizer, scheduler, *window, cfg.keep_checkpoints, sharded)
                t_mark = time.perf_counter()  # evaluations and checkpoints are not training time
                if state["step"] >= total_steps:
                    break
            else:  # the epoch ran out (possibly mid-window: windows run on into the next epoch)
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
    except KeyboardInterrupt:
        # One process: save the state at the start of the window in progress (its partial gradients are
        # dropped and recomputed on resume). Several: the ranks may be stopped inside different collectives,
        # so a checkpoint there could hang; the periodic checkpoints are the resume points.
        if world == 1:
            _checkpoint(accelerator, out_dir, model, optimizer, scheduler, *window, cfg.keep_checkpoints)
            print(f"\n[balcony] interrupted: checkpoint saved at step {window[0]['step']}; run the same command to resume")
        logger.close()
        raise
    finally:
        if bar is not None:
            bar.close()

    accelerator.wait_for_everyone()
    after = evaluate()
    memory = peak_memory(accelerator.device)
    exit_state = full_exit_state(model) if sharded else None  # every rank takes part in the gather
    if main:
        write_exits(out_dir, model, exit_state)
        if model.base_trainable:
            model.base.save_pretrained(out_dir / "base")
            tok.save_pretrained(out_dir / "base")
        speed = state["tokens"] / max(state["seconds"], 1e-9)
        summary = {"step": state["step"], "event": "done", "tokens": state["tokens"], "seconds": state["seconds"], "tokens_per_s": speed,
                   "processes": world, "precision": precision, "base_dtype": str(dtype).replace("torch.", ""), **memory,
                   "before": {str(k): v for k, v in before.items()}, "after": {str(k): v for k, v in after.items()}}
        logger.log(summary)
        (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
        if after:
            print(_metrics_table(before, after, model))
        print(f"[balcony] exits saved to {out_dir} ({state['tokens']:,} tokens in {state['seconds']:.0f} s of training, {speed:.0f} tok/s, "
              f"peak memory {memory['peak_mem_gb']:.2f} GB ({memory['mem_kind']}))")
    accelerator.wait_for_everyone()  # no rank leaves before the exits are on disk
    logger.close()
    return TrainResult(str(out_dir), state["step"], state["tokens"], state["seconds"], state["tokens"] / max(state["seconds"], 1e-9),
                       before, after, memory["peak_mem_gb"])


def objective_exits(objective) -> list[int]:
    return getattr(objective, "module", objective).exits


def _global_count(accelerator, local: int) -> int:
    """`local` summed over the processes (padding can make their token counts differ)."""
    if accelerator.num_processes == 1:
        return local
    return int(accelerator.reduce(torch.tensor(local, device=accelerator.device), reduction="sum"))


def _to_device(batch: dict, device) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, dict):
            out[k] = {j: t.to(device) for j, t in v.items()}
        else:
            out[k] = v.to(device)
    return out
