"""What runs once before step 0: the closed-form warm start and the loss vocabulary, rank 0's result on every rank."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from ..modeling.model import BalconyModel
from .config import TrainConfig
from .features import FeatureCache
from .objective import DistillObjective
from .packing import PackedData

if TYPE_CHECKING:
    from .run_log import RunLogger


def lstsq_warm_start_all_ranks(model: BalconyModel, cfg: TrainConfig, features: FeatureCache, exits: list[int],
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


def set_loss_vocab_all_ranks(objective: DistillObjective, cfg: TrainConfig, features: FeatureCache | None, rows: PackedData, state: dict,
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
