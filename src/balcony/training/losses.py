"""Self-distillation losses for Balcony exits: KL, reverse KL, JSD and CE on (N, V) logits, and their helpers.

Teacher and student logits both come from the same frozen LM head: the teacher from the
final (normed) hidden state, the student from an exit's (normed) hidden state.

Conventions: logits are (N, V) rows of already-flattened tokens; a row is *counted* when its
label is not ``ignore_index`` and its ``mask`` entry (if given) is True. Uncounted rows add
nothing to any term, and "mean" divides by the number of counted rows, not by the batch size.
The chunked version that never holds all logits is `balcony.training.chunked`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

KINDS = ("kl", "reverse_kl", "jsd", "ce")


REDUCTIONS = ("sum", "mean", "none")


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


def centered_gram(head_weight: Tensor, *, chunk_rows: int = 4096) -> Tensor:
    """G = W_c^T W_c / V for the LM head weight W (V, H), W_c = W minus its mean row.

    ``(a - b)^T G (a - b)`` is the mean squared difference of the *centred* logits of two
    hidden states: logits are compared up to a per-token shift, as softmax does. It costs
    H^2 per token instead of V * H for the head itself.

    Accumulated in float64 over `chunk_rows` rows of W at a time, as W^T W - V m m^T (m the
    mean row): no float64 copy of the whole head (8 GB for Llama-3's 128k x 4096) is made.

    Example:
        >>> w = torch.randn(10, 3)
        >>> torch.allclose(centered_gram(w, chunk_rows=4), (w - w.mean(0)).T @ (w - w.mean(0)) / 10, atol=1e-6)
        True
    """
    w = head_weight.detach()
    v, h = w.shape
    acc = torch.zeros(h, h, dtype=torch.float64, device=w.device)
    total = torch.zeros(h, dtype=torch.float64, device=w.device)
    for s in range(0, v, chunk_rows):
        rows = w[s : s + chunk_rows].double()  # (c, H)
        acc += rows.T @ rows
        total += rows.sum(0)
    mean = total / v
    return ((acc - v * torch.outer(mean, mean)) / v).float()


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
