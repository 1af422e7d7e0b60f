"""Core invariants of BalconyModel on tiny random models of every supported family."""

from __future__ import annotations

import json
import os

import pytest
import torch
from tiny_models import FAMILIES, VOCAB, tiny_base
from torch import nn

from balcony import BalconyConfig, BalconyModel

EXITS = [2, 3, 5]


def make(family="llama", **cfg):
    base = tiny_base(family)
    return BalconyModel(base, BalconyConfig(exit_layers=cfg.pop("exit_layers", EXITS), **cfg))


def ids(b=2, t=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (b, t), generator=g)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_full_budget_is_the_base_bit_for_bit(family):
    model = make(family)
    x = ids()
    with torch.no_grad():
        ref = model.base(x).logits
        for full in (None, "XL", 6, "full"):
            assert torch.equal(model(x, exit=full).logits, ref)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_norm_exit_is_plain_early_exit(family):
    model = make(family, exit_kind="norm", exit_layers=[1, 3, 6])
    x = ids()
    captured = {}
    hooks = [
        layer.register_forward_hook(lambda mod, a, out, i=i: captured.__setitem__(i + 1, out[0] if isinstance(out, tuple) else out))
        for i, layer in enumerate(model.parts.layers)
    ]
    with torch.no_grad():
        model.base(x)
        for h in hooks:
            h.remove()
        for j in (1, 3, 6):
            expected = model.base.lm_head(model.parts.norm(captured[j]))
            assert torch.equal(model(x, exit=j).logits, expected), f"exit {j}"
    # The exit at the last layer reproduces the base exactly.
    with torch.no_grad():
        assert torch.equal(model(x, exit=6).logits, model.base(x).logits)


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
def test_decoder_exit_equals_hf_modules_run_by_hand(family):
    """Exit j = HF's own hidden state after j layers, through a fresh copy of HF's last layer holding the
    exit's weights, HF's rotary embedding, the exit norm and the head: computed without balcony's forward."""
    import copy

    model = make(family)
    torch.manual_seed(3)
    with torch.no_grad():  # move the exits off their init, so a copy of the last layer would not pass by luck
        for p in model.exits.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    x = ids(1, 9)
    hf = model.base.model
    for j in EXITS:
        exit_module = model.exits[str(j)]
        layer = copy.deepcopy(hf.layers[-1])
        layer.load_state_dict(exit_module.layer.state_dict())
        with torch.no_grad():
            h = model.base(x, output_hidden_states=True).hidden_states[j]  # after j decoder layers
            pos = torch.arange(x.shape[1])[None]
            out = layer(h, attention_mask=None, position_ids=pos, position_embeddings=hf.rotary_emb(h, pos))
            out = out[0] if isinstance(out, tuple) else out
            want = model.base.lm_head(exit_module.norm(out))
            got = model(x, exit=j).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(got, model.base.lm_head(model.parts.norm(h)), atol=1e-3)  # not plain early exit


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("kind", ["decoder", "mlp", "attention"])
def test_cached_decoding_equals_uncached(family, kind):
    model = make(family, exit_kind=kind)
    x = ids(t=12)
    with torch.no_grad():
        for budget in list(model.budgets):
            full = model(x, exit=budget).logits
            out = model(x[:, :7], exit=budget, use_cache=True)
            steps = [out.logits]
            for t in range(7, 12):
                steps.append(model(x[:, t : t + 1], exit=budget, cache=out.cache, use_cache=True).logits)
            torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


def test_cache_holds_only_the_layers_a_budget_runs():
    model = make()
    with torch.no_grad():
        cache = model(ids(), exit="S", use_cache=True).cache
    filled = [i for i, layer in enumerate(cache.layers) if layer.get_seq_length() > 0]
    # Layers 0..1 of the base, plus S's own slot (the first exit slot, after the 6 base layers).
    assert filled == [0, 1, 6]
    with pytest.raises(ValueError, match="filled at exit layer 2"):
        model(ids(t=1), exit="M", cache=cache, use_cache=True)


def test_exit_never_runs_later_layers():
    model = make()
    calls = []
    for i, layer in enumerate(model.parts.layers):
        layer.register_forward_hook(lambda *a, i=i: calls.append(i))
    exit_calls = []
    for j, ex in model.exits.items():
        ex.register_forward_hook(lambda *a, j=j: exit_calls.append(int(j)))
    with torch.no_grad():
        for budget, j in model.budgets.items():
            calls.clear()
            exit_calls.clear()
            model(ids(), exit=budget)
            assert calls == list(range(j)), budget
            assert exit_calls == ([j] if j in EXITS else [])


def test_left_padded_batch_matches_single_sequences():
    model = make()
    a, b = ids(1, 9, seed=3), ids(1, 5, seed=4)
    pad = torch.zeros(1, 4, dtype=torch.long)
    batch = torch.cat([a, torch.cat([pad, b], 1)], 0)
    mask = torch.cat([torch.ones(1, 9), torch.cat([torch.zeros(1, 4), torch.ones(1, 5)], 1)], 0).long()
    with torch.no_grad():
        for budget in model.budgets:
            out = model(batch, mask, exit=budget).logits
            torch.testing.assert_close(out[0], model(a, exit=budget).logits[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(out[1, 4:], model(b, exit=budget).logits[0], atol=1e-5, rtol=0)


def test_generate_batched_equals_one_by_one_and_cache_free_greedy():
    model = make()
    a, b = ids(1, 6, seed=5), ids(1, 3, seed=6)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)], 0)
    mask = (torch.arange(6)[None] >= torch.tensor([[0], [3]])).long()
    for budget in model.budgets:
        out = model.generate(batch, mask, exit=budget, max_new_tokens=6)
        assert torch.equal(out[0, 6:], model.generate(a, exit=budget, max_new_tokens=6)[0, 6:])
        assert torch.equal(out[1, 6:], model.generate(b, exit=budget, max_new_tokens=6)[0, 3:])
        # Greedy with the cache equals argmax of full recomputation at every step.
        seq = a
        with torch.no_grad():
            for _ in range(6):
                nxt = model(seq, exit=budget).logits[:, -1].argmax(-1, keepdim=True)
                seq = torch.cat([seq, nxt], 1)
        assert torch.equal(seq, model.generate(a, exit=budget, max_new_tokens=6))


def test_save_load_round_trip_and_no_base_weights(tmp_path):
    model = make()
    with torch.no_grad():  # make exits differ from their init so the round trip means something
        for p in model.exits.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["balcony_config.json", "balcony_exits.safetensors"]
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "balcony_exits.safetensors")
    assert saved and all(k.startswith("exits.") for k in saved)
    n_exit = sum(p.numel() for p in model.exits.parameters())
    assert sum(t.numel() for t in saved.values()) == n_exit
    cfg = json.loads((tmp_path / "balcony_config.json").read_text())
    assert cfg["exit_layers"] == EXITS and cfg["base_config_fingerprint"] and cfg["num_hidden_layers"] == 6

    loaded = BalconyModel.from_pretrained(tiny_base(), tmp_path)
    x = ids()
    with torch.no_grad():
        for budget in model.budgets:
            assert torch.equal(loaded(x, exit=budget).logits, model(x, exit=budget).logits)
    # Like a PEFT adapter: loaded exits are frozen and in eval mode unless asked to train.
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    trainable = BalconyModel.from_pretrained(tiny_base(), tmp_path, is_trainable=True)
    assert trainable.training and all(p.requires_grad for p in trainable.exits.parameters())
    assert not trainable.base.training and not any(p.requires_grad for p in trainable.base.parameters())


def test_config_from_a_newer_version_loads_with_a_warning(tmp_path):
    make().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "balcony_config.json").read_text())
    cfg["exit_schedule"] = "cosine"  # a field a later balcony might add
    (tmp_path / "balcony_config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match=r"ignoring BalconyConfig fields \['exit_schedule'\]"):
        loaded = BalconyModel.from_pretrained(tiny_base(), tmp_path)
    assert loaded.exit_layers == EXITS


def test_loading_onto_another_base_names_the_mismatch(tmp_path):
    make().save_pretrained(tmp_path)
    other = tiny_base(hidden_size=48)
    with pytest.raises(ValueError, match=r"hidden_size: exits have 32, base has 48"):
        BalconyModel.from_pretrained(other, tmp_path)
    deeper = tiny_base(num_hidden_layers=8)
    with pytest.raises(ValueError, match=r"num_hidden_layers: exits have 6, base has 8"):
        BalconyModel.from_pretrained(deeper, tmp_path)
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        BalconyModel.from_pretrained(tiny_base(), tmp_path / "does-not-exist")


def test_bad_exits_are_named():
    base = tiny_base()
    with pytest.raises(ValueError, match=r"exit layer 40 is out of range: the base model has 6 layers"):
        BalconyModel(base, BalconyConfig(exit_layers=[2, 40]))
    with pytest.raises(ValueError, match=r"duplicate exit layers \[3\]"):
        BalconyConfig(exit_layers=[3, 3, 4])
    with pytest.raises(ValueError, match="exit layer 0 is out of range"):
        BalconyConfig(exit_layers=[0])
    with pytest.raises(ValueError, match="exit_kind='conv' is not one of"):
        BalconyConfig(exit_layers=[1], exit_kind="conv")
    with pytest.raises(ValueError, match=r"budget_names=\['A'\] has 1 names; 1 exits need 2"):
        BalconyConfig(exit_layers=[1], budget_names=["A"])
    model = make()
    with pytest.raises(ValueError, match=r"unknown budget 'XXL': budgets are S \(layer 2\), M \(layer 3\), L \(layer 5\), XL \(layer 6\)"):
        model(ids(), exit="XXL")
    with pytest.raises(ValueError, match="exit layer 4 has no Balcony module"):
        model(ids(), exit=4)
    with pytest.raises(ValueError, match="exit layer 9 is out of range: the base model has 6 layers"):
        model(ids(), exit=9)


def test_architecture_without_layer_list_is_refused():
    class NoLayers(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Cfg", (), {"model_type": "weird"})()
            self.model = nn.Module()
            self.lm_head = nn.Linear(4, 4)

        def get_output_embeddings(self):
            return self.lm_head

    with pytest.raises(ValueError, match=r"architecture 'weird' \(NoLayers\) is not supported: .*no embed_tokens, layers"):
        BalconyModel(NoLayers(), BalconyConfig(exit_layers=[1]))


def test_base_is_frozen_exits_train():
    model = make()
    assert all(not p.requires_grad for p in model.base.parameters())
    assert all(p.requires_grad for p in model.exits.parameters())
    model.train()
    assert not model.base.training and model.exits.training
    out = model.distill_forward(ids())
    assert not out.teacher_hidden.requires_grad
    loss = sum(h.square().mean() for h in out.exit_hidden.values())
    loss.backward()
    assert all(p.grad is None for p in model.base.parameters())
    assert all(p.grad is not None for p in model.exits.parameters())


def test_distill_forward_matches_per_budget_forward():
    model = make()
    x = ids()
    with torch.no_grad():
        out = model.distill_forward(x)
        torch.testing.assert_close(model.base.lm_head(out.teacher_hidden), model.base(x).logits, atol=1e-6, rtol=0)
        for j, h in out.exit_hidden.items():
            torch.testing.assert_close(model.base.lm_head(h), model(x, exit=j).logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind,has_attn,has_mlp", [("decoder", True, True), ("mlp", False, True), ("attention", True, False), ("norm", False, False)])
def test_exit_kinds_hold_the_right_parameters(kind, has_attn, has_mlp):
    model = make(exit_kind=kind)
    names = [n for n, _ in model.exits["2"].named_parameters()]
    assert any("self_attn" in n for n in names) == has_attn
    assert any("mlp" in n for n in names) == has_mlp
    assert any(n.startswith("norm") for n in names)


def test_inits():
    last = {n: p for n, p in make().parts.layers[-1].named_parameters()}
    copied = dict(make(init="last_layer").exits["2"].layer.named_parameters())
    assert all(torch.equal(copied[n], last[n]) for n in last)
    rand = dict(make(init="random").exits["2"].layer.named_parameters())
    assert not torch.equal(rand["self_attn.q_proj.weight"], last["self_attn.q_proj.weight"])
    # Identity init: exit layer adds nothing, so the exit equals plain early exit at that layer.
    ident = make(init="identity")
    plain = make(exit_kind="norm")
    with torch.no_grad():
        for j in EXITS:
            torch.testing.assert_close(ident(ids(), exit=j).logits, plain(ids(), exit=j).logits, atol=1e-6, rtol=0)


def test_add_exit_leaves_others_untouched_and_renames_budgets():
    model = make(exit_layers=[2, 5])
    before = {k: v.clone() for k, v in model.exit_state_dict().items()}
    x = ids()
    with torch.no_grad():
        ref = {j: model(x, exit=j).logits for j in (2, 5)}
    model.add_exit(3, "mid")
    assert model.config.exit_layers == [2, 3, 5] and list(model.budgets) == ["S", "mid", "M", "XL"]
    after = model.exit_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        for j in (2, 5):
            assert torch.equal(model(x, exit=j).logits, ref[j])
        model(x, exit="mid")
    with pytest.raises(ValueError, match="exit layer 3 already exists"):
        model.add_exit(3)


def test_parameter_counts():
    model = make()
    per_layer = sum(p.numel() for p in model.parts.layers[0].parameters())
    exit_params = sum(p.numel() for p in model.exits["2"].parameters())
    assert model.count_parameters("S") == 2 * per_layer + exit_params
    full = model.count_parameters("XL")
    assert full == 6 * per_layer + sum(p.numel() for p in model.parts.norm.parameters())
    trainable, total = model.trainable_parameters()
    assert trainable == sum(p.numel() for p in model.exits.parameters())
    line = model.print_trainable_parameters()
    assert f"trainable params: {trainable:,}" in line
