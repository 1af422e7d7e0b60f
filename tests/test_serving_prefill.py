"""Chunked, cancellable prefill: the engine side of the server's deadlines (issue 23, item 3).

The server abandons a request whose client left or whose deadline passed; a
long prompt is the case where that matters, so the engine prefills in chunks
(`DecodeOptions.prefill_chunk`) and asks `cancel()` between them. Chunked
prefill must decode exactly what one pass decodes.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, VOCAB, tiny_base

from balcony import BalconyConfig, BalconyModel
from balcony.inference.cache import budget_slots
from balcony.inference.engine import generate, generate_stream, prefill
from balcony.inference.options import DecodeOptions
from balcony.inference.spans import new_state


def make(family: str = "llama", attn: str = "sdpa") -> BalconyModel:
    base = tiny_base(family)
    base.config._attn_implementation = attn
    return BalconyModel(base, BalconyConfig(exit_layers=[2, 3, 5]))


def ids(b: int, t: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(p.shape[1] for p in prompts)
    batch = torch.cat([torch.cat([torch.zeros(1, width - p.shape[1], dtype=torch.long), p], 1) for p in prompts])
    mask = torch.cat([(torch.arange(width) >= width - p.shape[1]).long()[None] for p in prompts])
    return batch, mask


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("chunk", [1, 3, 16, 17])  # 1 and 3: the fast path; 17: the HF layers; 16: both
def test_chunked_prefill_decodes_the_same_tokens(family, chunk):
    model = make(family)
    x = ids(1, 23, seed=7)
    batch, mask = padded([ids(1, 21, seed=8), ids(1, 9, seed=9)])  # mistral's sliding window (5) is crossed too
    for budget in ("S", "XL"):
        one = generate(model, x, exit=budget, max_new_tokens=8)
        assert torch.equal(generate(model, x, exit=budget, max_new_tokens=8, prefill_chunk=chunk), one), (budget, chunk)
        one = generate(model, batch, mask, exit=budget, max_new_tokens=6)
        assert torch.equal(generate(model, batch, mask, exit=budget, max_new_tokens=6, prefill_chunk=chunk), one), (budget, chunk)


@pytest.mark.parametrize("family, attn", [("llama", "sdpa"), ("qwen2", "eager"), ("mistral", "sdpa"), ("gemma", "eager")])
@pytest.mark.parametrize("padded_batch", [False, True])
def test_chunked_prefill_writes_the_same_cache_and_logits(family, attn, padded_batch):
    # Tokens of a tiny random model barely depend on positions; the cache's rotated keys do, exactly.
    model = make(family, attn)
    x, mask = padded([ids(1, 19, seed=3), ids(1, 11, seed=4)]) if padded_batch else (ids(2, 19, seed=3), None)
    with torch.no_grad():
        for budget, j in model.budgets.items():
            states, logits = [], []
            for chunk in (None, 4):
                state = new_state(model, budget_slots(model, j), 2, 24, mask)
                logits.append(prefill(model, state, x, j, mask, chunk=chunk))
                states.append(state)
            torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=0)
            assert states[0].length == states[1].length == 19
            for s in states[0].cache.slots:
                a, b = states[0].cache.layers[s], states[1].cache.layers[s]
                assert a.filled == b.filled == 19, (budget, s)
                torch.testing.assert_close(b.keys[:, :, :19], a.keys[:, :, :19], atol=1e-5, rtol=0)
                torch.testing.assert_close(b.values[:, :, :19], a.values[:, :, :19], atol=1e-5, rtol=0)


class Passes:
    """Counts forward passes (one embedding call each) and says when to cancel."""

    def __init__(self, model: BalconyModel, cancel_after: int):
        self.n = 0
        self.cancel_after = cancel_after
        self.handle = model.parts.embed_tokens.register_forward_hook(self._hook)

    def _hook(self, *args) -> None:
        self.n += 1

    def cancel(self) -> bool:
        return self.n >= self.cancel_after


def test_cancel_stops_the_prefill_between_chunks():
    model = make()
    x = ids(1, 40, seed=2)
    passes = Passes(model, cancel_after=3)
    out = list(generate_stream(model, x, exit="S", options=DecodeOptions(max_new_tokens=5, prefill_chunk=8), cancel=passes.cancel))
    assert out == [] and passes.n == 3  # 3 of the 5 chunks ran, then nothing: no token from a partial cache
    passes.handle.remove()


def test_cancel_stops_decoding_between_steps():
    model = make()
    x = ids(1, 10, seed=2)
    passes = Passes(model, cancel_after=4)  # the prefill (1 pass) and 3 decode steps
    out = list(generate_stream(model, x, exit="S", options=DecodeOptions(max_new_tokens=20), cancel=passes.cancel))
    assert len(out) == 4 and passes.n == 4
    passes.handle.remove()
    assert torch.equal(torch.stack(out, 1), generate(model, x, exit="S", max_new_tokens=4)[:, 10:])


def test_cancel_never_true_and_no_chunk_is_todays_decoding():
    model = make()
    x = ids(1, 12, seed=5)
    one = generate(model, x, exit="L", max_new_tokens=6)
    out = list(generate_stream(model, x, exit="L", options=DecodeOptions(max_new_tokens=6), cancel=lambda: False))
    assert torch.equal(torch.stack(out, 1), one[:, 12:])


@pytest.mark.parametrize("bad", [0, -4, 2.5, True])
def test_prefill_chunk_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="prefill_chunk"):
        DecodeOptions(prefill_chunk=bad)
