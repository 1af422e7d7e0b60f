"""The distillation loss applied to hidden states a chunk of tokens at a time, so logits are never all held.

With a 49k vocabulary, (batch * seq * vocab) logits per exit are the largest tensors in
training, so `chunked_distill_loss` applies the head a chunk of tokens at a time and keeps
only an (N, H) gradient between forward and backward (the "fused linear cross-entropy"
trick); for KL the gradient is written by hand (`_kl_chunk`), with no autograd graph over
the vocabulary. Conventions as in `balcony.training.losses`.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .losses import _check, _counted, count_tokens, distill_loss


class _ChunkedLoss(torch.autograd.Function):
    """Sum of per-chunk losses whose gradient w.r.t. the hidden states is computed in forward.

    ``chunk_fn(h_chunk, start, end)`` returns the chunk's loss and its gradient w.r.t. the
    chunk. Only the (N, H) gradient survives forward, so peak memory is one chunk's logits
    (plus their gradient) instead of all N rows. Valid only when nothing else (e.g. head
    weights) needs gradients.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, chunk_fn, chunk_size: int) -> Tensor:
        grad = torch.empty_like(hidden)
        total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            loss, grad[start:end] = chunk_fn(hidden[start:end].detach(), start, end)
            total = total + loss
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None


def _autograd_chunk(chunk_loss: Callable[[Tensor, int, int], Tensor]):
    """Wrap a differentiable chunk loss as a `_ChunkedLoss` chunk function (loss, grad)."""

    def fn(h: Tensor, start: int, end: int) -> tuple[Tensor, Tensor]:
        h = h.requires_grad_(True)
        with torch.enable_grad():  # forward of a Function runs under no_grad
            loss = chunk_loss(h, start, end)
        (grad,) = torch.autograd.grad(loss, h)
        return loss.detach(), grad

    return fn


def _head_requires_grad(head: Callable[[Tensor], Tensor]) -> bool:
    # A Module, or a bound method of one (e.g. `lm_head.forward`). Plain functions closing over
    # trainable tensors are not detectable: their tensors must be frozen.
    module = head if isinstance(head, nn.Module) else getattr(head, "__self__", None)
    return isinstance(module, nn.Module) and any(p.requires_grad for p in module.parameters())


def chunked_distill_loss(
    student_hidden: Tensor,
    teacher_hidden_or_logits: Tensor | None,
    head: Callable[[Tensor], Tensor],
    labels: Tensor | None = None,
    *,
    mask: Tensor | None = None,
    chunk_size: int = 1024,
    teacher_is_logits: bool = False,
    **loss_kwargs,
) -> Tensor:
    """`distill_loss` on ``head(student_hidden)``, computed ``chunk_size`` tokens at a time.

    Value and gradients (w.r.t. ``student_hidden`` and, if trainable, the head's parameters)
    equal those of ``distill_loss(head(s), head(t), labels, reduction="mean")`` on the whole
    flattened batch, but no more than one chunk of (chunk_size, V) logits is alive at once:

    * head frozen: a custom autograd Function computes each chunk's gradient w.r.t. its hidden
      rows during forward and keeps only that (N, H) tensor (one head pass per chunk);
    * head with trainable parameters (e.g. sorted fine-tuning): `torch.utils.checkpoint` per
      chunk, so backward recomputes each chunk's logits (two head passes per chunk).

    Args:
        student_hidden: (B, T, H) or (N, H) normed exit hidden states.
        teacher_hidden_or_logits: teacher normed final hidden states of the same leading shape
            ((..., H)), or teacher logits ((..., V)) when ``teacher_is_logits``; treated as a
            constant. May be None for ``kind="ce"``.
        head: maps (n, H) -> (n, V), e.g. the LM head. If it is not an nn.Module (or a bound
            method of one), any tensors it closes over must not require grad.
        labels: (B, T) or (N,) next-token ids aligned with the rows, or None.
        mask: optional (B, T) or (N,) bool; False rows do not count.
        chunk_size: tokens per chunk, >= 1.
        teacher_is_logits: whether the teacher tensor already holds logits.
        **loss_kwargs: `distill_loss` options (kind, temperature, ce_weight, kl_weight,
            ignore_index); ``reduction`` may be "mean" (default) or "sum".

    Returns:
        Scalar loss: mean (or sum) over counted tokens.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
    reduction = loss_kwargs.pop("reduction", "mean")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"chunked_distill_loss reduction must be one of ('mean', 'sum'), got {reduction!r}")
    kind, ce_weight = loss_kwargs.get("kind", "kl"), loss_kwargs.get("ce_weight", 0.0)
    _check(kind, reduction, loss_kwargs.get("temperature", 1.0), ce_weight,
           teacher_hidden_or_logits is not None, labels is not None)

    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    teacher = None
    if teacher_hidden_or_logits is not None and kind != "ce":
        teacher = teacher_hidden_or_logits.detach()
        teacher = teacher.reshape(-1, teacher.shape[-1])
        if teacher.shape[0] != hidden.shape[0]:
            raise ValueError(f"teacher has {teacher.shape[0]} tokens, student {hidden.shape[0]}")
    labels = None if labels is None else labels.reshape(-1)
    mask = None if mask is None else mask.reshape(-1)

    def chunk_loss(h: Tensor, start: int, end: int) -> Tensor:
        t = None
        if teacher is not None:
            t = teacher[start:end]
            if not teacher_is_logits:
                with torch.no_grad():
                    t = head(t)
        return distill_loss(
            head(h), t,
            None if labels is None else labels[start:end],
            mask=None if mask is None else mask[start:end],
            reduction="sum", **loss_kwargs,
        )

    n = hidden.shape[0]
    starts = range(0, n, chunk_size)
    if not torch.is_grad_enabled() or not (hidden.requires_grad or _head_requires_grad(head)):
        with torch.no_grad():  # evaluation: nothing to keep
            total = sum((chunk_loss(hidden[s:s + chunk_size], s, min(s + chunk_size, n)) for s in starts),
                        hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32)))
    elif _head_requires_grad(head):
        def ckpt(h: Tensor, s: int) -> Tensor:  # checkpoint stores only h (a view) and s
            return chunk_loss(h, s, min(s + chunk_size, n))
        total = sum((checkpoint(ckpt, hidden[s:s + chunk_size], s, use_reentrant=False) for s in starts),
                    hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32)))
    else:
        total = _ChunkedLoss.apply(hidden, _autograd_chunk(chunk_loss), chunk_size)

    if reduction == "sum":
        return total
    ref = labels if labels is not None else mask
    count = torch.tensor(n, device=hidden.device) if ref is None else count_tokens(labels, loss_kwargs.get("ignore_index", -100), mask=mask)
    return total / count.clamp_min(1)


def multi_exit_distill_loss(
    exit_hidden: list[Tensor],
    teacher_hidden: Tensor | None,
    head: Callable[[Tensor], Tensor],
    labels: Tensor | None = None,
    *,
    mask: Tensor | None = None,
    chunk_size: int = 512,
    weights: list[float] | None = None,
    **loss_kwargs,
) -> tuple[Tensor, Tensor]:
    """`chunked_distill_loss` for several exits at once, sharing the teacher per chunk.

    The teacher's logits are computed once per chunk and reused by every exit, and one
    backward call serves all exits (each exit's gradient still flows only into its own
    hidden state). Memory stays at one chunk of (chunk_size, V) logits per exit.

    Args:
        exit_hidden: E tensors (B, T, H) (or (N, H)), the normed exit states.
        teacher_hidden: (B, T, H) normed final state (None for ``kind="ce"``).
        head: (n, H) -> (n, V), the shared LM head.
        labels, mask, chunk_size, **loss_kwargs: as in `chunked_distill_loss`.
        weights: per-exit loss weights (default 1 each).

    Returns:
        (total, per_exit): the weighted sum of per-exit mean losses (what to backward), and
        an (E,) detached tensor of each exit's mean loss (for logging).

    Example:
        >>> total, per_exit = multi_exit_distill_loss([s1, s2], teacher, lm_head)  # doctest: +SKIP
    """
    if not exit_hidden:
        raise ValueError("multi_exit_distill_loss needs at least one exit hidden state")
    e = len(exit_hidden)
    weights = [1.0] * e if weights is None else list(weights)
    if len(weights) != e:
        raise ValueError(f"weights has {len(weights)} entries for {e} exits")
    h = exit_hidden[0].shape[-1]
    stacked = torch.stack([x.reshape(-1, h) for x in exit_hidden], dim=1)  # (N, E, H)
    kind = loss_kwargs.get("kind", "kl")
    _check(kind, "sum", loss_kwargs.get("temperature", 1.0), loss_kwargs.get("ce_weight", 0.0),
           teacher_hidden is not None, labels is not None)
    teacher = None if teacher_hidden is None or kind == "ce" else teacher_hidden.detach().reshape(-1, h)
    labels = None if labels is None else labels.reshape(-1)
    mask = None if mask is None else mask.reshape(-1)
    per_exit = torch.zeros(e, dtype=torch.float64, device=stacked.device)
    w = torch.tensor(weights, dtype=torch.float32, device=stacked.device)

    def chunk_loss(hs: Tensor, start: int, end: int) -> Tensor:
        t = None
        if teacher is not None:
            with torch.no_grad():
                t = head(teacher[start:end])  # (n, V), shared by every exit
        lab = None if labels is None else labels[start:end]
        msk = None if mask is None else mask[start:end]
        losses = torch.stack([distill_loss(head(hs[:, k]), t, lab, mask=msk, reduction="sum", **loss_kwargs) for k in range(e)])
        per_exit.add_(losses.detach().double())
        return (losses * w.to(losses.dtype)).sum()

    n = stacked.shape[0]
    temperature = loss_kwargs.get("temperature", 1.0)
    ce_weight = loss_kwargs.get("ce_weight", 0.0)
    fast = (
        kind == "kl" and teacher is not None and torch.is_grad_enabled() and stacked.requires_grad
        and isinstance(head, nn.Linear) and head.bias is None and not _head_requires_grad(head)
        and loss_kwargs.get("kl_weight", 1.0) == 1.0
    )
    if fast:
        ignore_index = loss_kwargs.get("ignore_index", -100)

        def manual(hs: Tensor, start: int, end: int) -> tuple[Tensor, Tensor]:
            lab = None if labels is None else labels[start:end]
            msk = None if mask is None else mask[start:end]
            losses, grad = _kl_chunk(hs, teacher[start:end], head.weight, lab, msk, temperature, ce_weight, ignore_index, w)
            per_exit.add_(losses.double())
            return (losses * w.to(losses.dtype)).sum(), grad

        total = _ChunkedLoss.apply(stacked, manual, chunk_size)
    elif torch.is_grad_enabled() and _head_requires_grad(head):
        total = sum(
            (checkpoint(lambda x, s: chunk_loss(x, s, min(s + chunk_size, n)), stacked[s:s + chunk_size], s, use_reentrant=False)
             for s in range(0, n, chunk_size)),
            stacked.new_zeros((), dtype=torch.float32),
        )
        # checkpoint re-runs chunk_loss in backward; per_exit was filled once in forward already
    elif torch.is_grad_enabled() and stacked.requires_grad:
        total = _ChunkedLoss.apply(stacked, _autograd_chunk(chunk_loss), chunk_size)
    else:
        with torch.no_grad():
            total = sum((chunk_loss(stacked[s:s + chunk_size], s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)),
                        stacked.new_zeros((), dtype=torch.float32))
    ref = labels if labels is not None else mask
    count = torch.tensor(n, device=stacked.device) if ref is None else count_tokens(labels, loss_kwargs.get("ignore_index", -100), mask=mask)
    count = count.clamp_min(1)
    return total / count, (per_exit / count).float()


@torch.no_grad()
def _kl_chunk(
    hs: Tensor, teacher_h: Tensor, weight: Tensor, labels: Tensor | None, mask: Tensor | None,
    temperature: float, ce_weight: float, ignore_index: int, exit_weights: Tensor,
) -> tuple[Tensor, Tensor]:
    """Forward KL (+ CE) for E exits of one chunk, with the gradient written out by hand.

    d/dz [T^2 KL(softmax(t/T) || softmax(z/T))] = T (softmax(z/T) - softmax(t/T)), and
    d/dz CE(z, y) = softmax(z) - onehot(y): no autograd graph, and the softmax passes over
    the (n, V) logits are shared between value and gradient. The teacher's softmax is
    computed once for all exits.

    Args:
        hs: (n, E, H) exit states; teacher_h: (n, H); weight: (V, H) LM head weight.

    Returns:
        (E,) summed loss per exit over counted rows, and (n, E, H) gradient of
        sum_k exit_weights[k] * loss_k w.r.t. hs.
    """
    with _autocast_off(hs.device):
        return _kl_chunk_body(hs, teacher_h, weight, labels, mask, temperature, ce_weight, ignore_index, exit_weights)


def _autocast_off(device: torch.device):
    # The head's products run in the head's own dtype (bf16 for a bf16 base): autocast would cast
    # a float32 head to bf16 on every call, a full (V, H) copy per chunk and per exit.
    available = getattr(torch.amp, "is_autocast_available", lambda t: t in ("cpu", "cuda"))
    return torch.autocast(device.type, enabled=False) if available(device.type) else contextlib.nullcontext()


def _kl_chunk_body(
    hs: Tensor, teacher_h: Tensor, weight: Tensor, labels: Tensor | None, mask: Tensor | None,
    temperature: float, ce_weight: float, ignore_index: int, exit_weights: Tensor,
) -> tuple[Tensor, Tensor]:
    n, e, _ = hs.shape
    dtype = torch.promote_types(hs.dtype, torch.float32)
    keep = _counted(n, labels, mask, ignore_index, hs.device)
    keep_f = keep.to(dtype)
    t = F.linear(teacher_h.to(weight.dtype), weight).to(dtype)  # (n, V)
    if temperature != 1.0:
        t = t / temperature
    log_p = torch.log_softmax(t, dim=-1)
    p = log_p.exp()
    p_log_p = (p * log_p).sum(-1)  # (n,)
    grad = torch.empty_like(hs)
    losses = torch.empty(e, dtype=dtype, device=hs.device)
    for k in range(e):
        z1 = F.linear(hs[:, k].to(weight.dtype), weight).to(dtype)  # (n, V) logits
        z = z1 / temperature if temperature != 1.0 else z1  # (a new tensor when T != 1)
        rows = None
        if ce_weight > 0:
            safe = labels.clamp_min(0)[:, None]  # uncounted rows are zeroed below
            # CE is at temperature 1: log_softmax of the unscaled logits at the label.
            rows = -ce_weight * (z1.gather(-1, safe).squeeze(-1) - torch.logsumexp(z1, dim=-1))
            s1 = torch.softmax(z1, dim=-1) if temperature != 1.0 else None
        # KL(p || q) = sum p log p - sum p z + logsumexp(z): one dot product and one logsumexp
        # over the (n, V) logits, then q = exp(z - lse) in place; fewer passes than log_softmax.
        p_dot_z = torch.linalg.vecdot(p, z)  # (n,)
        lse = torch.logsumexp(z, dim=-1)  # (n,)
        kl = (p_log_p - p_dot_z + lse) * temperature**2
        rows = kl if rows is None else rows + kl
        q = z.sub_(lse[:, None]).exp_()  # softmax(z / T), in z's memory
        if ce_weight > 0 and temperature == 1.0:
            g = q.mul_(1.0 + ce_weight).sub_(p)  # (q - p) + ce * q
        else:
            g = q.sub_(p).mul_(temperature)
            if ce_weight > 0:
                g.add_(s1, alpha=ce_weight)
        if ce_weight > 0:
            g.scatter_add_(-1, safe, torch.full((n, 1), -ce_weight, dtype=dtype, device=hs.device))
        rows = torch.where(keep, rows, torch.zeros((), dtype=dtype, device=hs.device))
        losses[k] = rows.sum()
        # Uncounted rows and the exit weight scale rows of the (n, H) product, not the (n, V) gradient.
        # (n, V) @ (V, H) in the head's dtype: the gradient is cast, never the head.
        grad[:, k] = (torch.mm(g.to(weight.dtype), weight).to(dtype) * (keep_f * exit_weights[k].to(dtype))[:, None]).to(hs.dtype)
    return losses, grad
