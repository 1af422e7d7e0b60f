"""Tests for balcony.losses: divergence values, masking, reductions, and chunked == unchunked."""

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from balcony.metrics import kl_per_token, top1_agreement
from balcony.training.chunked import chunked_distill_loss
from balcony.training.losses import count_tokens, distill_loss

V, H, B, T = 37, 16, 3, 7
DIVS = ["kl", "reverse_kl", "jsd"]


def logits(n=6, v=V, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g, dtype=torch.float64) * scale)


def ref_kl(p_logits, q_logits, t=1.0):
    """Hand-written sum p * (log p - log q) per row, from explicit softmaxes."""
    p = torch.exp(p_logits / t) / torch.exp(p_logits / t).sum(-1, keepdim=True)
    q = torch.exp(q_logits / t) / torch.exp(q_logits / t).sum(-1, keepdim=True)
    return (p * (torch.log(p) - torch.log(q))).sum(-1)


@pytest.mark.parametrize("kind", DIVS)
def test_identical_logits_give_zero(kind):
    x = logits()
    assert distill_loss(x, x.clone(), kind=kind).abs().item() < 1e-12
    assert distill_loss(x, x.clone(), kind=kind, reduction="none").abs().max().item() < 1e-12


def test_kl_matches_reference_and_directions():
    s, t = logits(seed=1), logits(seed=2)
    ref = ref_kl(t, s)  # forward KL(p_teacher || p_student)
    assert torch.allclose(distill_loss(s, t, kind="kl", reduction="sum"), ref.sum(), atol=1e-12)
    assert torch.allclose(distill_loss(s, t, kind="kl", reduction="mean"), ref.mean(), atol=1e-12)
    assert torch.allclose(distill_loss(s, t, kind="reverse_kl"), ref_kl(s, t).sum(), atol=1e-12)
    assert (ref > 0).all()
    # Forward and reverse KL genuinely differ on asymmetric distributions.
    assert not torch.allclose(distill_loss(s, t, kind="kl"), distill_loss(s, t, kind="reverse_kl"))


def test_jsd_matches_reference_and_is_bounded():
    s, t = logits(seed=3), logits(seed=4)
    p, q = F.softmax(t, -1), F.softmax(s, -1)
    m = 0.5 * (p + q)
    ref = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    got = distill_loss(s, t, kind="jsd", reduction="none")
    assert torch.allclose(got, ref, atol=1e-12)
    assert (got > 0).all() and (got <= torch.log(torch.tensor(2.0, dtype=torch.float64))).all()
    # JSD is symmetric.
    assert torch.allclose(got, distill_loss(t, s, kind="jsd", reduction="none"), atol=1e-12)


def test_temperature_scaling():
    s, t = logits(seed=5), logits(seed=6)
    for temp in (0.5, 2.0, 4.0):
        got = distill_loss(s, t, kind="kl", temperature=temp, reduction="sum")
        assert torch.allclose(got, temp**2 * ref_kl(t, s, temp).sum(), atol=1e-10)
    assert not torch.allclose(distill_loss(s, t, temperature=2.0), distill_loss(s, t))


def test_teacher_is_detached():
    s = logits(seed=7).requires_grad_(True)
    t = logits(seed=8).requires_grad_(True)
    distill_loss(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_low_precision_inputs_computed_in_float32():
    s, t = logits(seed=9).bfloat16(), logits(seed=10).bfloat16()
    got = distill_loss(s, t)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), ref_kl(t.double(), s.double()).sum(), rtol=1e-5)


def test_masked_rows_do_not_count():
    s, t = logits(seed=11), logits(seed=12)
    labels = torch.tensor([3, -100, 5, -100, 0, 7])
    base_sum = distill_loss(s, t, labels, reduction="sum", ce_weight=0.3)
    base_mean = distill_loss(s, t, labels, reduction="mean", ce_weight=0.3)
    # Wildly change the masked rows' logits: nothing moves.
    s2, t2 = s.clone(), t.clone()
    s2[[1, 3]] = logits(2, seed=13, scale=1e4)
    t2[[1, 3]] = -logits(2, seed=14, scale=1e4)
    assert torch.equal(distill_loss(s2, t2, labels, reduction="sum", ce_weight=0.3), base_sum)
    # Mean divides by the 4 counted rows: same as the mean over only the counted rows.
    keep = labels != -100
    only = distill_loss(s[keep], t[keep], labels[keep], reduction="mean", ce_weight=0.3)
    assert torch.allclose(base_mean, only, atol=1e-12)
    assert torch.allclose(base_mean, base_sum / 4, atol=1e-12)
    # Doubling the batch with the same rows keeps the mean (doubles the sum).
    d = distill_loss(torch.cat([s, s]), torch.cat([t, t]), torch.cat([labels, labels]), reduction="mean", ce_weight=0.3)
    assert torch.allclose(d, base_mean, atol=1e-12)
    # An explicit mask acts like ignore_index; "none" zeros uncounted rows.
    via_mask = distill_loss(s2, t2, mask=keep, reduction="mean")
    assert torch.allclose(via_mask, distill_loss(s[keep], t[keep], reduction="mean"), atol=1e-12)
    per_row = distill_loss(s2, t2, labels, reduction="none")
    assert per_row.shape == (6,) and (per_row[~keep] == 0).all() and (per_row[keep] > 0).all()
    assert count_tokens(labels).item() == 4
    assert count_tokens(labels, mask=torch.tensor([True] * 5 + [False])).item() == 3


def test_masked_rows_do_not_get_gradient_or_nan():
    s, t = logits(seed=15).requires_grad_(True), logits(seed=16)
    labels = torch.tensor([3, -100, 5, -100, 0, 7])
    with torch.no_grad():
        s[1] = float("nan")
    distill_loss(s, t, labels, ce_weight=0.5, reduction="mean").backward()
    assert torch.isfinite(s.grad[[0, 2, 4, 5]]).all()
    assert (s.grad[3] == 0).all()


def test_ce_weight_mixes_in_cross_entropy():
    s, t = logits(seed=17), logits(seed=18)
    labels = torch.tensor([3, -100, 5, 1, 0, 7])
    keep = labels != -100
    ce = F.cross_entropy(s, labels)  # ignores -100, means over counted rows
    kl = ref_kl(t[keep], s[keep], 2.0).mean() * 4.0
    got = distill_loss(s, t, labels, temperature=2.0, ce_weight=0.7, kl_weight=0.5, reduction="mean")
    assert torch.allclose(got, 0.5 * kl + 0.7 * ce, atol=1e-12)
    assert torch.allclose(distill_loss(s, None, labels, kind="ce", reduction="mean"), ce, atol=1e-12)
    assert torch.allclose(distill_loss(s, t, labels, kind="ce", reduction="mean"), ce, atol=1e-12)


def test_metrics():
    s, t = logits(seed=19), logits(seed=20)
    agree = (s.argmax(-1) == t.argmax(-1)).double()
    assert top1_agreement(s, s).item() == 1.0
    assert torch.allclose(top1_agreement(s, t).double(), agree.mean())
    t2 = t.clone()
    t2[0] = s[0]  # row 0 now agrees; mask keeps rows 0 and 1
    m = torch.tensor([True, True, False, False, False, False])
    assert top1_agreement(s, t2, m).item() == pytest.approx((1.0 + agree[1].item()) / 2)
    per = kl_per_token(s.view(2, 3, V), t.view(2, 3, V))
    assert per.shape == (2, 3) and torch.allclose(per.flatten(), ref_kl(t, s), atol=1e-12)
    assert not per.requires_grad


# --- chunked ---------------------------------------------------------------------------


def setup_chunked(seed=0, head_grad=False, masked=True):
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(H, V, bias=False).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g, dtype=torch.float64))
    head.weight.requires_grad_(head_grad)
    s = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=g)
    if masked:
        labels[0, :3] = -100
        labels[2, -1] = -100
    return head, s, t, labels


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


CASES = [
    dict(kind="kl"),
    dict(kind="reverse_kl"),
    dict(kind="jsd"),
    dict(kind="kl", temperature=2.0, ce_weight=0.5, kl_weight=0.8),
    dict(kind="jsd", ce_weight=1.0),
    dict(kind="ce"),
]


@pytest.mark.parametrize("head_grad", [False, True], ids=["frozen_head", "trainable_head"])
@pytest.mark.parametrize("chunk_size", [1, 5, 1000])
@pytest.mark.parametrize("kw", CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_chunked_matches_unchunked(kw, chunk_size, head_grad):
    head, s, t, labels = setup_chunked(head_grad=head_grad)
    wrt = (s, head.weight) if head_grad else (s,)

    ref = distill_loss(head(s.view(-1, H)), head(t.view(-1, H)), labels.view(-1), reduction="mean", **kw)
    ref_g = grads(ref, *wrt)
    got = chunked_distill_loss(s, t, head, labels, chunk_size=chunk_size, **kw)
    got_g = grads(got, *wrt)

    assert torch.allclose(got, ref, atol=1e-12, rtol=1e-10)
    for a, b in zip(got_g, ref_g):
        assert a.abs().sum() > 0
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
def test_chunked_teacher_logits_mask_and_no_labels(chunk_size):
    head, s, t, _ = setup_chunked(seed=1)
    t_logits = head(t).detach()
    mask = torch.rand(B, T, generator=torch.Generator().manual_seed(3)) > 0.3
    ref = distill_loss(head(s.view(-1, H)), t_logits.view(-1, V), mask=mask.view(-1), reduction="mean")
    got = chunked_distill_loss(s, t_logits, head, mask=mask, chunk_size=chunk_size, teacher_is_logits=True)
    assert torch.allclose(got, ref, atol=1e-12)
    assert torch.allclose(grads(got, s)[0], grads(ref, s)[0], atol=1e-12)
    # No labels, no mask: every token counts; sum reduction is the plain sum.
    ref_all = distill_loss(head(s.view(-1, H)), t_logits.view(-1, V), reduction="sum")
    got_all = chunked_distill_loss(s, t_logits, head, chunk_size=chunk_size, teacher_is_logits=True, reduction="sum")
    assert torch.allclose(got_all, ref_all, atol=1e-10)
    # Without grad (evaluation) the value is the same and nothing is tracked.
    with torch.no_grad():
        ev = chunked_distill_loss(s, t_logits, head, mask=mask, chunk_size=chunk_size, teacher_is_logits=True)
    assert not ev.requires_grad and torch.allclose(ev, ref.detach(), atol=1e-12)


@pytest.mark.parametrize("head_grad", [False, True], ids=["frozen_head", "trainable_head"])
def test_chunked_does_not_keep_all_logits(head_grad):
    # After forward, the graph may hold (n, H) hidden states / gradients but no (n, V) logits.
    head, s, t, labels = setup_chunked(head_grad=head_grad)
    saved = []

    def pack(x):
        saved.append(weakref.ref(x))
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = chunked_distill_loss(s, t, head, labels, chunk_size=4)
    gc.collect()
    alive = [tuple(r().shape) for r in saved if r() is not None]
    assert saved and all(V not in shape for shape in alive), alive
    loss.backward()  # the graph still works
    assert s.grad is not None and (head.weight.grad is not None) == head_grad


def test_errors():
    s, t = logits(), logits(seed=1)
    labels = torch.zeros(6, dtype=torch.long)
    with pytest.raises(ValueError, match=r"'bogus'.*'kl'.*'reverse_kl'.*'jsd'.*'ce'"):
        distill_loss(s, t, kind="bogus")
    with pytest.raises(ValueError, match=r"'bogus'.*'sum'.*'mean'"):
        distill_loss(s, t, reduction="bogus")
    with pytest.raises(ValueError, match="labels"):
        distill_loss(s, t, kind="ce")
    with pytest.raises(ValueError, match="labels"):
        distill_loss(s, t, ce_weight=0.5)
    with pytest.raises(ValueError, match="teacher"):
        distill_loss(s, None, labels)
    with pytest.raises(ValueError, match="temperature"):
        distill_loss(s, t, temperature=0.0)
    head, hs, ht, hl = setup_chunked()
    with pytest.raises(ValueError, match=r"chunk_size must be >= 1, got 0"):
        chunked_distill_loss(hs, ht, head, hl, chunk_size=0)
    with pytest.raises(ValueError, match=r"'bogus'.*'kl'"):
        chunked_distill_loss(hs, ht, head, hl, kind="bogus")
    with pytest.raises(ValueError, match="labels"):
        chunked_distill_loss(hs, ht, head, kind="ce")


# --------------------------------------------------------------------------- multi-exit + head-free


def test_multi_exit_loss_equals_sum_of_single_exit_losses_and_grads():
    from balcony.training.chunked import multi_exit_distill_loss

    torch.manual_seed(0)
    H, V = 8, 13
    head = torch.nn.Linear(H, V, bias=False).double().requires_grad_(False)
    s1 = torch.randn(2, 5, H, dtype=torch.float64, requires_grad=True)
    s2 = torch.randn(2, 5, H, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 5, H, dtype=torch.float64)
    labels = torch.randint(0, V, (2, 5))
    labels[0, :2] = -100
    total, per = multi_exit_distill_loss([s1, s2], t, head, labels, chunk_size=3, ce_weight=0.3, weights=[1.0, 0.5])
    total.backward()
    g1, g2 = s1.grad.clone(), s2.grad.clone()
    s1.grad = s2.grad = None
    r1 = chunked_distill_loss(s1, t, head, labels, chunk_size=100, ce_weight=0.3)
    r2 = chunked_distill_loss(s2, t, head, labels, chunk_size=100, ce_weight=0.3)
    (r1 + 0.5 * r2).backward()
    assert torch.allclose(total, r1 + 0.5 * r2, atol=1e-12)
    assert torch.allclose(per.double(), torch.stack([r1, r2]).detach(), atol=1e-6)
    assert torch.allclose(g1, s1.grad, atol=1e-12) and torch.allclose(g2, s2.grad, atol=1e-12)


def test_logit_mse_is_the_centred_logit_mse_and_zero_for_identical_states():
    from balcony.training.losses import centered_gram, logit_mse_loss

    torch.manual_seed(1)
    H, V = 8, 13
    w = torch.randn(V, H, dtype=torch.float64)
    s, t = torch.randn(3, 4, H, dtype=torch.float64), torch.randn(3, 4, H, dtype=torch.float64)
    d = s @ w.T - t @ w.T
    d = d - d.mean(-1, keepdim=True)  # a per-token shift of the logits does not count
    gram = centered_gram(w).double()
    assert torch.allclose(logit_mse_loss(s, t, gram), d.pow(2).mean(), rtol=1e-5)
    assert logit_mse_loss(t, t, gram).item() == 0.0
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[0] = True
    assert torch.allclose(logit_mse_loss(s, t, gram, mask), d[0].pow(2).mean(), rtol=1e-5)


@pytest.mark.parametrize("temperature,ce_weight", [(1.0, 0.0), (1.0, 0.4), (2.0, 0.0), (0.5, 0.4)])
def test_hand_written_kl_gradient_equals_autograd(temperature, ce_weight):
    """The nn.Linear fast path (gradient written by hand) against the autograd path (a lambda head)."""
    from balcony.training.chunked import multi_exit_distill_loss

    torch.manual_seed(2)
    H, V = 8, 13
    head = torch.nn.Linear(H, V, bias=False).double().requires_grad_(False)
    s = [torch.randn(2, 5, H, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    t = torch.randn(2, 5, H, dtype=torch.float64)
    labels = torch.randint(0, V, (2, 5))
    labels[1, 3:] = -100
    kw = dict(chunk_size=4, ce_weight=ce_weight, temperature=temperature, weights=[1.0, 0.5, 2.0])
    fast, per_fast = multi_exit_distill_loss(s, t, head, labels, **kw)
    fast.backward()
    grads = [x.grad.clone() for x in s]
    for x in s:
        x.grad = None
    ref, per_ref = multi_exit_distill_loss(s, t, lambda h: head(h), labels, **kw)
    ref.backward()
    assert torch.allclose(fast, ref, atol=1e-12) and torch.allclose(per_fast, per_ref, atol=1e-6)
    for g, x in zip(grads, s):
        assert torch.allclose(g, x.grad, atol=1e-12)


def test_teacher_vocab_keeps_the_entries_with_most_teacher_mass():
    from balcony.training.losses import teacher_vocab

    torch.manual_seed(0)
    w = torch.randn(30, 8, dtype=torch.float64)
    h = torch.randn(5, 7, 8, dtype=torch.float64)
    mask = torch.rand(5, 7) > 0.3
    idx, cov = teacher_vocab(w, h, 6, mask=mask, chunk_size=4)
    mass = torch.softmax(h[mask] @ w.T, -1).sum(0)
    assert idx.tolist() == sorted(mass.topk(6).indices.tolist())
    assert cov == pytest.approx(float(mass[idx].sum() / mass.sum()))
    assert teacher_vocab(w, h, 30)[1] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="k=31 must be an integer in \\[1, 30\\]"):
        teacher_vocab(w, h, 31)
    with pytest.raises(ValueError, match="at least one counted token"):
        teacher_vocab(w, h, 3, mask=torch.zeros(5, 7, dtype=torch.bool))
