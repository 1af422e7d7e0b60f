"""Self-distillation losses for Balcony exits, and a chunked version that never holds all logits.

Teacher and student logits both come from the same frozen LM head: the teacher from the
final (normed) hidden state, the student from an exit's (normed) hidden state. With a
49k vocabulary, (batch * seq * vocab) logits per exit are the largest tensors in training,
so `chunked_distill_loss` applies the head a chunk of tokens at a time and keeps only an
(N, H) gradient between forward and backward (the "fused linear cross-entropy" trick).

Conventions: logits are (N, V) rows of already-flattened tokens; a row is *counted* when its
label is not ``ignore_index`` and its ``mask`` entry (if given) is True. Uncounted rows add
nothing to any term, and "mean" divides by the number of counted rows, not by the batch size.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

KINDS = ("kl", "reverse_kl", "jsd", "ce")
REDUCTIONS = ("sum", "mean", "none")

__all__ = [
    "KINDS",
    "centered_gram",
    "chunked_distill_loss",
    "logit_mse_loss",
    "multi_exit_distill_loss",
    "count_tokens",
    "distill_loss",
    "kl_per_token",
    "teacher_vocab",
    "top1_agreement",
]


def _upcast(x: Tensor) -> Tensor:
    # Softmax over a 49k vocab in bf16/fp16 loses most of the tail mass; float32 at least
    # (fp64 stays fp64 so tests can compare gradients tightly).
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _counted(n: int, labels: Tensor | None, mask: Tensor | None, ignore_index: int, device) -> Tensor:
    """(N,) bool: rows that count towards the loss."""
    keep = torch.ones(n, dtype=torch.bool, device=device)
    if labels is not None:
        keep = keep & (labels.reshape(-1) != ignore_index)
    if mask is not None:
        keep = keep & mask.reshape(-1).to(torch.bool)
    return keep


def _check(kind: str, reduction: str, temperature: float, ce_weight: float, has_teacher: bool, has_labels: bool) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown loss kind {kind!r}; expected one of {KINDS}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if (kind == "ce" or ce_weight > 0) and not has_labels:
        raise ValueError(f"kind={kind!r} with ce_weight={ce_weight!r} needs labels, got labels=None")
    if kind != "ce" and not has_teacher:
        raise ValueError(f"kind={kind!r} needs teacher logits; only kind='ce' works without a teacher")


def _divergence(student_logits: Tensor, teacher_logits: Tensor, kind: str, temperature: float) -> Tensor:
    """Per-row divergence at temperature T, times T^2. (..., V) -> (...)."""
    log_q = F.log_softmax(_upcast(student_logits) / temperature, dim=-1)  # student
    log_p = F.log_softmax(_upcast(teacher_logits).detach() / temperature, dim=-1)  # teacher, a constant
    if kind == "kl":  # KL(p || q): mass-covering, the standard distillation direction
        div = (log_p.exp() * (log_p - log_q)).sum(-1)
    elif kind == "reverse_kl":  # KL(q || p): mode-seeking
        div = (log_q.exp() * (log_q - log_p)).sum(-1)
    elif kind == "jsd":  # JS with beta = 0.5, via m = (p + q) / 2 computed in log space
        log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
        div = 0.5 * (log_p.exp() * (log_p - log_m)).sum(-1) + 0.5 * (log_q.exp() * (log_q - log_m)).sum(-1)
    else:
        raise ValueError(f"unknown divergence kind {kind!r}; expected one of {KINDS[:-1]}")
    # Hinton: softened gradients shrink as 1/T^2, so scale back to keep magnitudes comparable.
    return div * temperature**2


def distill_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor | None = None,
    *,
    mask: Tensor | None = None,
    kind: str = "kl",
    temperature: float = 1.0,
    ce_weight: float = 0.0,
    kl_weight: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "sum",
) -> Tensor:
    """Distillation loss of student logits against (constant) teacher logits.

    ``loss = kl_weight * T^2 * D_T(teacher, student) + ce_weight * CE(student, labels)``
    per counted row, where D_T is the chosen divergence of the temperature-T softmaxes and CE
    is at temperature 1. ``kind="ce"`` is the plain LM loss: the result is just CE against
    ``labels`` (teacher, temperature, kl_weight and ce_weight are unused).

    Args:
        student_logits: (N, V) student logits; gradients flow into these.
        teacher_logits: (N, V) teacher logits, detached; may be None only for ``kind="ce"``.
        labels: (N,) next-token ids aligned with the rows, or None. Rows equal to
            ``ignore_index`` are excluded from every term. Required when CE is used.
        mask: optional (N,) bool; False rows are excluded too (e.g. padding when there are
            no labels). Combined with the labels' mask by AND.
        kind: "kl" (KL(p_teacher || p_student)), "reverse_kl" (KL(p_student || p_teacher)),
            "jsd" (Jensen-Shannon, beta 0.5) or "ce".
        temperature: T > 0 for the divergence term.
        ce_weight: weight of the CE-against-labels term added to the divergence.
        kl_weight: weight of the divergence term.
        ignore_index: label value marking rows to skip.
        reduction: "sum" over counted rows (normalise yourself by a global token count
            across chunks / processes), "mean" over counted rows (0 if none), or "none"
            for the (N,) per-row loss with uncounted rows set to 0.

    Returns:
        A float32 (or float64, for fp64 inputs) scalar, or (N,) for ``reduction="none"``.
    """
    _check(kind, reduction, temperature, ce_weight, teacher_logits is not None, labels is not None)
    n = student_logits.shape[0]
    if student_logits.dim() != 2 or (teacher_logits is not None and teacher_logits.shape != student_logits.shape):
        got = None if teacher_logits is None else tuple(teacher_logits.shape)
        raise ValueError(f"expected (N, V) student and teacher logits of one shape, got {tuple(student_logits.shape)} and {got}")
    keep = _counted(n, labels, mask, ignore_index, student_logits.device)

    if kind == "ce":
        per_row = F.cross_entropy(_upcast(student_logits), labels, ignore_index=ignore_index, reduction="none")
    else:
        per_row = kl_weight * _divergence(student_logits, teacher_logits, kind, temperature)
        if ce_weight > 0:
            ce = F.cross_entropy(_upcast(student_logits), labels, ignore_index=ignore_index, reduction="none")
            per_row = per_row + ce_weight * ce
    # `where` (not multiply) so a garbage uncounted row cannot leak NaN/inf into the sum.
    per_row = torch.where(keep, per_row, torch.zeros((), dtype=per_row.dtype, device=per_row.device))

    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    return per_row.sum() / keep.sum().clamp_min(1)


def count_tokens(labels: Tensor | None, ignore_index: int = -100, *, mask: Tensor | None = None) -> Tensor:
    """Number of counted tokens, as a 0-dim int64 tensor (no host sync).

    Args:
        labels: (...) label ids; entries equal to ``ignore_index`` do not count. May be None
            if ``mask`` is given.
        ignore_index: label value marking tokens to skip.
        mask: optional (...) bool of the same number of elements; False entries do not count.
    """
    if labels is None and mask is None:
        raise ValueError("count_tokens needs labels or mask, got neither")
    ref = labels if labels is not None else mask
    return _counted(ref.numel(), labels, mask, ignore_index, ref.device).sum()


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


@torch.no_grad()
def top1_agreement(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Fraction of counted tokens whose student and teacher argmax agree (0 if none counted).

    Args:
        student_logits: (..., V).
        teacher_logits: (..., V), same shape.
        mask: optional (...) bool; False tokens are skipped.

    Returns:
        A float32 scalar in [0, 1].
    """
    same = student_logits.argmax(-1) == teacher_logits.argmax(-1)
    if mask is None:
        return same.float().mean()
    mask = mask.to(torch.bool)
    return (same & mask).sum().float() / mask.sum().clamp_min(1).float()


@torch.no_grad()
def kl_per_token(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    kind: str = "kl",
    temperature: float = 1.0,
) -> Tensor:
    """Per-token divergence for evaluation (no grad), T^2-scaled like the training loss.

    Args:
        student_logits: (..., V).
        teacher_logits: (..., V), same shape.
        kind: "kl", "reverse_kl" or "jsd".
        temperature: T > 0.

    Returns:
        (...) float32 (float64 for fp64 inputs) divergence per token; mask it yourself.
    """
    if kind not in KINDS[:-1]:
        raise ValueError(f"unknown divergence kind {kind!r}; expected one of {KINDS[:-1]}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    return _divergence(student_logits, teacher_logits, kind, temperature)


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
    n, e, _ = hs.shape
    dtype = torch.promote_types(hs.dtype, torch.float32)
    keep = _counted(n, labels, mask, ignore_index, hs.device)
    keep_f = keep.to(dtype)
    t = F.linear(teacher_h, weight).to(dtype)  # (n, V)
    if temperature != 1.0:
        t = t / temperature
    log_p = torch.log_softmax(t, dim=-1)
    p = log_p.exp()
    p_log_p = (p * log_p).sum(-1)  # (n,)
    grad = torch.empty_like(hs)
    losses = torch.empty(e, dtype=dtype, device=hs.device)
    for k in range(e):
        z1 = F.linear(hs[:, k], weight).to(dtype)  # (n, V) logits
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
        grad[:, k] = ((g @ weight.to(dtype)) * (keep_f * exit_weights[k].to(dtype))[:, None]).to(hs.dtype)
    return losses, grad


@torch.no_grad()
def teacher_vocab(
    head_weight: Tensor, teacher_hidden: Tensor, k: int, *, mask: Tensor | None = None, chunk_size: int = 1024
) -> tuple[Tensor, float]:
    """The `k` vocabulary entries that carry the most teacher probability over some tokens.

    Distilling over these entries only (``TrainConfig.loss_vocab``) makes the head's three
    (tokens x V) products per exit V/k times cheaper. On the embedded model the top 8192
    of 49152 entries carry 96% of the teacher's probability on its generated corpus.

    Args:
        head_weight: (V, H) LM head weight.
        teacher_hidden: (..., H) normed final hidden states.
        k: Entries to keep, 1 <= k <= V.
        mask: (...) bool, the tokens that count (default all).
        chunk_size: Tokens per (chunk, V) softmax.

    Returns:
        (indices, coverage): (k,) ascending entry indices, and the share of the teacher's
        probability mass over the counted tokens that falls on them.

    Example:
        >>> idx, cov = teacher_vocab(lm_head.weight, cache.teacher[:256], 8192)  # doctest: +SKIP
    """
    v, h = head_weight.shape
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= v:
        raise ValueError(f"loss vocabulary size k={k!r} must be an integer in [1, {v}] (the head's vocabulary)")
    states = teacher_hidden.reshape(-1, h)
    if mask is not None:
        states = states[mask.reshape(-1).bool()]
    if states.shape[0] == 0:
        raise ValueError("teacher_vocab needs at least one counted token")
    mass = torch.zeros(v, dtype=torch.float64, device=head_weight.device)
    for s in range(0, states.shape[0], chunk_size):
        logits = F.linear(states[s : s + chunk_size].to(head_weight.dtype), head_weight).float()
        mass += torch.softmax(logits, dim=-1).sum(0).double()
    top = torch.topk(mass, k).indices
    return top.sort().values, float(mass[top].sum() / mass.sum())


def centered_gram(head_weight: Tensor) -> Tensor:
    """G = W_c^T W_c / V for the LM head weight W (V, H), W_c = W minus its mean row.

    ``(a - b)^T G (a - b)`` is the mean squared difference of the *centred* logits of two
    hidden states: logits are compared up to a per-token shift, as softmax does. It costs
    H^2 per token instead of V * H for the head itself.
    """
    w = head_weight.detach().double()
    wc = w - w.mean(0, keepdim=True)
    return (wc.T @ wc / w.shape[0]).float()


def logit_mse_loss(student_hidden: Tensor, teacher_hidden: Tensor, gram: Tensor, mask: Tensor | None = None) -> Tensor:
    """Head-free distillation: mean over tokens of the centred-logit MSE, via `centered_gram`.

    Args:
        student_hidden: (..., H) normed exit state.
        teacher_hidden: (..., H) normed final state (constant).
        gram: (H, H) from `centered_gram(lm_head.weight)`.
        mask: optional (...) bool of counted tokens.

    Returns:
        Scalar: mean over counted tokens of mean_v (z_s - z_t - mean)^2, the logit MSE.
    """
    d = (_upcast(student_hidden) - _upcast(teacher_hidden.detach())).reshape(-1, student_hidden.shape[-1])  # (N, H)
    per_token = ((d @ gram.to(d.dtype)) * d).sum(-1)
    if mask is None:
        return per_token.mean()
    m = mask.reshape(-1).to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp_min(1)
