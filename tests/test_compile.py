"""The decode step is static in shape: compiled once (fullgraph), never again across steps, no host reads per token."""

from __future__ import annotations

import contextlib

import pytest
import torch
from tiny_models import VOCAB, tiny_base
from torch._dynamo.utils import counters

from balcony import BalconyConfig, BalconyModel
from balcony.inference.cache import budget_slots, kv_pool
from balcony.inference.engine import decode_one_token, generate, generate_stream, prefill
from balcony.inference.spans import new_state

EXITS = [2, 3, 5]


def make(family: str = "llama", **base) -> BalconyModel:
    return BalconyModel(tiny_base(family, **base), BalconyConfig(exit_layers=EXITS))


def ids(b: int = 1, t: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def compiled_graphs() -> int:
    """Graphs dynamo has traced since the last `torch._dynamo.reset()` (each recompile adds one)."""
    return counters["stats"]["unique_graphs"]


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


# fast path (llama), HF's own layers (phi3, gemma), a sliding window (mistral: window 5 < prompt + new tokens)
@pytest.mark.parametrize("family", ["llama", "phi3", "gemma", "mistral"])
def test_decode_step_is_traced_once_for_every_step_and_generation(family, fresh_dynamo):
    model = make(family)
    prompts = [ids(t=6, seed=1), ids(t=9, seed=2)]
    refs = [generate(model, x, exit="S", max_new_tokens=10) for x in prompts]
    for x, ref in zip(prompts, refs):
        # fullgraph=True: a graph break would raise; "eager" traces with dynamo and runs the graph as is.
        assert torch.equal(generate(model, x, exit="S", max_new_tokens=10, compile="eager"), ref)
    assert compiled_graphs() == 1  # 9 steps x 2 generations (prompts of 6 and 9 tokens), one trace


def test_padded_batches_and_eager_attention_compile_once(fresh_dynamo):
    model = make()
    batch = torch.cat([ids(1, 7, seed=1), torch.cat([torch.zeros(1, 3, dtype=torch.long), ids(1, 4, seed=2)], 1)])
    mask = torch.tensor([[1] * 7, [0, 0, 0, 1, 1, 1, 1]])
    ref = generate(model, batch, mask, exit="M", max_new_tokens=8)
    assert torch.equal(generate(model, batch, mask, exit="M", max_new_tokens=8, compile="aot_eager"), ref)
    assert compiled_graphs() == 1
    base = tiny_base()
    base.config._attn_implementation = "eager"
    eager = BalconyModel(base, BalconyConfig(exit_layers=EXITS))
    ref = generate(eager, batch, mask, exit="M", max_new_tokens=8)
    assert torch.equal(generate(eager, batch, mask, exit="M", max_new_tokens=8, compile="eager"), ref)
    assert compiled_graphs() == 2  # a second model: its own trace, and still one


def test_each_budget_is_one_trace(fresh_dynamo):
    model = make()
    x = ids()
    for budget in model.budgets:
        for _ in range(2):
            generate(model, x, exit=budget, max_new_tokens=6, compile="eager")
    assert compiled_graphs() == len(model.budgets)


def test_compiled_generations_reuse_pooled_buffers(fresh_dynamo):
    # CUDA graphs replay reads and writes fixed addresses: each generation of the same shape must get the same
    # K/V tensors back (from the model's pool), and a generation running beside another must not share them.
    model = make()
    x = ids()
    list(generate_stream(model, x, exit="S", max_new_tokens=4, compile="eager"))
    pool = kv_pool(model)
    held = {key: [kv[0].data_ptr() for kv in stack] for key, stack in pool.free.items()}
    assert len(held) == len(budget_slots(model, 2)) and all(len(v) == 1 for v in held.values())
    a = generate_stream(model, x, exit="S", max_new_tokens=4, compile="eager")
    first = next(a)
    assert all(not stack for stack in pool.free.values())  # taken by the running generation
    b = list(generate_stream(model, x, exit="S", max_new_tokens=4, compile="eager"))  # beside `a`: buffers of its own
    rest = [first, *a]  # `a` runs to its end and gives its buffers back
    assert torch.equal(torch.stack(rest, 1), torch.stack(b, 1))
    assert sum(len(s) for s in pool.free.values()) == 2 * len(held)  # both sets back: a's and b's own
    assert {p for v in held.values() for p in v} <= {kv[0].data_ptr() for s in pool.free.values() for kv in s}


def test_static_step_equals_the_dynamic_one():
    # The dynamic step (`forward_budget` on one token: what decoding used before) attends over the filled slice at
    # Python-int positions. The eager static step, reading its position from the device, does the same computation
    # bit for bit; the whole-cache step (the compiled shapes, run eagerly here) adds masked positions: exact zeros.
    from balcony.inference.engine import _static_step, forward_budget

    for family in ("llama", "phi3", "mistral"):
        model = make(family)
        x = ids(t=7)
        out = {}
        for variant in ("dynamic", "eager", "whole"):
            state = new_state(model, budget_slots(model, 6), 1, 16)
            with torch.no_grad():
                steps = [prefill(model, state, x, 6)]
                for _ in range(7):
                    token = steps[-1].argmax(-1)
                    if variant == "dynamic":
                        steps.append(forward_budget(model, state, token[:, None], 6)[:, -1])
                    else:
                        steps.append(decode_one_token(model, state, token, 6, _static_step if variant == "whole" else None))
            out[variant] = torch.stack(steps)
        assert torch.equal(out["eager"], out["dynamic"]), family
        torch.testing.assert_close(out["whole"], out["dynamic"], atol=1e-6, rtol=0)
        assert torch.equal(out["whole"].argmax(-1), out["dynamic"].argmax(-1))


# ------------------------------------------------------------------------ host reads
READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def count_host_reads():
    """Count every tensor -> Python conversion (each one waits for the device on an accelerator)."""
    count = {"n": 0}
    saved = {name: getattr(torch.Tensor, name) for name in READS}

    def counting(name):
        real = saved[name]

        def read(self, *args, **kwargs):
            count["n"] += 1
            return real(self, *args, **kwargs)

        return read

    for name in READS:
        setattr(torch.Tensor, name, counting(name))
    try:
        yield count
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_decode_steps_read_nothing_back(family):
    model = make(family)
    batch = torch.cat([ids(1, 7, seed=1), torch.cat([torch.zeros(1, 3, dtype=torch.long), ids(1, 4, seed=2)], 1)])
    mask = torch.tensor([[1] * 7, [0, 0, 0, 1, 1, 1, 1]])
    stream = generate_stream(model, batch, mask, exit="L", max_new_tokens=12, do_sample=True, top_k=5,
                             generator=torch.Generator().manual_seed(0))
    next(stream)  # prompt checks and prefill may read (once per generation)
    with count_host_reads() as reads:
        steps = list(stream)
    assert len(steps) == 11 and reads["n"] == 0


@pytest.mark.parametrize("sampling", [False, True])
def test_speculative_rounds_read_back_once_plus_the_emitted_ids(sampling):
    # Per round: the accepted count (it decides what is emitted and where the next round writes) and, in the
    # same pause, the emitted ids (EOS checks on the host). Not one read per emitted token.
    from balcony.inference.speculative import SpeculativeStats, speculative_stream

    model = make()
    with torch.no_grad():
        model.base.lm_head.weight.mul_(10)  # sharp distributions: the exit and the full model disagree, drafts get rejected
    x = ids(t=5)
    kw = dict(do_sample=True, generator=torch.Generator().manual_seed(1)) if sampling else {}
    stats = SpeculativeStats(2, 3)
    stream = speculative_stream(model, x, exit="S", draft_length=3, max_new_tokens=24, eos_token_id=[VOCAB + 5], stats=stats, **kw)
    next(stream)
    with count_host_reads() as reads:
        rest = list(stream)
    assert len(rest) == 23 and 0 < stats.accepted < stats.drafted  # rounds that accept some drafts and reject others
    assert reads["n"] <= 2 * stats.rounds, (reads["n"], stats.rounds, stats.accepted)
