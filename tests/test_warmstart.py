"""The closed-form (least-squares) warm start of an exit (tiny models, CPU)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_base

from balcony import BalconyConfig, BalconyModel
from balcony.training.features import build_feature_cache
from balcony.training.packing import PackedData
from balcony.training.warmstart import lstsq_warm_start


def _setup(kind: str = "decoder"):
    torch.manual_seed(0)
    model = BalconyModel(tiny_base(), BalconyConfig(exit_layers=[1, 2], exit_kind=kind))
    ids = torch.randint(0, model.base.config.vocab_size, (6, 16))
    pos = torch.arange(16).repeat(6, 1)
    pos[:, 8:] -= 8  # two documents per row: positions restart
    return model, build_feature_cache(model, PackedData(ids, pos), batch_size=4, dtype=torch.float32, progress=False)


def _objective(model, cache, j):
    """Σ ‖o − RMS(r)·u‖² over the cache, with o the exit layer's output and u the teacher's unit-RMS state."""
    got = {}
    ex = model.exits[str(j)]
    h = ex.norm.register_forward_pre_hook(lambda m, inp: got.__setitem__("o", inp[0]))
    a_hook = ex.layer.mlp.down_proj.register_forward_hook(lambda m, inp, out: got.__setitem__("mlp", out))
    with torch.no_grad():
        b = cache.batch(torch.arange(len(cache)), torch.float32)
        model.run_exits({j: b["taps"][j]}, None, b["position_ids"])
    h.remove()
    a_hook.remove()
    r = got["o"] - got["mlp"]
    u = b["teacher"] / model.parts.norm.weight
    return float((got["o"] - u * r.pow(2).mean(-1, keepdim=True).sqrt()).pow(2).sum())


def test_lstsq_fits_only_the_mlp_output_and_lowers_its_objective():
    model, cache = _setup()
    before = {k: v.clone() for k, v in model.exit_state_dict().items()}
    base_before = {k: v.clone() for k, v in model.base.state_dict().items()}
    obj_before = {j: _objective(model, cache, j) for j in (1, 2)}
    r2 = lstsq_warm_start(model, cache, ridge=1e-6)
    assert set(r2) == {1, 2} and all(0.0 < v <= 1.0 for v in r2.values())
    for j in (1, 2):
        assert _objective(model, cache, j) < 0.9 * obj_before[j]
    after = model.exit_state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == {f"exits.{j}.layer.mlp.down_proj.weight" for j in (1, 2)}
    assert all(torch.equal(v, base_before[k]) for k, v in model.base.state_dict().items())


def test_lstsq_is_the_least_squares_solution():
    """With no ridge, the gradient of the objective in down_proj vanishes at the fitted weights."""
    model, cache = _setup()
    lstsq_warm_start(model, cache, exits=[2], ridge=0.0)
    w = model.exits["2"].layer.mlp.down_proj.weight
    w.requires_grad_(True)
    got = {}
    ex = model.exits["2"]
    hooks = [ex.norm.register_forward_pre_hook(lambda m, inp: got.__setitem__("o", inp[0])),
             ex.layer.mlp.down_proj.register_forward_hook(lambda m, inp, out: got.__setitem__("mlp", out))]
    b = cache.batch(torch.arange(len(cache)), torch.float32)
    model.run_exits({2: b["taps"][2]}, None, b["position_ids"])
    for h in hooks:
        h.remove()
    r = (got["o"] - got["mlp"]).detach()  # the fit holds r fixed
    u = b["teacher"] / model.parts.norm.weight
    loss = (got["o"] - u * r.pow(2).mean(-1, keepdim=True).sqrt()).pow(2).sum()
    (g,) = torch.autograd.grad(loss, w)
    assert g.abs().max() < 1e-3 * loss.item() / w.numel() ** 0.5 + 1e-4


def test_lstsq_refuses_exits_without_an_mlp():
    model, cache = _setup(kind="attention")
    with pytest.raises(ValueError, match="exit 1 has no 'mlp.down_proj'"):
        lstsq_warm_start(model, cache)
