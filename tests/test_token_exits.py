"""Token-level exits (exit="auto"): the endpoints, complete KV caches, the per-token rule, batches, bad input."""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB, tiny_base

from balcony import (
    BalconyConfig,
    BalconyModel,
    ExitPolicy,
    generate,
    token_exit_generate,
)
from balcony.inference.cache import StaticKVCache
from balcony.inference.token_exits import TokenExitStats, checkpoints, confidence

EXITS = [2, 3, 5]


def make(family="llama", dtype=torch.float64, seed=0):
    model = BalconyModel(tiny_base(family, dtype=dtype), BalconyConfig(exit_layers=EXITS))
    torch.manual_seed(seed)
    with torch.no_grad():  # exits off their init, and sharper (larger norm gains), so confidences spread out
        for ex in model.exits.values():
            for p in ex.layer.parameters():
                p.add_(0.05 * torch.randn_like(p))
            ex.norm.weight.mul_(4.0)
    return model.eval()


def ids(b=1, t=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (b, t), generator=g)


def rule_reference(model, prompt, tau, new_tokens):
    """Greedy decoding by the per-token rule, each step a full forward of every exit over the whole sequence."""
    seq = prompt.clone()
    layers = []
    with torch.no_grad():
        for _ in range(new_tokens):
            chosen = None
            for j in EXITS:
                logits = model(seq, exit=j).logits[:, -1]
                if float(confidence(logits)) > tau:
                    chosen, depth = logits.argmax(-1), j
                    break
            if chosen is None:
                chosen, depth = model(seq, exit=None).logits[:, -1].argmax(-1), model.num_layers
            layers.append(depth)
            seq = torch.cat([seq, chosen[:, None]], 1)
    return seq, layers


def mixed_threshold(model, prompt):
    """A threshold at which tokens leave at different exits (the median confidence of the first exit)."""
    with torch.no_grad():
        conf = confidence(model(prompt, exit=EXITS[0]).logits[0])
    return float(conf.median())


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_threshold_one_is_the_full_model_and_zero_is_budget_s(family):
    model = make(family, dtype=torch.float32)
    x = ids(t=7)
    for tau, budget in ((1.0, None), (0.0, "S")):
        out, stats = token_exit_generate(model, x, threshold=tau, max_new_tokens=12)
        assert torch.equal(out, generate(model, x, exit=budget, max_new_tokens=12)), (family, tau)
        assert stats.counts == {model.resolve_exit(budget): 12}
    # Sampling with the same seeded generator: threshold 0 draws exactly budget S's tokens too.
    kw = dict(max_new_tokens=10, do_sample=True, temperature=1.2, top_k=20)
    a = token_exit_generate(model, x, threshold=0.0, generator=torch.Generator().manual_seed(5), **kw)[0]
    assert torch.equal(a, generate(model, x, exit="S", generator=torch.Generator().manual_seed(5), **kw))


def test_greedy_follows_the_per_token_rule_and_leaves_at_several_exits():
    model = make()
    x = ids(t=8, seed=2)
    tau = mixed_threshold(model, x)
    out, stats = token_exit_generate(model, x, threshold=tau, max_new_tokens=16)
    ref, layers = rule_reference(model, x, tau, 16)
    assert torch.equal(out, ref)
    assert {j: layers.count(j) for j in set(layers)} == stats.counts
    assert len(stats.counts) >= 2 and stats.catchup_positions > 0  # a real mix, with backfill
    assert min(stats.counts) < stats.mean_layers < model.num_layers


def test_every_layer_attends_to_every_earlier_position_with_full_depth_kv(monkeypatch):
    """Each attention call sees K/V for all positions before it, equal to a full-depth recomputation."""
    model = make()
    x = ids(t=5, seed=3)
    tau = mixed_threshold(model, x)
    seen = []
    real = StaticKVCache.update

    def spy(self, k, v, layer_idx, *args, **kwargs):
        keys, values = real(self, k, v, layer_idx, *args, **kwargs)
        seen.append((layer_idx, self.pos, keys.clone(), values.clone()))
        return keys, values

    monkeypatch.setattr(StaticKVCache, "update", spy)
    out, stats = token_exit_generate(model, x, threshold=tau, max_new_tokens=14)
    monkeypatch.setattr(StaticKVCache, "update", real)
    assert len(stats.counts) >= 2 and stats.catchup_positions > 0
    with torch.no_grad():
        ref = {}
        hf_out = model.base(out, use_cache=True)
        base_cache = getattr(hf_out, "cache", None) or hf_out.past_key_values
        for layer in range(model.num_layers):
            ref[layer] = (base_cache.layers[layer].keys, base_cache.layers[layer].values)
        for k, j in enumerate(EXITS):  # an exit's own slot, from the HF-module forward at that budget
            slot = model.num_layers + k
            cache = model(out, exit=j, use_cache=True).cache
            ref[slot] = (cache.layers[slot].keys, cache.layers[slot].values)
    assert {s for s, *_ in seen} == set(ref)
    for slot, pos, keys, values in seen:
        end = keys.shape[2]
        assert end > pos  # the new positions are written at pos; keys cover every position before them
        torch.testing.assert_close(keys, ref[slot][0][:, :, :end], atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(values, ref[slot][1][:, :, :end], atol=1e-9, rtol=1e-9)


def test_a_padded_batch_equals_each_row_alone():
    model = make()
    prompts = [ids(1, 7, seed=4), ids(1, 3, seed=5), ids(1, 5, seed=6)]
    tau = mixed_threshold(model, prompts[0])
    width = max(p.shape[1] for p in prompts)
    batch = torch.cat([torch.cat([torch.zeros(1, width - p.shape[1], dtype=torch.long), p], 1) for p in prompts])
    mask = torch.cat([(torch.arange(width) >= width - p.shape[1]).long()[None] for p in prompts])
    out, stats = token_exit_generate(model, batch, mask, threshold=tau, max_new_tokens=10)
    total = {}
    for row, p in zip(out, prompts):
        alone, s = token_exit_generate(model, p, threshold=tau, max_new_tokens=10)
        assert torch.equal(row[width:], alone[0, p.shape[1]:])
        for j, c in s.counts.items():
            total[j] = total.get(j, 0) + c
    assert stats.counts == total  # each row still leaves where it would alone


def test_model_generate_and_a_subset_of_exits():
    model = make()
    x = ids(t=6, seed=7)
    tau = mixed_threshold(model, x)
    out, stats = model.generate(x, exit="auto", threshold=tau, exits=("M",), max_new_tokens=8, return_stats=True)
    assert set(stats.counts) <= {3, model.num_layers} and stats.checkpoints == [3, 6]
    assert torch.equal(out, token_exit_generate(model, x, policy=ExitPolicy(threshold=tau, exits=(3,)), max_new_tokens=8)[0])
    # A cheaper confidence over the first ids: the endpoints stay exact.
    assert torch.equal(model.generate(x, exit="auto", threshold=1.0, confidence_vocab=20, max_new_tokens=6),
                       model.generate(x, exit=None, max_new_tokens=6))


def test_the_lm_head_runs_once_per_checked_exit_as_the_cost_model_counts():
    """Whole-vocabulary confidence: the head that scored a leaving token also emits it (one head run per
    exit checked). With a confidence vocabulary the full head runs once per token, to emit."""
    model = make()
    x = ids(t=6, seed=3)
    tau = mixed_threshold(model, x)
    runs = []
    hook = model.parts.lm_head.register_forward_hook(lambda mod, inp, out: runs.append(inp[0].shape[:-1].numel()))
    try:
        _, stats = token_exit_generate(model, x, threshold=tau, max_new_tokens=10)
        points = stats.checkpoints
        assert len(stats.counts) > 1  # tokens left at several depths: the count below is not trivial
        assert sum(runs) == sum((points.index(j) + 1) * c for j, c in stats.counts.items())
        runs.clear()
        _, stats = token_exit_generate(model, x, threshold=tau, confidence_vocab=20, max_new_tokens=10)
        assert sum(runs) == stats.tokens == 10
    finally:
        hook.remove()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(threshold=1.5), r"threshold=1.5 must be a number in \[0, 1\]"),
        (dict(threshold=-0.1), r"threshold=-0.1"),
        (dict(threshold=0.5, exits=("XL",)), r"'XL' is the full model, not an exit a token can leave at"),
        (dict(threshold=0.5, exits=("XXL",)), r"unknown budget 'XXL'"),
        (dict(threshold=0.5, confidence_vocab=0), r"confidence_vocab=0 must be an integer >= 1"),
        (dict(threshold=0.5, draft_length=2), r"unexpected decoding option\(s\) \['draft_length'\]"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make().generate(ids(), exit="auto", max_new_tokens=2, **kwargs)


def test_auto_is_a_decoding_mode_not_a_budget():
    model = make()
    with pytest.raises(ValueError, match=r"exit='auto' is token-level exits, a decoding mode"):
        model(ids(), exit="auto")
    with pytest.raises(ValueError, match=r"threshold need\(s\) exit='auto'"):
        model.generate(ids(), exit="S", threshold=0.5, max_new_tokens=2)
    with pytest.raises(ValueError, match="pick one"):
        model.generate(ids(), exit="auto", speculative=True, max_new_tokens=2)
    assert checkpoints(model, ExitPolicy()) == [2, 3, 5, 6]


# ------------------------------------------------------------------ the teacher-forced curve
def test_teacher_forced_decisions_match_decoding():
    """The curve's per-position decisions on a generated sequence are the depths decoding used."""
    from balcony.eval.thresholds import token_scores_of_ids

    model = make()
    x = ids(t=6, seed=8)
    tau = mixed_threshold(model, x)
    out, stats = token_exit_generate(model, x, threshold=tau, max_new_tokens=12)
    _, layers = rule_reference(model, x, tau, 12)
    scores = token_scores_of_ids(model, [out[0].tolist()])
    decided = [scores.checkpoints[k] for k in scores.decide(tau).tolist()]
    assert decided[x.shape[1] - 1 :] == layers[:-1] + decided[-1:] and decided[x.shape[1] - 1 : -1] == layers[:-1]
    assert len(set(layers)) >= 2
    # With a subset of the exits, the same: decoding restricted to M and L decides where the lookup says.
    out, stats = token_exit_generate(model, x, threshold=tau, exits=("M", "L"), max_new_tokens=12)
    scores = token_scores_of_ids(model, [out[0].tolist()])
    pts = scores.points([3, 5])
    decided = [pts[k] for k in scores.decide(tau, [3, 5]).tolist()][x.shape[1] - 1 :]  # the 12 generated tokens
    assert {j: decided.count(j) for j in set(decided)} == stats.counts and set(stats.counts) <= {3, 5, 6}


def test_teacher_forced_decoding_yields_what_the_lookup_scores():
    """Feeding a text's tokens (`teacher_tokens`): the fixed budget yields its teacher-forced argmax, and token-level
    exits decide at the depths and emit the tokens the per-position lookup over the same text gives."""
    from balcony.eval.thresholds import token_scores_of_ids
    from balcony.inference.engine import generate_stream
    from balcony.inference.token_exits import token_exit_stream

    model = make()
    text = ids(1, 20, seed=9)
    prompt, fed = text[:, :8], text[:, 8:]
    new = fed.shape[1] + 1
    with torch.no_grad():
        for budget in ("S", None):
            got = torch.stack(list(generate_stream(model, prompt, exit=budget, max_new_tokens=new, teacher_tokens=fed)), 1)
            assert torch.equal(got[0], model(text, exit=budget).logits[0, 7:].argmax(-1)), budget
    tau = mixed_threshold(model, text)
    stats = TokenExitStats(checkpoints(model, ExitPolicy()))
    got = torch.stack(list(token_exit_stream(model, prompt, threshold=tau, max_new_tokens=new, teacher_tokens=fed, stats=stats)), 1)
    scores = token_scores_of_ids(model, [text[0].tolist()])
    decided = [scores.checkpoints[k] for k in scores.decide(tau).tolist()][7:]  # positions 7..18 (19 has no next token)
    every = decided + [stats_last(stats, model, text, tau)]  # and the last yield, which predicts past the text
    assert {j: every.count(j) for j in set(every)} == stats.counts
    assert len(set(decided)) >= 2
    with torch.no_grad():
        by_layer = {j: model(text, exit=j).logits[0, 7:].argmax(-1) for j in scores.checkpoints}
    assert got[0, :-1].tolist() == [int(by_layer[j][i]) for i, j in enumerate(decided)]
    with pytest.raises(ValueError, match=r"teacher_tokens has shape \(1, 3\)"):
        list(token_exit_stream(model, prompt, threshold=tau, max_new_tokens=new, teacher_tokens=fed[:, :3]))


def stats_last(stats, model, text, tau):
    """The depth at which the last yielded token (predicting past the text's end) was decided."""
    with torch.no_grad():
        for j in stats.checkpoints[:-1]:
            if float(confidence(model(text, exit=j).logits[:, -1])) > tau:
                return j
    return stats.checkpoints[-1]


def test_curve_endpoints_budgets_and_calibration():
    from balcony.eval.thresholds import (
        CurvePoint,
        calibrate,
        curve,
        format_curve,
        token_scores_of_ids,
    )

    model = make()
    windows = [ids(1, 40, seed=s)[0].tolist() for s in range(3)]
    scores = token_scores_of_ids(model, windows, batch_size=2, chunk=7)
    assert scores.positions == 3 * 39
    pts = {p.label: p for p in curve(scores, [0.0, 0.5, 1.0], model=model)}
    s = pts["S"]
    assert pts["full"].agreement == 1.0 and pts["full"].mean_layers == 6
    assert pts["auto@0"].kl == pytest.approx(s.kl) and pts["auto@0"].agreement == pytest.approx(s.agreement)
    assert pts["auto@0"].mean_layers == 2 and pts["auto@0"].fractions[2] == 1.0
    assert pts["auto@1"].kl == pytest.approx(0.0, abs=1e-12) and pts["auto@1"].agreement == 1.0 and pts["auto@1"].mean_layers == 6
    assert pts["auto@1"].ideal_speedup < 1.0  # every exit checked for nothing: slower than the full model
    assert s.ideal_speedup == pytest.approx(pts["auto@0"].ideal_speedup)  # the whole head scores and emits: S's cost
    cheap = token_scores_of_ids(model, windows, policy=ExitPolicy(confidence_vocab=20))
    at0 = curve(cheap, [0.0], model=model)[0]
    assert 1.0 < at0.ideal_speedup < s.ideal_speedup  # a separate confidence head costs a little on top
    assert pts["early-exit/S"].kl > 0 and "early-exit/M" in pts
    # KL of a budget from the curve equals the text-metrics path (one metrics implementation underneath).
    from balcony.metrics import kl_per_token

    with torch.no_grad():
        w = torch.tensor([windows[0]])
        ref = kl_per_token(model(w, exit="S").logits[0, :-1], model(w, exit=None).logits[0, :-1])
    assert float(scores.kl[2][:39].mean()) == pytest.approx(float(ref.mean()), rel=1e-9)
    # Calibration: the fastest threshold on the grid that reaches the target.
    target = pts["L"].agreement
    best = calibrate(scores, target)
    assert best.agreement >= target
    grid = [p for p in curve(scores, [i / 200 for i in range(201)]) if p.threshold is not None and p.agreement >= target]
    assert best.ideal_speedup >= max(p.ideal_speedup for p in grid)
    with pytest.raises(ValueError, match="target_agreement=1.5"):
        calibrate(scores, 1.5)
    # A subset of the exits: at threshold 0 every token leaves at the subset's first exit, at that budget's cost.
    m_only = curve(scores, [0.0, 0.5], exits=[3], budgets=False)
    assert [p.label for p in m_only] == ["auto@0[M]", "auto@0.5[M]"] and m_only[0].exits == [3]
    assert m_only[0].agreement == pytest.approx(pts["M"].agreement) and m_only[0].ideal_speedup == pytest.approx(pts["M"].ideal_speedup)
    assert set(m_only[1].fractions) == {3, 6}
    with pytest.raises(ValueError, match=r"exits=\[4\]: token-level exits were scored at exit layers \[2, 3, 5\]"):
        curve(scores, [0.5], exits=[4])
    # Searching the exit sets can only find a faster point for the same target, and says which set it used.
    searched = calibrate(scores, target, search_exits=True)
    assert searched.agreement >= target and searched.ideal_speedup >= best.ideal_speedup
    for sub in ([2], [3], [5], [2, 5], [3, 5], [2, 3]):
        ok = [p for p in curve(scores, [i / 200 for i in range(201)], exits=sub, budgets=False) if p.agreement >= target]
        assert searched.ideal_speedup >= max([p.ideal_speedup for p in ok], default=0.0), sub
    assert searched.exits is None or set(searched.exits) < {2, 3, 5}
    assert "auto@0.5" in format_curve(list(pts.values()))
    # The table stays aligned for long labels and plain early exit's astronomical perplexities.
    rows = [CurvePoint("auto@0.0626 (calibrated)", 0.0626, 15.3, 1.41, 1.66, 0.4226, 197.7, {14: 0.86, 30: 0.14}),
            CurvePoint("early-exit/S", None, 14.0, float("nan"), 16.3, 0.1319, 1.528e9)]
    table = format_curve(rows).splitlines()
    assert table[1].split()[:7] == ["auto@0.0626", "(calibrated)", "15.30", "1.41", "1.660", "42.26", "197.7"]
    assert table[2].split()[:5] == ["early-exit/S", "14.00", "16.300", "13.19", "1.528e+09"]


def test_bench_measures_every_threshold_and_budget():
    from tiny_models import tiny_hf_tokenizer

    from balcony.bench.token_exits import format_token_exit_bench, run_token_exit_bench

    tok = tiny_hf_tokenizer()
    model = BalconyModel(tiny_base(vocab_size=len(tok)), BalconyConfig(exit_layers=EXITS))
    prompts = ["hello world the", "a of and to is", "w1 w2 w3", "the a"]
    result = run_token_exit_bench(model, tok, [0.0, 1.0], prompts=prompts, batch_sizes=(1, 2), max_new_tokens=5, repeats=1, log=lambda s: None)
    for b in ("batch1", "batch2"):
        rows = result[b]
        assert set(rows) == {"S", "M", "L", "XL", "auto@0", "auto@1"}
        assert rows["XL"]["speedup"] == 1.0 and rows["XL"]["agreement_along_text"] == 1.0 and rows["XL"]["identical_prefix"] == 1.0
        assert rows["auto@1"]["agreement_along_text"] == 1.0 and rows["auto@1"]["identical_prefix"] == 1.0  # never leaves early
        assert rows["auto@0"]["agreement_along_text"] == rows["S"]["agreement_along_text"]  # always leaves at S
        assert rows["auto@0"]["mean_layers"] == 2 and rows["auto@1"]["mean_layers"] == 6
        assert rows["auto@0"]["tokens_decided"] == 4 * 5  # the stats of one timed run cover every prompt, not the last batch
        assert all(r["decode_tok_s"] > 0 for r in rows.values())
    assert "auto@0" in format_token_exit_bench(result)
    # Along a held-out text (teacher-forced): every run is fed the same tokens, so agreement is the text's.
    g = torch.Generator().manual_seed(4)
    windows = torch.randint(3, len(tok), (4, 9), generator=g).tolist()
    result = run_token_exit_bench(model, tok, [0.0, 1.0], prompts=prompts, batch_sizes=(1, 2), max_new_tokens=5, repeats=1,
                                  text_windows=windows, log=lambda s: None)
    for b in ("text_batch1", "text_batch2"):
        rows = result[b]
        assert rows["auto@1"]["agreement_along_text"] == 1.0 and rows["auto@0"]["mean_layers"] == 2
        assert rows["auto@0"]["agreement_along_text"] == rows["S"]["agreement_along_text"] < 1.0
    with torch.no_grad():  # each window: a 5-token prompt, 4 fed tokens; the 5 yields are positions 4..8 of one forward
        w = torch.tensor(windows)
        same = (model(w, exit="S").logits[:, 4:].argmax(-1) == model(w, exit=None).logits[:, 4:].argmax(-1)).sum()
    assert result["text_batch1"]["S"]["agreement_along_text"] == pytest.approx(float(same) / 20)
    assert "text_batch2:" in format_token_exit_bench(result)
    with pytest.raises(ValueError, match="each needs >= max_new_tokens \\+ 1 = 10"):
        run_token_exit_bench(model, tok, [0.5], prompts=prompts, max_new_tokens=9, text_windows=windows, log=lambda s: None)


def test_cli_generate_bench_and_eval_with_thresholds(tmp_path, tiny_model_dir, capsys):
    import json

    from tiny_models import tiny_hf_tokenizer

    from balcony.cli import main

    model = BalconyModel(tiny_base(vocab_size=len(tiny_hf_tokenizer())), BalconyConfig(exit_layers=EXITS))
    model.save_pretrained(tmp_path / "exits")
    common = ["--model", str(tiny_model_dir), "--exits", str(tmp_path / "exits")]
    assert main(["generate", "hello world", *common, "--budget", "auto", "--threshold", "0.5", "--max-new-tokens", "4", "--no-chat"]) == 0
    assert "token-level exits at threshold 0.5" in capsys.readouterr().err
    assert main(["generate", "hello world", *common, "--budget", "auto", "--threshold", "0", "--auto-exits", "M,L",
                 "--max-new-tokens", "4", "--no-chat"]) == 0
    assert "M 100%, L 0%, XL 0%" in capsys.readouterr().err  # threshold 0 with S excluded: every token leaves at M
    assert main(["generate", "hello", *common, "--budget", "auto", "--auto-exits", "S,Q", "--max-new-tokens", "2"]) == 2
    assert "'Q'" in capsys.readouterr().err
    bench_dir = tmp_path / "bench"
    assert main(["bench", *common, "--thresholds", "0,1", "--max-new-tokens", "3", "--repeats", "1", "--batch-size", "2",
                 "--no-hf", "--no-speculative", "--out", str(bench_dir)]) == 0
    printed = capsys.readouterr().out
    assert "token-level exits" in printed and "auto@1" in printed
    bench = json.loads((bench_dir / "bench.json").read_text())
    assert set(bench["token_exits"]) >= {"batch1", "batch2"}
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(" ".join(f"w{(i * 7 + k) % 40}" for k in range(30)) for i in range(4)))
    out = tmp_path / "eval"
    assert main(["eval", *common, "--text", str(text), "--thresholds", "0,0.5,1", "--calibrate", "L", "--bench-json",
                 str(bench_dir / "bench.json"), "--output", str(out), "--seq-len", "16"]) == 0
    printed = capsys.readouterr().out
    assert "token-level exits on --text" in printed and "(calibrated)" in printed
    meta = json.loads((out / "results.json").read_text())["meta"]
    labels = [p["label"] for p in meta["token_exits"]]
    assert labels[:3] == ["auto@0", "auto@0.5", "auto@1"] and "L" in labels and "early-exit/S" in labels
    assert meta["calibrated"]["agreement"] >= meta["calibrated"]["target_agreement"]
    searched = meta["calibrated_exit_set"]
    assert searched["agreement"] >= searched["target_agreement"] and searched["ideal_speedup"] >= meta["calibrated"]["ideal_speedup"]
    by = {p["label"]: p for p in meta["token_exits"]}
    assert by["auto@1"]["measured_speedup"] == bench["token_exits"]["batch1"]["auto@1"]["speedup"]
    assert (out / "token_exits.png").stat().st_size > 1000
    subset_dir = tmp_path / "bench-subset"
    assert main(["bench", *common, "--thresholds", "0", "--auto-exits", "L", "--max-new-tokens", "3", "--repeats", "1",
                 "--batch-size", "1", "--no-hf", "--no-speculative", "--out", str(subset_dir)]) == 0
    rows = json.loads((subset_dir / "bench.json").read_text())["token_exits"]["batch1"]
    assert rows["auto@0[L]"]["mean_layers"] == 5 and rows["auto@0[L]"]["agreement_along_text"] == rows["L"]["agreement_along_text"]
    text_dir = tmp_path / "bench-text"
    assert main(["bench", *common, "--thresholds", "0,1", "--text", str(text), "--text-windows", "3", "--prompt-tokens", "6",
                 "--max-new-tokens", "3", "--repeats", "1", "--batch-size", "1", "--no-hf", "--no-speculative", "--out", str(text_dir)]) == 0
    runs = json.loads((text_dir / "bench.json").read_text())["token_exits"]
    assert runs["text_windows"] == 3 and runs["text_batch1"]["auto@1"]["agreement_along_text"] == 1.0
    assert main(["bench", *common, "--text", str(text), "--out", str(text_dir)]) == 2
    assert "give --thresholds too" in capsys.readouterr().err
    assert main(["eval", *common, "--thresholds", "0.5,x", "--text", str(text)]) == 2
    assert "'x' is not a number" in capsys.readouterr().err
    assert main(["eval", *common, "--thresholds", "0.5"]) == 2
    assert "--text" in capsys.readouterr().err
