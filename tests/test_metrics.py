"""balcony.metrics.distill_metrics: values against a hand-written reference, and cached == uncached."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_base

from balcony import BalconyConfig, BalconyModel
from balcony.training.evaluate import distill_metrics
from balcony.training.features import build_feature_cache
from balcony.training.packing import PackedData


@pytest.fixture(scope="module")
def model():
    m = BalconyModel(tiny_base(dtype=torch.float64), BalconyConfig(exit_layers=[2, 4]))
    # Perturb the exits so they are not copies of the last layer (their metrics then differ per exit).
    torch.manual_seed(1)
    with torch.no_grad():
        for p in m.exits.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def rows(n=4, t=12, seed=0) -> PackedData:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (n, t), generator=g)
    pos = torch.arange(t).repeat(n, 1)
    pos[1, 5:] = torch.arange(t - 5)  # a second packed document in row 1
    return PackedData(ids, pos)


def reference(model, batch, exits):
    """Logits of every exit and of the full model from plain forwards, then the metrics by hand."""
    ids, pos = batch["input_ids"], batch["position_ids"]
    with torch.no_grad():
        full = model(ids, position_ids=pos, exit=None).logits
        out = {}
        for j in exits:
            q = model(ids, position_ids=pos, exit=j).logits
            p_t, p_s = full.softmax(-1), q.softmax(-1)
            kl = (p_t * (p_t.log() - p_s.log())).sum(-1)
            agree = (q.argmax(-1) == full.argmax(-1)).double()
            labels = batch["labels"][:, 1:]
            logp = q.log_softmax(-1)[:, :-1]
            valid = labels != -100
            nll = -logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0][valid]
            out[j] = {"kl": kl.mean().item(), "agreement": agree.mean().item(), "ppl": nll.mean().exp().item()}
    return out


def test_metrics_match_a_hand_written_reference(model):
    data = rows()
    got = distill_metrics(model, [data[slice(0, 2)], data[slice(2, 4)]], chunk_size=5)
    ref = reference(model, data[slice(0, 4)], [2, 4])
    assert set(got) == {2, 4, 6}
    for j in (2, 4):
        assert got[j]["kl"] == pytest.approx(ref[j]["kl"], rel=1e-5)  # logits are scored in float32
        assert got[j]["agreement"] == pytest.approx(ref[j]["agreement"], abs=1e-12)
        assert got[j]["ppl"] == pytest.approx(ref[j]["ppl"], rel=1e-5)
        assert got[j]["tokens"] == 48
    assert got[2]["kl"] > 0 and got[2]["kl"] != pytest.approx(got[4]["kl"])
    # The full model's own perplexity, from its logits.
    batch = data[slice(0, 4)]
    with torch.no_grad():
        logp = model(batch["input_ids"], position_ids=batch["position_ids"], exit=None).logits.log_softmax(-1)[:, :-1]
    labels = batch["labels"][:, 1:]
    valid = labels != -100
    nll = -logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0][valid]
    assert got[6]["ppl"] == pytest.approx(nll.mean().exp().item(), rel=1e-5)


def test_cached_frozen_pass_gives_the_same_metrics(model):
    data = rows(seed=3)
    plain = distill_metrics(model, [data[slice(0, 2)], data[slice(2, 4)]])
    cache = build_feature_cache(model, data, batch_size=2, dtype=torch.float64, progress=False)
    batches = [cache.batch(torch.arange(s, s + 2), torch.float64) for s in (0, 2)]
    assert all("taps" in b for b in batches)
    cached = distill_metrics(model, batches)
    for j in (2, 4, 6):
        for key in ("kl", "agreement", "ppl", "tokens"):
            assert cached[j][key] == pytest.approx(plain[j][key], rel=1e-12, abs=1e-12), (j, key)


def test_cached_batch_without_an_exit_is_a_clear_error(model):
    data = rows()
    cache = build_feature_cache(model, data, batch_size=4, dtype=torch.float64, progress=False)
    batch = cache.batch(torch.arange(4), torch.float64)
    del batch["taps"][4]
    with pytest.raises(ValueError, match=r"no hidden states for exit\(s\) \[4\]; it has \[2\]"):
        distill_metrics(model, [batch])
