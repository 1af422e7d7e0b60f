"""The training loss as a module (so Accelerate/DDP can wrap it): every trained exit's distillation loss from one frozen pass."""

from __future__ import annotations

import torch
from torch import nn

from ..modeling.model import BalconyModel
from .chunked import multi_exit_distill_loss
from .config import TrainConfig
from .losses import centered_gram, logit_mse_loss


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
        # The logit-MSE warm-up's (H, H) matrix, only when that loss is used; a plain attribute, not a buffer:
        # it is a constant that every rank computes alike, so DDP must neither broadcast nor checkpoint it.
        self.gram = centered_gram(model.parts.lm_head.weight) if cfg.warmup_loss == "logit_mse" else None
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
            if self.gram is None:  # a caller that runs the warm-up phase without configuring it: build it now
                self.gram = centered_gram(model.parts.lm_head.weight)
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
