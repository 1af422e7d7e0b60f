"""Checks for an accelerator: equality with HF in float32 and bfloat16, lossless speculative decoding, compiled and
quantized decoding, no host syncs, generators on the device.

Run by scripts/gpu_check.sh; skipped without CUDA unless BALCONY_TEST_DEVICE names a device
(``BALCONY_TEST_DEVICE=cpu pytest -m gpu`` runs them here). Tolerances (docs/gpu.md):

* float32 (TF32 off): the engine's logits at every decode step within 1e-3 (absolute) of HF's forward over
  the same tokens, and greedy tokens identical to HF `generate`'s;
* bfloat16: against HF's bfloat16 forward, mean KL(HF || engine) <= 2e-3 nats per position and the same
  top-1 token at >= 90% of positions (both round differently: different kernels, one cache layout);
* greedy self-speculative decoding in float32: token for token the full-depth greedy output.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from test_compile import count_host_reads
from tiny_models import VOCAB, tiny_base
from torch._dynamo.utils import counters

from balcony import BalconyConfig, BalconyModel
from balcony.inference.cache import budget_slots, kv_pool
from balcony.inference.engine import COMPILE_LENGTH_STEP, compiled_decode, decode_one_token, generate, generate_stream, prefill
from balcony.inference.spans import new_state
from balcony.inference.speculative import speculative_generate
from balcony.modeling.loading import load_base

pytestmark = pytest.mark.gpu

DEVICE = torch.device(os.environ.get("BALCONY_TEST_DEVICE") or "cuda")
# inductor (with CUDA graphs) on CUDA; on the CPU dynamo + AOT autograd only (inductor's C++ build takes minutes there)
BACKEND = os.environ.get("BALCONY_TEST_COMPILE") or ("inductor" if DEVICE.type == "cuda" else "aot_eager")
PROMPT = "The history of astronomy is the story of people looking up at the night sky and trying to explain"


@pytest.fixture(autouse=True)
def strict_float32():
    """TF32 matmuls would round float32 to 10 mantissa bits: off, so float32 means float32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def smollm2():
    """The embedded SmolLM2-135M-Instruct in float32 on the device, with fresh exits at 14/17/20, and its prompt."""
    base, tok = load_base(None, dtype=torch.float32, device=DEVICE)
    model = BalconyModel(base, BalconyConfig(exit_layers=[14, 17, 20]))
    return model, tok(PROMPT, return_tensors="pt").input_ids.to(DEVICE), tok


def tiny(family: str = "llama", dtype: torch.dtype = torch.float32) -> BalconyModel:
    return BalconyModel(tiny_base(family, dtype=dtype), BalconyConfig(exit_layers=[2, 3, 5])).to(DEVICE)


def tiny_ids(t: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, t), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def teacher_forced(model: BalconyModel, ids: torch.Tensor, n: int, pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(engine logits (n, V) at each decode step, HF's (n, V) at the same positions, HF's greedy ids) along HF's greedy text."""
    t, j = ids.shape[1], model.num_layers
    with torch.no_grad():
        hf = model.base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad)
        ref = model.base(hf).logits[0, t - 1 : t + n - 1].float()
        state = new_state(model, budget_slots(model, j), 1, t + n)
        steps = [prefill(model, state, ids, j)]
        for i in range(n - 1):
            steps.append(decode_one_token(model, state, hf[:, t + i], j))
    return torch.cat(steps).float(), ref, hf


# ------------------------------------------------------------------------ equality with HF
def test_float32_engine_equals_hf_on_the_embedded_model(smollm2):
    model, ids, tok = smollm2
    ours, ref, hf = teacher_forced(model, ids, 24, tok.eos_token_id)
    assert (ours - ref).abs().max() <= 1e-3, float((ours - ref).abs().max())
    assert torch.equal(generate(model, ids, max_new_tokens=24), hf)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "phi3", "gemma"])
def test_float32_engine_equals_hf_on_tiny_models(family):
    model = tiny(family)
    ours, ref, hf = teacher_forced(model, tiny_ids(), 12, 0)
    assert (ours - ref).abs().max() <= 1e-3, float((ours - ref).abs().max())


def test_bfloat16_engine_is_close_to_hf(smollm2):
    model, ids, tok = smollm2
    half = copy.deepcopy(model).to(torch.bfloat16)
    ours, ref, _ = teacher_forced(half, ids, 32, tok.eos_token_id)
    logp, logq = ref.log_softmax(-1), ours.log_softmax(-1)
    kl = (logp.exp() * (logp - logq)).sum(-1).mean()
    agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean()
    assert kl <= 2e-3 and agree >= 0.9, (float(kl), float(agree))


# ------------------------------------------------------------------------ speculative decoding
def test_greedy_speculative_is_lossless_in_float32(smollm2):
    model, ids, _ = smollm2
    ref = generate(model, ids, max_new_tokens=32)
    for kw in (dict(exit="S", draft_length=3), dict(exit="L", draft_length=1, draft_threshold=0.4, draft_vocab=8192),
               dict(exit="M", draft_length=1, draft_width=3)):
        out, stats = speculative_generate(model, ids, max_new_tokens=32, **kw)
        assert torch.equal(out, ref), kw
        assert stats.rounds > 0


# ------------------------------------------------------------------------ compiled decoding
def test_compiled_step_matches_eager_and_compiles_once():
    model = tiny()
    torch._dynamo.reset()
    counters.clear()
    try:
        for seed, t in ((1, 7), (2, 11)):
            x = tiny_ids(t, seed)
            eager = generate(model, x, max_new_tokens=12)
            assert torch.equal(generate(model, x, max_new_tokens=12, compile=BACKEND), eager)
        # Step by step along the same tokens, compiled against eager (the cache from the pool, as generate takes it).
        logits = {}
        for step in (None, compiled_decode(model, BACKEND)):
            state = new_state(model, budget_slots(model, 6), 1, COMPILE_LENGTH_STEP, pool=kv_pool(model))
            with torch.no_grad():
                out = [prefill(model, state, x, 6)]
                for i in range(10):
                    token = eager[0, t + i].reshape(1).clone()  # strides as sampled tokens have them: no new trace
                    out.append(decode_one_token(model, state, token, 6, step).clone())
            state.cache.release()
            logits[step is None] = torch.cat(out)
        torch.testing.assert_close(logits[False], logits[True], atol=1e-4, rtol=0)
        assert counters["stats"]["unique_graphs"] == 1  # every step of three generations: one trace
    finally:
        torch._dynamo.reset()


def test_decode_loop_never_waits_for_the_device():
    model = tiny()
    stream = generate_stream(model, tiny_ids(), max_new_tokens=16, do_sample=True, top_k=8,
                             generator=torch.Generator(device=DEVICE).manual_seed(0))
    next(stream)
    mode = torch.cuda.get_sync_debug_mode() if DEVICE.type == "cuda" else None
    try:
        if DEVICE.type == "cuda":
            torch.cuda.set_sync_debug_mode("error")  # any synchronising CUDA call raises
        with count_host_reads() as reads:
            steps = list(stream)
    finally:
        if mode is not None:
            torch.cuda.set_sync_debug_mode(mode)
    assert len(steps) == 15 and reads["n"] == 0


# ------------------------------------------------------------------------ generators and quantization
def test_sampling_draws_from_a_generator_on_the_device():
    model = tiny()
    x = tiny_ids()
    kw = dict(exit="S", max_new_tokens=12, do_sample=True, temperature=1.5)
    a = generate(model, x, generator=torch.Generator(device=DEVICE).manual_seed(7), **kw)
    b = generate(model, x, generator=torch.Generator(device=DEVICE).manual_seed(7), **kw)
    assert torch.equal(a, b)
    s, _ = speculative_generate(model, x, generator=torch.Generator(device=DEVICE).manual_seed(7), draft_length=2, **kw)
    assert s.shape == a.shape


@pytest.mark.parametrize("mode,max_kl", [("int8", 1e-3), ("int4", 2e-2)])
def test_quantized_decoding_on_the_device(mode, max_kl):
    model = tiny()
    x = tiny_ids(t=8)
    q = copy.deepcopy(model).quantize(mode)
    with torch.no_grad():
        lf, lq = model(x).logits.float().log_softmax(-1), q(x).logits.float().log_softmax(-1)
    kl = (lf.exp() * (lf - lq)).sum(-1).mean()
    assert 0 < kl < max_kl, float(kl)
    torch._dynamo.reset()
    try:
        assert torch.equal(generate(q, x, max_new_tokens=8, compile=BACKEND), generate(q, x, max_new_tokens=8))
    finally:
        torch._dynamo.reset()
