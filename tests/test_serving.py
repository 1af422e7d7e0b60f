"""`balcony serve`: the OpenAI-compatible server, its batching and its auto-budget policy.

Servers run on 127.0.0.1 (a free port) in a background thread with a tiny random
model and the tiny word-level tokenizer, and are spoken to with the official
`openai` client (raw `http.client` for malformed requests).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from tiny_models import tiny_base, tiny_hf_tokenizer

from balcony import BalconyConfig, BalconyModel
from balcony.inference.engine import generate
from balcony.serving import scheduler as serving
from balcony.serving.app import create_app
from balcony.serving.config import ServeConfig
from balcony.serving.policy import AutoBudgetPolicy, PolicyConfig
from balcony.serving.text import TextStream

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

NAME = "tiny"
BUDGETS = ["S", "M", "L", "XL"]


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny():
    tok = tiny_hf_tokenizer()
    model = BalconyModel(tiny_base(vocab_size=len(tok)), BalconyConfig(exit_layers=[2, 3, 4]))
    return model, tok


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(model, tok, **overrides):
    """Serve `model` on 127.0.0.1 in a background thread; yields (port, app)."""
    cfg = dict(model_name=NAME, max_batch_size=4, batch_window_ms=2.0, queue_capacity=16, request_timeout_s=20.0, max_tokens_limit=64)
    app = create_app(model, tok, ServeConfig(**{**cfg, **overrides}))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 15
        while not (server.started and app.state.scheduler.ready.is_set()):
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        yield port, app
    finally:
        server.should_exit = True
        thread.join(15)


@pytest.fixture(scope="module")
def server(tiny):
    with running(*tiny) as (port, app):
        yield port, app


def client(port: int, timeout: float = 20.0):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=timeout)


def raw(port: int, method: str, path: str, body: bytes | str | dict | None = None):
    """(status, headers, parsed JSON or text) for one plain HTTP request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    data = json.dumps(body).encode() if isinstance(body, dict) else body.encode() if isinstance(body, str) else body
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    try:
        return resp.status, dict(resp.getheaders()), json.loads(text)
    except json.JSONDecodeError:
        return resp.status, dict(resp.getheaders()), text


def expected(model, tok, text: str, budget: str, max_tokens: int, chat: bool = False) -> str:
    """What greedy decoding at `budget` gives for one prompt, decoded as the server decodes."""
    if chat:
        text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=not chat).input_ids])
    with torch.no_grad():
        out = generate(model, ids, exit=budget, max_new_tokens=max_tokens, eos_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
    if tok.eos_token_id in out:
        out = out[: out.index(tok.eos_token_id)]
    return tok.decode(out, skip_special_tokens=True)


class Gate:
    """Replaces `serving.decode_tokens`: the worker waits at a gate, then decodes (slowly, if asked).

    Install it once the server is ready (the warm-up also decodes).

    Args:
        delay_s: Sleep per token.
        constant: Emit this token instead of the model's (never EOS, so generation runs to max_tokens).
    """

    def __init__(self, monkeypatch, delay_s: float = 0.0, constant: int | None = None):
        self.open = threading.Event()
        real = serving.decode_tokens

        def gated(*args, **kwargs):
            self.open.wait(20)
            for token in real(*args, **kwargs):
                time.sleep(delay_s)
                yield token if constant is None else torch.full_like(token, constant)

        monkeypatch.setattr(serving, "decode_tokens", gated)


# ------------------------------------------------------------ pure policy
def _policy(**kw) -> AutoBudgetPolicy:
    base = dict(budgets=tuple(BUDGETS), down_hold_s=0.0, down_cooldown_s=1.0, up_hold_s=5.0, latency_window_s=10.0)
    return AutoBudgetPolicy(PolicyConfig(**{**base, **kw}))


def test_policy_steps_down_when_behind_and_back_up_with_hysteresis():
    p = _policy(max_queue=4)
    assert p.update(0.0, 0).budget == "XL"
    d = p.update(1.0, 9)  # behind: one step down
    assert (d.budget, d.step) == ("L", -1)
    assert p.update(1.5, 9).budget == "L"  # cooldown: no second step yet
    assert p.update(2.0, 9).budget == "M"
    assert p.update(3.0, 9).budget == "S" and p.update(9.0, 50).budget == "S"  # floor
    # In the hysteresis band (0.5 <= pressure <= 1): hold, however long.
    for t in range(10, 40):
        assert p.update(float(t), 3).budget == "S"
    # Ahead: one step up per up_hold_s, not before.
    assert p.update(40.0, 0).budget == "S"
    assert p.update(44.9, 1).budget == "S"
    assert p.update(45.0, 0).budget == "M"
    assert p.update(49.0, 0).budget == "M"
    assert p.update(50.0, 0).budget == "L"
    assert p.update(55.0, 0).budget == "XL" and p.update(100.0, 0).budget == "XL"
    assert p.switches == {"down": 3, "up": 3}


def test_policy_follows_the_latency_slo():
    p = _policy(target_latency_s=0.1, down_hold_s=0.5, latency_window_s=2.0)
    for t in (0.0, 0.1, 0.2):
        p.observe_latency(t, 0.3)
    assert p.update(0.2, 0).budget == "XL"  # overloaded, but not yet for down_hold_s
    assert p.update(0.8, 0).budget == "L"
    # Latencies from the old budget were forgotten; band latencies (0.05-0.1 s) hold the budget.
    for t in range(1, 30):
        p.observe_latency(float(t), 0.07)
        assert p.update(float(t), 0).budget == "L"
    # Fast again: climb after up_hold_s; stale latencies leave the window.
    for t in range(30, 36):
        p.observe_latency(float(t), 0.01)
        assert p.update(float(t), 0).budget == "L"  # 0.07 s still in the window until t=32, then 5 s of hold
    for t in range(36, 40):
        p.observe_latency(float(t), 0.01)
        p.update(float(t), 0)
    assert p.budget == "XL" and p.switches == {"down": 1, "up": 1}


def test_policy_backs_off_after_a_failed_climb():
    p = AutoBudgetPolicy(PolicyConfig(tuple(BUDGETS), max_queue=4, down_hold_s=0.0, down_cooldown_s=0.0, up_hold_s=1.0), start="L")
    assert p.update(0.0, 0).budget == "L"
    assert p.update(1.0, 0).budget == "XL"  # climbed ...
    assert p.update(1.2, 10).budget == "L"  # ... and it overloaded at once: the next climb waits twice as long
    assert p.update(1.3, 0).budget == "L"
    assert p.update(2.4, 0).budget == "L"
    assert p.update(3.4, 0).budget == "XL"


def test_policy_counts_refusals_as_overload():
    p = _policy(target_latency_s=1.0, down_cooldown_s=0.5, latency_window_s=2.0)
    p.observe_rejection(0.0)
    assert p.update(0.0, 0).budget == "L"
    assert p.update(0.6, 0).budget == "L"  # that refusal was answered by the step down
    p.observe_rejection(0.7)
    assert p.update(0.7, 0).budget == "M"
    assert p.update(5.0, 0).budget == "M" and p.pressure == 0.0  # old refusals leave the window


def test_text_stream_holds_back_stop_prefixes():
    tok = tiny_hf_tokenizer()
    ids = tok("hello world the w1 w2").input_ids
    ts = TextStream(tok, stop=["the w1"])
    out = [ts.add(i) for i in ids]
    assert "".join(out) == "hello world " and ts.stopped and ts.text == "hello world "
    ts = TextStream(tok, stop=["the w7"])
    out = "".join(ts.add(i) for i in ids) + ts.finish()
    assert out == "hello world the w1 w2" and not ts.stopped


# ------------------------------------------------------------- the server
def test_models_health_and_metrics(server):
    port, _ = server
    models = client(port).models.list()
    ids = [m.id for m in models.data]
    assert ids == [NAME] + [f"{NAME}:{b}" for b in BUDGETS]
    assert models.data[1].model_extra["exit_layer"] == 2
    assert client(port).models.retrieve(f"{NAME}:M").model_extra["budget"] == "M"
    with pytest.raises(openai.NotFoundError):
        client(port).models.retrieve(f"{NAME}:XXL")
    status, _, body = raw(port, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["budgets"] == {"S": 2, "M": 3, "L": 4, "XL": 6}
    status, headers, text = raw(port, "GET", "/metrics")
    assert status == 200 and "# TYPE balcony_request_latency_seconds histogram" in text
    assert 'balcony_auto_budget{budget="XL"} 1' in text and "balcony_queue_depth 0" in text


def test_completion_budget_by_name_suffix_and_by_field(server, tiny):
    port, _ = server
    model, tok = tiny
    c = client(port)
    r = c.completions.with_raw_response.create(model=f"{NAME}:S", prompt="hello world", max_tokens=6, temperature=0)
    assert r.headers["x-balcony-budget"] == "S"
    resp = r.parse()
    assert resp.budget == "S" and resp.model == f"{NAME}:S"
    assert resp.choices[0].text == expected(model, tok, "hello world", "S", 6)
    assert resp.usage.prompt_tokens == 2 and 1 <= resp.usage.completion_tokens <= 6
    resp = c.completions.create(model=NAME, prompt="hello world", max_tokens=6, temperature=0, extra_body={"budget": "m"})
    assert resp.budget == "M" and resp.choices[0].text == expected(model, tok, "hello world", "M", 6)
    resp = c.completions.create(model=f"{NAME}:XL", prompt=["the a", "w1 w2 w3"], n=2, max_tokens=3, temperature=0)
    assert [ch.index for ch in resp.choices] == [0, 1, 2, 3] and resp.budget == "XL"
    assert resp.choices[0].text == resp.choices[1].text == expected(model, tok, "the a", "XL", 3)
    assert resp.choices[2].text == expected(model, tok, "w1 w2 w3", "XL", 3)


def test_concurrent_requests_are_batched_and_match_single_decoding(server, tiny, monkeypatch):
    port, app = server
    model, tok = tiny
    metrics = app.state.metrics
    before = metrics.value("balcony_batches_total", {"budget": "L"})
    prompts = ["hello", "hello world the", "w1 w2 w3 w4 w5 w6", "a of and to is in it"] * 2
    c = client(port)
    gate = Gate(monkeypatch)
    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(c.completions.create, model=f"{NAME}:L", prompt=p, max_tokens=8, temperature=0) for p in prompts]
        while app.state.scheduler.depth + app.state.scheduler.running < len(prompts):
            time.sleep(0.005)
        gate.open.set()
        results = [f.result() for f in futures]
    assert [r.choices[0].text for r in results] == [expected(model, tok, p, "L", 8) for p in prompts]
    batches = metrics.value("balcony_batches_total", {"budget": "L"}) - before
    assert 1 <= batches < len(results), "concurrent requests of one budget should share batches"


def test_chat_streaming_and_not(server, tiny):
    port, _ = server
    model, tok = tiny
    c = client(port)
    messages = [{"role": "user", "content": "hello world"}]
    want = expected(model, tok, "hello world", "M", 7, chat=True)
    resp = c.chat.completions.create(model=f"{NAME}:M", messages=messages, max_tokens=7, temperature=0)
    assert resp.choices[0].message.content == want and resp.budget == "M" and resp.object == "chat.completion"
    r = c.chat.completions.with_raw_response.create(
        model=NAME, messages=messages, max_tokens=7, temperature=0, stream=True, stream_options={"include_usage": True}, extra_body={"budget": "M"}
    )
    assert r.headers["x-balcony-budget"] == "M" and r.headers["content-type"].startswith("text/event-stream")
    chunks = list(r.parse())
    assert all(ch.budget == "M" for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want
    assert chunks[-2].choices[0].finish_reason in ("stop", "length") and chunks[-1].usage.completion_tokens >= 1
    # Completions stream too, with a stop string cutting the text.
    full = expected(model, tok, "the a", "S", 10)
    words = full.split()
    assert len(words) >= 3, f"the tiny model's answer {full!r} is too short to hold a stop string"
    stop = words[2]
    pieces = list(c.completions.create(model=f"{NAME}:S", prompt="the a", max_tokens=10, temperature=0, stream=True, stop=stop))
    text = "".join(p.choices[0].text for p in pieces)
    assert text == full[: full.index(stop)] and stop not in text
    assert pieces[-1].choices[0].finish_reason == "stop"


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    port, _ = server
    ok = {"model": NAME, "prompt": "hello", "max_tokens": 2}
    cases = [
        ({**ok, "model": "gpt-4"}, 404, "model_not_found", "model"),
        ({**ok, "model": f"{NAME}:XXL"}, 404, "model_not_found", "model"),
        ({**ok, "budget": "XXL"}, 400, "invalid_budget", "budget"),
        ({**ok, "model": f"{NAME}:S", "budget": "M"}, 400, "conflicting_budget", "budget"),
        ({**ok, "max_tokens": "many"}, 400, "invalid_type", "max_tokens"),
        ({**ok, "max_tokens": 0}, 400, "invalid_value", "max_tokens"),
        ({**ok, "max_tokens": 10_000}, 400, "invalid_value", "max_tokens"),
        ({**ok, "temperature": 3}, 400, "invalid_value", "temperature"),
        ({**ok, "stream": "yes"}, 400, "invalid_type", "stream"),
        ({**ok, "prompt": " ".join(["w1"] * 300)}, 400, "context_length_exceeded", "prompt"),
        ({**ok, "prompt": " ".join(["w1"] * 250), "max_tokens": 10}, 400, "context_length_exceeded", "max_tokens"),
        ({**ok, "prompt": 5}, 400, "invalid_type", "prompt"),
        ({**ok, "budjet": "S"}, 400, "unknown_parameter", "budjet"),
        ({k: v for k, v in ok.items() if k != "model"}, 400, "missing_required_parameter", "model"),
    ]
    for body, status, code, param in cases:
        got, _, err = raw(port, "POST", "/v1/completions", body)
        assert (got, err["error"]["code"], err["error"]["param"]) == (status, code, param), body
        assert set(err["error"]) == {"message", "type", "param", "code"} and err["error"]["message"]
    got, _, err = raw(port, "POST", "/v1/chat/completions", {"model": NAME, "messages": [{"role": "wizard", "content": "x"}]})
    assert got == 400 and err["error"]["param"] == "messages[0].role"
    got, _, err = raw(port, "POST", "/v1/chat/completions", "{not json")
    assert got == 400 and err["error"]["code"] == "invalid_json"
    got, _, err = raw(port, "POST", "/v1/nothing", ok)
    assert got == 404 and "error" in err
    with pytest.raises(openai.NotFoundError):
        client(port).completions.create(model="nope", prompt="hi")
    got, _, err = raw(port, "POST", "/v1/completions", {**ok, "model": f"{NAME}:XL", "speculative": True})
    assert got == 400 and err["error"]["param"] == "speculative"  # the full model cannot draft for itself
    resp = client(port).completions.create(model=f"{NAME}:S", prompt="hello", max_tokens=2)
    assert resp.budget == "S" and resp.choices[0].finish_reason in ("stop", "length")


def test_speculative_requests(server, tiny):
    port, app = server
    model, tok = tiny
    body = {"model": NAME, "prompt": "hello world", "max_tokens": 6, "temperature": 0, "speculative": True, "budget": "S"}
    assert app.state.scheduler.speculative_error is None  # the start-up check passed
    got, headers, resp = raw(port, "POST", "/v1/completions", body)
    assert got == 200 and resp["budget"] == "S" and resp["speculative"] is True
    assert headers["x-balcony-budget"] == "S" and headers["x-balcony-speculative"] == "true"
    assert resp["choices"][0]["text"] == expected(model, tok, "hello world", "XL", 6)  # lossless: the full model's answer
    # Streaming, and auto: the draft budget stays below the full model.
    chunks = list(client(port).completions.create(model=NAME, prompt="hello world", max_tokens=6, temperature=0, stream=True, extra_body={"speculative": True}))
    assert "".join(c.choices[0].text for c in chunks) == resp["choices"][0]["text"]
    assert {c.budget for c in chunks} == {"L"} and all(c.speculative for c in chunks)


def test_speculative_unavailable_is_a_clear_400(server):
    port, app = server
    app.state.scheduler.speculative_error = "self-speculative decoding failed its start-up check: boom"
    try:
        body = {"model": NAME, "prompt": "hello world", "max_tokens": 2, "speculative": True, "budget": "S"}
        got, _, resp = raw(port, "POST", "/v1/completions", body)
        assert got == 400 and resp["error"]["code"] == "speculative_unsupported" and "boom" in resp["error"]["message"]
    finally:
        app.state.scheduler.speculative_error = None


def test_full_queue_answers_429_fast_and_timeouts_504(tiny, monkeypatch):
    with running(*tiny, max_batch_size=1, queue_capacity=2, request_timeout_s=1.0) as (port, app):
        gate = Gate(monkeypatch)
        c = client(port)
        call = lambda: c.completions.create(model=f"{NAME}:S", prompt="hello", max_tokens=2)  # noqa: E731
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(call)
            while app.state.scheduler.running == 0:  # the worker holds request 1 at the gate
                time.sleep(0.005)
            queued = [pool.submit(call) for _ in range(2)]
            while app.state.scheduler.depth < 2:
                time.sleep(0.005)
            t0 = time.monotonic()
            with pytest.raises(openai.RateLimitError) as info:
                call()
            assert time.monotonic() - t0 < 1.0
            assert info.value.code == "server_overloaded" and info.value.response.headers["retry-after"] == "1"
            time.sleep(1.2)  # past the request timeout while still at the gate
            gate.open.set()
            outcomes = []
            for f in [first, *queued]:
                try:
                    outcomes.append(f.result().budget)
                except openai.APIStatusError as e:
                    outcomes.append(e.status_code)
        assert outcomes.count(504) >= 2, outcomes  # the queued ones expired waiting
        assert app.state.metrics.value("balcony_rejected_total", {"reason": "queue_full"}) == 1
        assert c.completions.create(model=f"{NAME}:S", prompt="hello", max_tokens=2).budget == "S"


def test_client_disconnect_frees_the_slot(tiny, monkeypatch):
    with running(*tiny) as (port, app):
        gate = Gate(monkeypatch, delay_s=0.02, constant=10)
        gate.open.set()
        metrics = app.state.metrics
        body = json.dumps({"model": f"{NAME}:S", "prompt": "hello", "max_tokens": 64, "stream": True}).encode()
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        seen = b""
        while b"data: " not in seen:
            seen += sock.recv(4096)
        assert seen.startswith(b"HTTP/1.1 200") and b"x-balcony-budget: S" in seen
        sock.close()  # the client goes away after the first token
        deadline = time.monotonic() + 5
        while (app.state.scheduler.running or metrics.value("balcony_rejected_total", {"reason": "disconnect"}) < 1) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert app.state.scheduler.running == 0
        assert metrics.value("balcony_generation_tokens_total", {"budget": "S"}) < 64
        assert metrics.value("balcony_rejected_total", {"reason": "disconnect"}) == 1
        # Not streaming: the server notices while it waits for the answer.
        body = json.dumps({"model": f"{NAME}:M", "prompt": "hello", "max_tokens": 64}).encode()
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        while not app.state.scheduler.running:
            time.sleep(0.01)
        sock.close()
        deadline = time.monotonic() + 5
        while (app.state.scheduler.running or metrics.value("balcony_rejected_total", {"reason": "disconnect"}) < 2) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert app.state.scheduler.running == 0
        assert metrics.value("balcony_generation_tokens_total", {"budget": "M"}) < 64
        assert metrics.value("balcony_rejected_total", {"reason": "disconnect"}) == 2


def test_auto_budget_moves_down_under_a_burst_and_back_after(tiny, monkeypatch):
    opts = dict(max_batch_size=2, max_queue=1, auto_down_hold_s=0.0, auto_down_cooldown_s=0.02, auto_up_hold_s=0.25, auto_latency_window_s=0.25)
    with running(*tiny, **opts) as (port, app):
        gate = Gate(monkeypatch, delay_s=0.002)
        c = client(port)
        call = lambda i: c.completions.create(model=NAME, prompt=f"w{i} hello", max_tokens=4, temperature=0)  # noqa: E731
        with ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(call, i) for i in range(12)]
            while app.state.scheduler.depth + app.state.scheduler.running < 12:  # the burst waits behind the gate
                time.sleep(0.005)
            gate.open.set()
            burst = [f.result().budget for f in futures]
        assert set(burst) - {"XL"}, burst  # the backlog pushed batches to smaller budgets
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            time.sleep(0.2)
            if c.completions.create(model=NAME, prompt="hello", max_tokens=2).budget == "XL":
                break
        else:
            pytest.fail("the auto policy did not return to XL after the burst")
        # Once recovered it stays at XL (and the burst itself may have run entirely below XL).
        assert c.completions.create(model=NAME, prompt="hello", max_tokens=2).budget == "XL"
        m = app.state.metrics
        assert m.value("balcony_budget_switches_total", {"direction": "down"}) >= 1
        assert m.value("balcony_budget_switches_total", {"direction": "up"}) >= 1
        assert m.value("balcony_budget_requests_total", {"budget": "XL", "mode": "auto"}) >= 2


def test_token_level_exits_per_request(server, tiny):
    """`"threshold"` asks for token-level exits: 0 answers as budget S, 1 as the full model; the response names it."""
    port, _ = server
    model, tok = tiny
    c = client(port)
    for tau, budget in ((0, "S"), (1, "XL")):
        resp = c.completions.create(model=NAME, prompt="hello world", max_tokens=6, temperature=0, extra_body={"threshold": tau})
        assert resp.choices[0].text == expected(model, tok, "hello world", budget, 6), tau
        assert resp.budget == f"auto@{tau}"
    chunks = list(c.completions.create(model=NAME, prompt="hello world", max_tokens=6, temperature=0, stream=True, extra_body={"threshold": 0.5}))
    assert {ch.budget for ch in chunks} == {"auto@0.5"}
    ok = {"model": NAME, "prompt": "hello", "max_tokens": 2}
    for body, code, param in (
        ({**ok, "threshold": 1.5}, "invalid_value", "threshold"),
        ({**ok, "threshold": "high"}, "invalid_type", "threshold"),
        ({**ok, "model": f"{NAME}:S", "threshold": 0.5}, "conflicting_budget", "threshold"),
        ({**ok, "budget": "M", "threshold": 0.5}, "conflicting_budget", "threshold"),
        ({**ok, "speculative": True, "threshold": 0.5}, "invalid_value", "threshold"),
    ):
        got, _, resp = raw(port, "POST", "/v1/completions", body)
        assert got == 400 and resp["error"]["code"] == code and resp["error"]["param"] == param, (body, resp)
    got, _, resp = raw(port, "POST", "/v1/completions", '{"model": "%s", "prompt": "hi", "threshold": NaN}' % NAME)
    assert got == 400 and resp["error"]["param"] == "threshold"


def test_token_level_exits_use_the_servers_exit_set(tiny):
    """`ServeConfig.token_exits` (`balcony serve --auto-exits`): at threshold 0 every token leaves at the set's first exit."""
    model, tok = tiny
    with running(model, tok, token_exits=("M", "L")) as (port, _):
        resp = client(port).completions.create(model=NAME, prompt="hello world", max_tokens=6, temperature=0, extra_body={"threshold": 0})
        assert resp.choices[0].text == expected(model, tok, "hello world", "M", 6)
    with pytest.raises(ValueError, match="unknown budget 'Q'"):
        create_app(model, tok, ServeConfig(model_name=NAME, token_exits=("Q",)))
