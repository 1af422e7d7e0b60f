"""How close an exit is to the full model: KL, top-1 agreement and perplexity (the only code that measures them).

Training (`balcony.training.evaluate`) and evaluation (`balcony.eval.texts`) both
feed `DistillScores`; the per-token functions below are for tests and notebooks.
Conventions: logits are (..., V); KL is KL(p_full || q_exit) in nats per token,
the direction the paper distils in.
"""

from __future__ import annotations

import math
from typing import Callable, Hashable, Mapping

import torch
from torch import Tensor


@torch.no_grad()
def kl_per_token(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """KL(p_teacher || q_student) per token: (..., V) x (..., V) -> (...), at least float32.

    Example:
        >>> x = torch.randn(2, 5)
        >>> float(kl_per_token(x, x).abs().max()) < 1e-6
        True
    """
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_q = torch.log_softmax(student_logits.to(dtype), dim=-1)
    log_p = torch.log_softmax(teacher_logits.to(dtype), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


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


class DistillScores:
    """Running KL / top-1 agreement / next-token NLL of several students against one teacher.

    `update` takes the normed hidden states (rows of tokens) and the shared LM head,
    and forms logits `chunk` rows at a time, the teacher's once per chunk, so memory
    never holds (tokens x vocab) for more than one student. A student whose rows
    *are* the teacher's (the full model) is scored like any other.

    Example:
        >>> head = torch.nn.Linear(4, 7, bias=False)
        >>> h = torch.randn(6, 4)
        >>> s = DistillScores()
        >>> s.update(h, {"same": h, "other": torch.randn(6, 4)}, head)
        >>> round(s.result()["same"]["kl"], 6), s.result()["same"]["agreement"]
        (0.0, 1.0)
    """

    def __init__(self) -> None:
        self._sums: dict[Hashable, dict[str, float]] = {}
        self._items: dict[Hashable, dict[Hashable, dict[str, float]]] = {}

    @torch.no_grad()
    def update(
        self,
        teacher: Tensor,
        students: Mapping[Hashable, Tensor],
        head: Callable[[Tensor], Tensor],
        *,
        targets: Tensor | None = None,
        mask: Tensor | None = None,
        chunk: int = 512,
        heads: Mapping[Hashable, Callable[[Tensor], Tensor]] | None = None,
        item: Hashable | None = None,
    ) -> None:
        """Add a batch of token rows.

        Args:
            teacher: (N, H) the full model's normed state per token.
            students: key -> (N, H) a student's normed state for the same tokens.
            head: The LM head, (n, H) -> (n, V).
            targets: (N,) next-token ids, -100 where a token has none (for perplexity).
            mask: (N,) bool, False for tokens that do not count (padding).
            chunk: Rows per logits chunk.
            heads: key -> the student's own LM head, for students whose head is not `head`
                (e.g. a model whose base, head included, was trained too); `head` stays the teacher's.
            item: Also keep these rows' sums apart under this item (a document, a window):
                `items` returns them, for paired comparisons between students item by item.
        """
        n = teacher.shape[0]
        keep = torch.ones(n, dtype=torch.bool, device=teacher.device) if mask is None else mask.reshape(-1).bool()
        heads = heads or {}
        zero = {"kl": 0.0, "agree": 0.0, "nll": 0.0, "tokens": 0, "targets": 0}
        for key in students:
            self._sums.setdefault(key, dict(zero))
        sinks = {key: [self._sums[key]] for key in students}
        if item is not None:
            for key in students:
                sinks[key].append(self._items.setdefault(key, {}).setdefault(item, dict(zero)))
        for s in range(0, n, chunk):
            m = keep[s : s + chunk]
            if not bool(m.any()):
                continue
            log_p = torch.log_softmax(head(teacher[s : s + chunk][m]).float(), dim=-1)  # (n, V)
            p, top = log_p.exp(), log_p.argmax(-1)
            tgt = None if targets is None else targets.reshape(-1)[s : s + chunk][m]
            has = None if tgt is None else tgt != -100
            for key, rows in students.items():
                log_q = torch.log_softmax(heads.get(key, head)(rows[s : s + chunk][m]).float(), dim=-1)
                got = {"kl": float((p * (log_p - log_q)).sum()), "agree": int((log_q.argmax(-1) == top).sum()), "tokens": int(m.sum())}
                if has is not None and bool(has.any()):
                    got["nll"] = -float(log_q[has].gather(-1, tgt[has, None]).sum())
                    got["targets"] = int(has.sum())
                for acc in sinks[key]:
                    for name, value in got.items():
                        acc[name] += value

    def result(self) -> dict[Hashable, dict[str, float]]:
        """key -> {"kl": nats/token, "agreement": fraction, "nll": nats/token, "ppl": exp(nll), "tokens": counted}."""
        return {key: _means(acc) for key, acc in self._sums.items()}

    def items(self, key: Hashable) -> dict[Hashable, dict[str, float]]:
        """item -> the sums of `key`'s rows added with that `item`: "kl", "agree", "nll" (summed over
        tokens), "tokens" and "targets" (counts); {} when no rows were added with an item.

        Example:
            >>> head = torch.nn.Linear(4, 7, bias=False)
            >>> h = torch.randn(6, 4)
            >>> s = DistillScores()
            >>> for doc in (0, 1):
            ...     s.update(h[3 * doc : 3 * doc + 3], {"same": h[3 * doc : 3 * doc + 3]}, head, item=doc)
            >>> [v["tokens"] for v in s.items("same").values()]
            [3, 3]
        """
        return {item: dict(acc) for item, acc in self._items.get(key, {}).items()}


def _means(acc: Mapping[str, float]) -> dict[str, float]:
    nll = acc["nll"] / max(acc["targets"], 1)
    return {
        "kl": acc["kl"] / max(acc["tokens"], 1),
        "agreement": acc["agree"] / max(acc["tokens"], 1),
        "nll": nll,
        "ppl": math.exp(min(nll, 700.0)),
        "tokens": int(acc["tokens"]),
    }
