"""Self-speculative decoding: exactness (greedy), distribution (sampling), rollback, bad input."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from tiny_models import VOCAB, tiny_base

import balcony.inference.speculative as spec
from balcony import BalconyConfig, BalconyModel
from balcony.inference.engine import generate
from balcony.inference.sampling import SamplingConfig
from balcony.inference.speculative import (
    SpeculativeStats,
    accept_drafts,
    speculative_generate,
    speculative_stream,
)

EXITS = [2, 3, 5]


def make(family: str = "llama", **cfg) -> BalconyModel:
    return BalconyModel(tiny_base(family, **cfg.pop("base", {})), BalconyConfig(exit_layers=cfg.pop("exit_layers", EXITS), **cfg))


def ids(b: int = 1, t: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def spec_greedy(model, x, exit, gamma, n=16, **kw):
    return model.generate(x, exit=exit, speculative=True, draft_length=gamma, max_new_tokens=n, return_stats=True, **kw)


# ------------------------------------------------------------------------ greedy is exact
@pytest.mark.parametrize("family", ["llama", "mistral", "phi3"])
def test_greedy_equals_full_depth_greedy(family):
    model = make(family)
    for seed in (1, 2, 3):
        x = ids(t=4 + seed, seed=seed)
        ref = generate(model, x, max_new_tokens=16)
        for exit in ("S", "M", "L"):
            for gamma in (1, 3, 6):
                out, stats = spec_greedy(model, x, exit, gamma)
                assert torch.equal(out, ref), (seed, exit, gamma)
                # Every emitted token is the first one, an accepted draft, or a verifier's token.
                assert stats.generated == 16 and stats.accepted + stats.rounds + 1 >= 16
                assert stats.drafted <= gamma * stats.rounds


def test_greedy_with_adaptive_draft_length():
    model = make()
    x = ids(t=5)
    ref = generate(model, x, max_new_tokens=16)
    for threshold in (0.0, 0.02, 0.05, 0.99):
        out, stats = spec_greedy(model, x, "M", 4, draft_threshold=threshold)
        assert torch.equal(out, ref), threshold
    assert stats.drafted < 4 * stats.rounds  # an untrained exit is rarely sure: drafts stop early


def _identity_tail(model: BalconyModel, j: int) -> None:
    """Make layers j+1..N add exactly zero, so the hidden state after layer j is the final one."""
    with torch.no_grad():
        for layer in model.parts.layers[j:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()


def test_every_draft_accepted():
    # A norm exit at layer 3 (initialised from the final norm) on a model whose layers 4..6 add
    # nothing: the exit's logits are the full model's, so every draft must be accepted.
    model = make(exit_kind="norm")
    _identity_tail(model, 3)
    x = ids(t=5)
    ref = generate(model, x, max_new_tokens=17)
    for gamma in (1, 2, 4):
        out, stats = spec_greedy(model, x, 3, gamma, n=17)
        assert torch.equal(out, ref)
        assert stats.accepted == stats.drafted > 0 and stats.acceptance_rate == 1.0
        assert stats.mean_accepted_length == pytest.approx(1 + stats.drafted / stats.rounds)
    # Sampling: p == q, so nothing is ever rejected either.
    out, stats = spec_greedy(model, x, 3, 4, n=17, do_sample=True, generator=torch.Generator().manual_seed(0))
    assert stats.acceptance_rate == 1.0


def test_every_draft_rejected():
    # A zero norm weight makes the exit's logits all zero: it always drafts token 0, which this
    # model never emits, so every draft is rejected and every token comes from the verifier.
    model = make()
    with torch.no_grad():
        model.exits["2"].norm.weight.zero_()
    x = ids(t=5, seed=4)
    ref = generate(model, x, max_new_tokens=12)
    assert 0 not in ref[0, 5:].tolist()
    for gamma in (1, 3):
        out, stats = spec_greedy(model, x, "S", gamma, n=12)
        assert torch.equal(out, ref)
        assert stats.accepted == 0 and stats.drafted > 0 and stats.mean_accepted_length == 1.0


def test_rollback_keeps_caches_consistent():
    # After each round every slot's write pointer is at the committed length (the exit's may lag by
    # the carried-over positions); a bookkeeping slip would raise ("writing at ... only ... filled").
    model = make()
    seen = []
    orig = spec.accept_drafts

    def spy(p, q, drafts, cfg, generator=None):
        a, nxt = orig(p, q, drafts, cfg, generator)
        seen.append((drafts.shape[0], a))
        return a, nxt

    spec.accept_drafts = spy
    try:
        out, stats = spec_greedy(model, ids(t=5, seed=5), "M", 3, n=20)
    finally:
        spec.accept_drafts = orig
    assert any(a < k for k, a in seen) and any(a == k > 0 for k, a in seen), seen  # both paths exercised
    assert stats.rounds == len(seen)


def test_batch_is_decoded_row_by_row():
    model = make()
    a, b = ids(1, 6, seed=7), ids(1, 3, seed=8)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    out, stats = speculative_generate(model, batch, mask, exit="S", draft_length=3, max_new_tokens=8)
    assert torch.equal(out[0, 6:], generate(model, a, max_new_tokens=8)[0, 6:])
    assert torch.equal(out[1, 6:], generate(model, b, max_new_tokens=8)[0, 3:])
    assert stats.generated == 16
    with pytest.raises(ValueError, match="decodes one sequence, got batch size 2"):
        next(speculative_stream(model, batch, mask))


def test_eos_stops_speculative_decoding():
    model = make()
    x = ids(t=5, seed=9)
    free = generate(model, x, max_new_tokens=12)[0, 5:].tolist()
    s = next(i for i in range(1, 12) if free[i] not in free[:i])
    out, stats = spec_greedy(model, x, "S", 4, n=12, eos_token_id=free[s])
    assert out[0, 5:].tolist() == free[: s + 1] and stats.generated == s + 1


# ------------------------------------------------------------------------ sampling
def test_sampling_is_reproducible():
    model = make()
    x = ids(t=5)
    kw = dict(exit="S", speculative=True, draft_length=3, max_new_tokens=12, do_sample=True, temperature=1.3)
    a = model.generate(x, generator=torch.Generator().manual_seed(3), **kw)
    b = model.generate(x, generator=torch.Generator().manual_seed(3), **kw)
    c = model.generate(x, generator=torch.Generator().manual_seed(4), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


def _chi2_critical(dof: int, alpha_z: float = 3.09) -> float:
    """Wilson-Hilferty upper quantile of chi-square (z = 3.09: p = 0.001)."""
    return dof * (1 - 2 / (9 * dof) + alpha_z * math.sqrt(2 / (9 * dof))) ** 3


def _chi2(counts: Counter, probs: dict, n: int) -> tuple[float, int]:
    """Pearson statistic, pooling cells expected below 5 into one."""
    stat, pooled_obs, pooled_exp, cells = 0.0, 0, 0.0, 0
    for key, p in probs.items():
        if n * p >= 5:
            stat += (counts.get(key, 0) - n * p) ** 2 / (n * p)
            cells += 1
        else:
            pooled_obs += counts.get(key, 0)
            pooled_exp += n * p
    pooled_obs += sum(c for k, c in counts.items() if k not in probs)
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        cells += 1
    return stat, cells - 1


def test_acceptance_rule_reproduces_the_target_distribution():
    # The rule alone, many times: the first token emitted must follow p[0] whatever q is.
    torch.manual_seed(0)
    v, k = 6, 2
    p = torch.softmax(torch.randn(k + 1, v) * 1.5, -1)
    q = torch.softmax(torch.randn(k, v) * 1.5, -1)
    cfg = SamplingConfig(do_sample=True)
    g = torch.Generator().manual_seed(1)
    n = 6000

    def first_tokens(rule) -> Counter:
        out = Counter()
        for _ in range(n):
            drafts = torch.multinomial(q, 1, generator=g).flatten()
            a, nxt = rule(p, q, drafts, cfg, g)
            out[int(drafts[0]) if a >= 1 else int(nxt)] += 1
        return out

    target = {t: float(p[0, t]) for t in range(v)}
    stat, dof = _chi2(first_tokens(accept_drafts), target, n)
    assert stat < _chi2_critical(dof), stat

    def resample_from_p(p, q, drafts, cfg, generator=None):  # the classic bug: p instead of norm(max(0, p - q))
        a, _ = accept_drafts(p, q, drafts, cfg, generator)
        return a, torch.multinomial(p[a], 1, generator=generator)

    stat, dof = _chi2(first_tokens(resample_from_p), target, n)
    assert stat > _chi2_critical(dof), stat  # the test has the power to see a broken rule


def _sharp_tiny(vocab: int = 8) -> BalconyModel:
    model = make(base=dict(vocab_size=vocab))
    with torch.no_grad():
        model.base.lm_head.weight.mul_(10)  # random init gives near-uniform logits: sharpen them (p, q differ by TV 0.35)
    return model


def _exact_distribution_of_tokens_2_3(model: BalconyModel, x: torch.Tensor) -> dict:
    """P(t2 = b, t3 = c) under the full model, summing over t1 (t1 comes from the prefill, not a draft)."""
    with torch.no_grad():
        p1 = model(x).logits[0, -1].softmax(-1)  # (V,)
        v = p1.shape[0]
        a = torch.arange(v)
        p2 = model(torch.cat([x.repeat(v, 1), a[:, None]], 1)).logits[:, -1].softmax(-1)  # (V, V): p(t2 | t1)
        ab = torch.cartesian_prod(a, a)  # (V*V, 2)
        p3 = model(torch.cat([x.repeat(v * v, 1), ab], 1)).logits[:, -1].softmax(-1).view(v, v, v)  # p(t3 | t1, t2)
        joint = (p1[:, None, None] * p2[:, :, None] * p3).sum(0)  # (V, V)
    return {(b, c): float(joint[b, c]) for b in range(v) for c in range(v)}


def _speculative_tokens_2_3(model: BalconyModel, x: torch.Tensor, n: int, **kw) -> Counter:
    # Tokens 2 and 3 are drafted at S in the first round (draft_length 2) and verified.
    g = torch.Generator().manual_seed(0)
    pairs = Counter()
    for _ in range(n):
        toks = list(speculative_stream(model, x, exit="S", draft_length=2, max_new_tokens=4, do_sample=True, generator=g, **kw))
        pairs[(int(toks[1]), int(toks[2]))] += 1
    return pairs


def test_speculative_sampling_matches_the_full_model_distribution(monkeypatch):
    model = _sharp_tiny()
    x = torch.tensor([[3, 5, 7, 2]])
    exact = _exact_distribution_of_tokens_2_3(model, x)
    n = 800
    stat, dof = _chi2(_speculative_tokens_2_3(model, x, n), exact, n)
    assert stat < _chi2_critical(dof), (stat, dof)

    # Break the rule (accept every draft): the same statistic must now reject.
    def accept_all(p, q, drafts, cfg, generator=None):
        k = drafts.shape[0]
        return k, torch.multinomial(p[k], 1, generator=generator)

    monkeypatch.setattr(spec, "accept_drafts", accept_all)
    stat, dof = _chi2(_speculative_tokens_2_3(model, x, 200), exact, 200)
    assert stat > _chi2_critical(dof), (stat, dof)


# ------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(draft_length=0), "draft_length=0 must be an integer >= 1"),
        (dict(draft_length=-2), "draft_length=-2"),
        (dict(exit="XL"), "needs a draft exit below the full model: exit='XL' is layer 6 of 6"),
        (dict(exit=None), "exit=None is layer 6 of 6"),
        (dict(max_new_tokens=0), "max_new_tokens=0 must be an integer >= 1"),
        (dict(draft_threshold=1.5), "draft_threshold=1.5 must be in"),
        (dict(exit="XXL"), "unknown budget 'XXL'"),
        (dict(draft_vocab=0), "draft_vocab=0 must be an integer >= 1"),
        (dict(draft_width=0), "draft_width=0 must be an integer >= 1"),
        (dict(draft_width=2, draft_length=3), "draft_width=2 drafts several candidates .* draft_length=3"),
        (dict(draft_width=2, draft_length=1, do_sample=True), "needs greedy decoding .*do_sample=True"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    model = make()
    kwargs = {"exit": "S", **kwargs}
    with pytest.raises(ValueError, match=match):
        model.generate(ids(), speculative=True, **kwargs)


def test_empty_prompt_is_refused():
    with pytest.raises(ValueError, match=r"the prompt is empty .*shape \(1, 0\)"):
        make().generate(torch.zeros(1, 0, dtype=torch.long), exit="S", speculative=True)


def test_stats_dict():
    stats = SpeculativeStats(draft_exit=2, draft_length=4, rounds=4, drafted=16, accepted=8, generated=13)
    d = stats.to_dict()
    assert d["acceptance_rate"] == 0.5 and d["mean_accepted_length"] == 3.0 and d["draft_exit"] == 2


def test_cli_generate_speculative(tmp_path, tiny_model_dir, capsys):
    from balcony.cli import main

    args = ["generate", "hello world", "--model", str(tiny_model_dir), "--max-new-tokens", "6", "--no-chat"]
    assert main(args + ["--budget", "S", "--speculative", "--draft-length", "3"]) == 0
    err = capsys.readouterr().err
    assert "speculative: draft budget S (layers 1-3 + exit), verify layers 4-6" in err and "tokens per verify pass" in err
    assert main(args + ["--budget", "XL", "--speculative"]) == 2
    assert "needs a draft exit below the full model" in capsys.readouterr().err


# ------------------------------------------------------------------------ cheaper drafts
def test_draft_vocabulary_keeps_greedy_exact():
    model = make()
    x = ids(t=5, seed=2)
    ref = generate(model, x, max_new_tokens=16)
    for vocab in (1, 20, 60, VOCAB, 10 * VOCAB):
        for threshold in (None, 0.05):
            out, stats = spec_greedy(model, x, "M", 2, draft_vocab=vocab, draft_threshold=threshold)
            assert torch.equal(out, ref), (vocab, threshold)
    # One draft id (token 0, which this model never emits): nothing is ever accepted.
    assert 0 not in ref[0, 5:].tolist()
    out, stats = spec_greedy(model, x, "M", 2, draft_vocab=1)
    assert stats.drafted > 0 and stats.accepted == 0


def test_draft_vocabulary_keeps_the_sampling_distribution():
    # Drafts among the first 4 of 8 ids: q has no mass on the others, the rule must still give p.
    model = _sharp_tiny()
    x = torch.tensor([[3, 5, 7, 2]])
    exact = _exact_distribution_of_tokens_2_3(model, x)
    n = 600
    stat, dof = _chi2(_speculative_tokens_2_3(model, x, n, draft_vocab=4), exact, n)
    assert stat < _chi2_critical(dof), (stat, dof)


@pytest.mark.parametrize("family", ["llama", "mistral", "phi3"])
def test_draft_width_greedy_equals_full_depth_greedy(family):
    model = make(family)
    for seed in (1, 2):
        x = ids(t=4 + seed, seed=seed)
        ref = generate(model, x, max_new_tokens=16)
        for exit in ("S", "L"):
            for width in (2, 3):
                for threshold in (None, 0.1):
                    out, stats = spec_greedy(model, x, exit, 1, draft_width=width, draft_threshold=threshold)
                    assert torch.equal(out, ref), (seed, exit, width, threshold)
                    assert stats.generated == 16 and stats.accepted <= stats.drafted <= stats.rounds


def test_draft_width_accepts_a_second_candidate(monkeypatch):
    # Exit 3 sees exactly the full model's logits (the tail adds nothing); the draft head demotes its top token
    # to second place, so the accepted candidate is always the second one: its K/V must move to the next index.
    model = make(exit_kind="norm")
    _identity_tail(model, 3)
    x = ids(t=5)
    ref = generate(model, x, max_new_tokens=17)

    def demote_top(head, rows):
        def run(h):
            logits = head(h)
            top = logits.topk(3, -1)  # the top token's logit goes between the 2nd and the 3rd
            return logits.scatter(-1, top.indices[..., :1], (top.values[..., 1:2] + top.values[..., 2:3]) / 2)

        return run

    monkeypatch.setattr(spec, "head_rows", demote_top)
    out, stats = spec_greedy(model, x, 3, 1, n=17, draft_width=2, draft_vocab=VOCAB)
    assert torch.equal(out, ref)
    assert stats.accepted == stats.drafted == stats.rounds > 0
    # With one candidate (the demoted, wrong one) nothing would be accepted.
    out, stats = spec_greedy(model, x, 3, 1, n=17, draft_vocab=VOCAB)
    assert torch.equal(out, ref) and stats.accepted == 0
