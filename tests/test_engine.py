"""The decoding engine: static cache, hand-built masks, sampling, stopping, batching."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from tiny_models import FAMILIES, VOCAB, tiny_base, tiny_hf_tokenizer

from balcony import BalconyConfig, BalconyModel, DraftOptions
from balcony.inference.cache import budget_slots
from balcony.inference.engine import (
    decode_one_token,
    generate,
    generate_stream,
    prefill,
)
from balcony.inference.spans import new_state

EXITS = [2, 3, 5]


def make(family: str = "llama", **cfg) -> BalconyModel:
    return BalconyModel(tiny_base(family), BalconyConfig(exit_layers=cfg.pop("exit_layers", EXITS), **cfg))


def ids(b: int = 1, t: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def reference_greedy(model: BalconyModel, x: torch.Tensor, budget, n: int) -> torch.Tensor:
    """Greedy by full recomputation (no cache at all): the ground truth."""
    with torch.no_grad():
        for _ in range(n):
            x = torch.cat([x, model(x, exit=budget).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return x


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cached_decode_logits_equal_uncached_forward(family):
    model = make(family)
    x = ids(t=12)
    with torch.no_grad():
        for budget, j in model.budgets.items():
            full = model(x, exit=budget).logits  # (1, 12, V), no cache
            state = new_state(model, budget_slots(model, j), 1, 12)
            steps = [prefill(model, state, x[:, :7], j)]
            for t in range(7, 11):
                steps.append(decode_one_token(model, state, x[:, t], j))
            torch.testing.assert_close(torch.stack(steps, 1), full[:, 6:11], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["mlp", "attention", "norm"])
def test_cached_decode_every_exit_kind(kind):
    model = make(exit_kind=kind)
    x = ids(t=5)
    for budget in model.budgets:
        assert torch.equal(generate(model, x, exit=budget, max_new_tokens=6), reference_greedy(model, x, budget, 6))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_full_budget_greedy_is_the_base_greedy(family):
    model = make(family)
    x = ids(t=6, seed=4)
    hf = model.base.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert torch.equal(generate(model, x, max_new_tokens=10), hf)
    assert torch.equal(model.generate(x, exit="XL", max_new_tokens=10), hf)


@pytest.mark.parametrize("family,kv_heads", [("llama", 2), ("llama", 4), ("mistral", 2), ("qwen2", 2)])
def test_one_token_fast_path_is_bit_identical_to_the_hf_layers(family, kv_heads):
    # Llama-style layers skip HF's layer plumbing on one-token steps (`_decode_layer`); it must be the same
    # computation: grouped and plain attention, with and without a padding mask.
    model = BalconyModel(tiny_base(family, num_key_value_heads=kv_heads), BalconyConfig(exit_layers=EXITS))
    x = torch.cat([ids(1, 7, seed=1), torch.cat([torch.zeros(1, 3, dtype=torch.long), ids(1, 4, seed=2)], 1)])
    for mask in (None, torch.tensor([[1] * 7, [0, 0, 0, 1, 1, 1, 1]])):
        for j in (3, 6):
            logits = {}
            for fast in (True, False):
                state = new_state(model, budget_slots(model, j), 2, 12, mask, fast=fast)
                assert bool(state.fast and any(state.fast.values())) == fast
                with torch.no_grad():
                    steps = [prefill(model, state, x, j, mask)]
                    for _ in range(4):
                        steps.append(decode_one_token(model, state, steps[-1].argmax(-1), j))
                logits[fast] = torch.stack(steps)
            assert torch.equal(logits[True], logits[False]), (mask is not None, j)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_few_token_fast_path_matches_the_hf_layers(family):
    # Verify passes run a few tokens at once after a prefix (`_decode_layer` with T > 1): same result as HF's layers.
    from balcony.inference.engine import forward_budget

    model = make(family)
    x = torch.cat([ids(1, 9, seed=1), torch.cat([torch.zeros(1, 2, dtype=torch.long), ids(1, 7, seed=2)], 1)])
    for mask in (None, torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])):
        out = {}
        for fast in (True, False):
            state = new_state(model, budget_slots(model, 6), 2, 12, mask, fast=fast)
            with torch.no_grad():
                prefill(model, state, x[:, :6], 6, mask)
                if mask is not None:
                    state.key_valid[:, 6:] = True
                out[fast] = forward_budget(model, state, x[:, 6:9], 6, keep=3)  # 3 tokens at positions 6..8
        torch.testing.assert_close(out[True], out[False], atol=1e-5, rtol=0)


def test_every_budget_greedy_equals_recompute():
    model = make()
    x = ids(t=4, seed=2)
    for budget in model.budgets:
        assert torch.equal(generate(model, x, exit=budget, max_new_tokens=8), reference_greedy(model, x, budget, 8))


@pytest.mark.parametrize("family", ["llama", "mistral"])  # mistral: sliding window 5 < prompt + new tokens
def test_left_padded_batch_equals_one_by_one(family):
    model = make(family)
    prompts = [ids(1, 9, seed=3), ids(1, 4, seed=4), ids(1, 6, seed=5)]
    width = max(p.shape[1] for p in prompts)
    batch = torch.cat([torch.cat([torch.zeros(1, width - p.shape[1], dtype=torch.long), p], 1) for p in prompts])
    mask = torch.cat([(torch.arange(width) >= width - p.shape[1]).long()[None] for p in prompts])
    for budget in ("S", "XL"):
        out = generate(model, batch, mask, exit=budget, max_new_tokens=7)
        for row, p in zip(out, prompts):
            assert torch.equal(row[width:], generate(model, p, exit=budget, max_new_tokens=7)[0, p.shape[1]:]), budget


def test_cache_is_presized_and_holds_only_the_budget():
    model = make()
    x = ids(t=5)
    state = new_state(model, budget_slots(model, 2), 1, 5 + 3)
    with torch.no_grad():
        logits = prefill(model, state, x, 2)
        assert logits.shape == (1, VOCAB)  # only the last position got logits
        decode_one_token(model, state, logits.argmax(-1), 2)
    # Base layers 0..1 and exit S's own slot (after the 6 base layers), each sized 5 + 3.
    assert state.cache.filled() == {0: 6, 1: 6, 6: 6}
    assert all(state.cache.layers[s].keys.shape[2] == 8 for s in (0, 1, 6))
    assert all(state.cache.layers[s] is None for s in (2, 3, 4, 5, 7, 8))
    state.cache.crop(4)  # rolling back only moves write pointers
    assert state.cache.filled() == {0: 4, 1: 4, 6: 4}
    state.length = 5  # a write past the valid positions would attend a hole: refused
    with pytest.raises(RuntimeError, match="writing at 5 but only 4 positions are filled"):
        decode_one_token(model, state, torch.tensor([3]), 2)


def test_stream_yields_each_step():
    model = make()
    x = ids(2, 5)
    steps = list(generate_stream(model, x, exit="M", max_new_tokens=4))
    assert len(steps) == 4 and all(s.shape == (2,) for s in steps)
    assert torch.equal(torch.stack(steps, 1), generate(model, x, exit="M", max_new_tokens=4)[:, 5:])


def test_sampling_is_reproducible_and_top_k_1_is_greedy():
    model = make()
    x = ids(t=5)
    kw = dict(exit="S", max_new_tokens=12, do_sample=True, temperature=1.5)
    a = generate(model, x, generator=torch.Generator().manual_seed(7), **kw)
    b = generate(model, x, generator=torch.Generator().manual_seed(7), **kw)
    c = generate(model, x, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    top1 = generate(model, x, exit="S", max_new_tokens=12, do_sample=True, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(top1, generate(model, x, exit="S", max_new_tokens=12))
    nucleus = generate(model, x, exit="S", max_new_tokens=12, do_sample=True, top_p=1e-6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(nucleus, top1)


@pytest.mark.parametrize("top_k,top_p", [(4, 1.0), (5, 0.7), (9, 0.9)])
def test_top_k_fast_path_draws_from_the_filtered_distribution(top_k, top_p):
    from balcony.inference.sampling import SamplingConfig, logits_to_probs, sample

    # With top_k set, `sample` draws among the k candidates only; its frequencies must match
    # the full-vocabulary filtered distribution of `logits_to_probs` (no tokens outside it).
    logits = torch.tensor([[2.0, 1.5, 1.4, 0.3, -0.5, 0.9, -2.0, 1.0, 0.0, -1.0]])
    cfg = SamplingConfig(do_sample=True, temperature=0.7, top_k=top_k, top_p=top_p)
    want = logits_to_probs(logits, cfg)[0]
    n = 20000
    gen = torch.Generator().manual_seed(0)
    draws = sample(logits.expand(n, -1), cfg, gen)
    freq = torch.bincount(draws, minlength=logits.shape[-1]).float() / n
    assert torch.all(freq[want == 0] == 0)
    # 5 standard deviations of a binomial frequency at n draws
    assert torch.all((freq - want).abs() <= 5 * (want * (1 - want) / n).sqrt() + 1e-9), (freq, want)


def test_eos_stops_each_sequence_and_fills_the_rest():
    model = make()
    x = ids(2, 5, seed=9)
    free = generate(model, x, max_new_tokens=10)[:, 5:]
    row0 = free[0].tolist()
    s = next(i for i in range(1, 10) if row0[i] not in row0[:i])  # sequence 0 first produces it at step s
    eos = row0[s]
    out = generate(model, x, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)[:, 5:]
    assert torch.equal(out[0, : s + 1], free[0, : s + 1]) and (out[0, s + 1 :] == 0).all()
    row1 = free[1].tolist()
    stop1 = row1.index(eos) if eos in row1 else None
    if stop1 is None:
        assert torch.equal(out[1], free[1])
    else:
        assert torch.equal(out[1, : stop1 + 1], free[1, : stop1 + 1]) and (out[1, stop1 + 1 :] == 0).all()
    # A single sequence stops as soon as it emits EOS.
    one = generate(model, x[:1], max_new_tokens=10, eos_token_id=[eos, 999])
    assert one.shape[1] == 5 + s + 1 and int(one[0, -1]) == eos


def test_stop_strings():
    tok = tiny_hf_tokenizer()
    model = BalconyModel(tiny_base(vocab_size=len(tok)), BalconyConfig(exit_layers=EXITS))
    x = torch.randint(4, len(tok), (1, 5), generator=torch.Generator().manual_seed(3))
    free = generate(model, x, max_new_tokens=10)[0, 5:].tolist()
    stop = tok.decode([free[3]])
    # The first step whose decoded output contains the stop string ends generation.
    first = next(i for i in range(10) if stop in tok.decode(free[: i + 1]))
    out = generate(model, x, max_new_tokens=10, stop_strings=[stop], tokenizer=tok)
    assert out[0, 5:].tolist() == free[: first + 1]
    with pytest.raises(ValueError, match="need a tokenizer"):
        generate(model, x, max_new_tokens=3, stop_strings=["x"])


def test_eager_attention_masks():
    base = tiny_base()
    base.config._attn_implementation = "eager"
    model = BalconyModel(base, BalconyConfig(exit_layers=EXITS))
    a, b = ids(1, 6, seed=1), ids(1, 3, seed=2)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    out = generate(model, batch, mask, exit="M", max_new_tokens=5)
    assert torch.equal(out[0], reference_greedy(model, a, "M", 5)[0])
    assert torch.equal(out[1, 6:], reference_greedy(model, b, "M", 5)[0, 3:])


def test_model_generate_and_compile_flag():
    model = make()
    x = ids(t=5)
    ref = generate(model, x, exit="S", max_new_tokens=5)
    assert torch.equal(model.generate(x, exit="S", max_new_tokens=5), ref)
    # Dynamo tracing of the decode step (the "eager" backend skips inductor's C++ build, which takes
    # ~40 s on 2 cores; compile=True uses inductor).
    torch._dynamo.reset()
    assert torch.equal(generate(model, x, exit="S", max_new_tokens=5, compile="eager"), ref)
    with pytest.raises(ValueError, match="return_stats=True needs speculative=True"):
        model.generate(x, return_stats=True)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(max_new_tokens=0), "max_new_tokens=0 must be an integer >= 1"),
        (dict(max_new_tokens=-3), "max_new_tokens=-3"),
        (dict(temperature=0.0, do_sample=True), "temperature=0.0 must be > 0"),
        (dict(top_p=0.0, do_sample=True), r"top_p=0.0 must be in \(0, 1\]"),
        (dict(exit="XXL"), "unknown budget 'XXL'"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(make(), ids(), **kwargs)


def test_empty_prompts_are_refused():
    model = make()
    with pytest.raises(ValueError, match=r"the prompt is empty .*shape \(1, 0\)"):
        generate(model, torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"the prompt of sequence\(s\) \[1\] is empty"):
        generate(model, ids(2, 3), torch.tensor([[1, 1, 1], [0, 0, 0]]))


def test_right_padded_batches_are_refused_everywhere():
    """Right padding would put new tokens after pad positions and decode them wrongly: a clear error instead."""
    model = make()
    right = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    for call in (
        lambda: generate(model, ids(2, 4), right, max_new_tokens=2),
        lambda: model.generate(ids(2, 4), right, exit="S", max_new_tokens=2),
        lambda: model.generate(ids(2, 4), right, exit="S", speculative=True, max_new_tokens=2),
    ):
        with pytest.raises(ValueError, match=r"sequence\(s\) \[1\] end in padding .*pad prompts on the left"):
            call()
    left = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    assert generate(model, ids(2, 4), left, max_new_tokens=2).shape == (2, 6)


def test_bench_runs_on_a_tiny_model(tmp_path):
    from balcony.bench.report import format_table, plot
    from balcony.bench.speed import run_bench

    tok = tiny_hf_tokenizer()
    model = BalconyModel(tiny_base(vocab_size=len(tok)), BalconyConfig(exit_layers=EXITS))
    result = run_bench(model, tok, max_new_tokens=4, prompt_tokens=8, repeats=1, draft=DraftOptions(draft_length=2), batch_size=2, log=lambda s: None)
    assert [r["budget"] for r in result["budgets"]] == ["S", "M", "L", "XL"]
    assert result["budgets"][-1]["speedup"] == 1.0 and result["budgets"][-1]["ideal_speedup"] == 1.0
    assert all(r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 for r in result["budgets"])
    assert {"batch1", "batch2", "engine_batch2"} <= set(result["hf"])
    assert [r["exit_layer"] for r in result["speculative"]] == EXITS
    assert all(0 <= r["acceptance_rate"] <= 1 and r["hf_layerskip_tok_s"] > 0 for r in result["speculative"])
    table = format_table(result)
    assert "efficiency" in table and "HF generate, batch 1" in table and "HF LayerSkip" in table
    if importlib.util.find_spec("matplotlib") is not None:
        assert plot(result, tmp_path / "bench.png") and (tmp_path / "bench.png").stat().st_size > 1000
    else:
        assert plot(result, tmp_path / "bench.png") is False


def test_bench_command_writes_json_and_chart(tmp_path, tiny_model_dir, capsys):
    import json

    from balcony.cli import main

    args = ["bench", "--model", str(tiny_model_dir), "--exit-layers", "2,4", "--max-new-tokens", "3", "--prompt-tokens", "4"]
    assert main(args + ["--repeats", "1", "--batch-size", "2", "--no-hf", "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert [r["exit_layer"] for r in result["budgets"]] == [2, 4, 6] and result["exits_trained"] is False
    assert "efficiency" in capsys.readouterr().out


def test_bench_compiles_every_budget(tmp_path):
    from balcony.bench.report import format_table
    from balcony.bench.speed import run_bench

    tok = tiny_hf_tokenizer()
    model = BalconyModel(tiny_base(vocab_size=len(tok)), BalconyConfig(exit_layers=EXITS))
    torch._dynamo.reset()
    try:
        result = run_bench(model, tok, max_new_tokens=3, prompt_tokens=4, repeats=1, hf=False, speculative=False, compile="eager", log=lambda s: None)
    finally:
        torch._dynamo.reset()
    assert result["compile_backend"] == "eager" and result["device"] == "cpu"
    assert all(r["compiled_decode_tok_s"] > 0 and r["compiled_over_eager"] > 0 for r in result["budgets"])
    assert set(result["compiled"]) == {f"engine_c:{j}" for j in model.budgets.values()} | {"engine_c"}
    assert "compiled tok/s" in format_table(result) and "torch.compile (eager)" in format_table(result)
