"""No single request can stall `balcony serve`, and every bad input is a 4xx (issue 23, items 1-3 and 5-7).

Each test reproduces a probe that failed before the fix: a huge stop string, a
huge body, a huge prompt, a long prompt past its timeout, counters past a
million, lone surrogates, deep nesting, NaN and out-of-range integers.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
import time

import pytest
import torch
from test_serving import NAME, client, running
from tiny_models import tiny_base, tiny_hf_tokenizer

from balcony import BalconyConfig, BalconyModel
from balcony.serving.prometheus import Metrics
from balcony.serving.text import TextStream

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_hf_tokenizer()
    model = BalconyModel(tiny_base(vocab_size=len(tok)), BalconyConfig(exit_layers=[2, 3, 4]))
    return model, tok


@pytest.fixture(scope="module")
def server(tiny):
    with running(*tiny, max_body_bytes=65536) as (port, app):
        yield port, app


def send(port: int, head: str, body: bytes = b"", timeout: float = 10.0) -> tuple[int, dict]:
    """Send raw request bytes; (status, parsed JSON body or {}) of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.encode() + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        header, _, rest = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in header.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0)
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
    status = int(header.split(b" ")[1])
    try:
        return status, json.loads(rest)
    except json.JSONDecodeError:
        return status, {}


def post(port: int, body: bytes | str | dict, path: str = "/v1/completions", headers: str = "") -> tuple[int, dict]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body.encode() if isinstance(body, str) else body
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n{headers}Connection: close\r\n\r\n"
    return send(port, head, data)


OK = {"model": NAME, "prompt": "hello", "max_tokens": 2}


def assert_error(got: tuple[int, dict], status: int, param: str | None = None, code: str | None = None) -> None:
    st, body = got
    assert st == status, got
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"], got
    if param is not None:
        assert body["error"]["param"] == param, got
    if code is not None:
        assert body["error"]["code"] == code, got


# ------------------------------------------------------------- 1. stop strings
def test_stop_strings_are_bounded(server):
    port, _ = server
    assert_error(post(port, {**OK, "stop": ["x" * 5000] * 4}), 400, "stop", "invalid_value")
    assert_error(post(port, {**OK, "stop": "x" * 1025}), 400, "stop", "invalid_value")
    assert_error(post(port, {**OK, "stop": ["a", "b", "c", "d", "e"]}), 400, "stop", "invalid_value")
    assert post(port, {**OK, "stop": ["x" * 1024] * 4})[0] == 200  # at the limit: served


class Chars:
    """A tokenizer whose token i is the text pieces[i] (decode joins them)."""

    def __init__(self, pieces: list[str]):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True) -> str:
        return "".join(self.pieces[i] for i in ids)


def reference(pieces: list[str], tokens: list[int], stops: list[str]) -> list[str]:
    """What a TextStream must release after each token: the text before the first stop string, minus any tail
    that could still grow into one (brute force: every prefix of every stop string)."""
    out, sent, text = [], 0, ""
    for t in tokens:
        text += pieces[t]
        hits = [p for p in (text.find(s) for s in stops) if p >= 0]
        if hits:
            out.append(text[sent:min(hits)])
            return out
        hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        end = max(sent, len(text) - hold)
        out.append(text[sent:end])
        sent = end
    return out


def test_text_stream_releases_exactly_what_brute_force_does():
    rng = random.Random(0)
    pieces = ["a", "b", "ab", "ba", "aab", "c", "abc", "bb"]
    tok = Chars(pieces)
    for _ in range(400):
        stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 4))]
        tokens = [rng.randrange(len(pieces)) for _ in range(rng.randint(1, 25))]
        ts = TextStream(tok, stops)
        got = []
        for t in tokens:
            got.append(ts.add(t))
            if ts.stopped:
                break
        assert got == reference(pieces, tokens, stops), (stops, tokens)


def test_text_stream_partial_match_is_linear_in_the_stop_string():
    # A 200,000-character stop string whose every prefix the text keeps matching: the old hold-back search
    # compared every prefix at every token (quadratic: hours); the matcher reads each character once.
    tok = Chars(["a", "b"])
    stop = "a" * 200_000 + "b"
    done = threading.Event()

    def run() -> None:
        ts = TextStream(tok, [stop])
        released = "".join(ts.add(0) for _ in range(300))
        assert released == "" and not ts.stopped  # all 300 a's could still be the stop string's start
        assert ts.finish() == "a" * 300
        done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(60), "a long stop string made each token quadratic"


# ------------------------------------------------------------------- 2. sizes
def test_bodies_over_the_cap_get_413_before_they_are_read(server):
    port, _ = server
    padded = json.dumps(OK) + " " * 70_000  # valid JSON, over the 64 KiB cap
    assert_error(post(port, padded), 413, code="request_too_large")
    # A declared 300 MB body is refused at its headers: the server does not wait for the bytes.
    head = "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 300000000\r\n\r\n"
    assert_error(send(port, head, b'{"model": "tiny", "prompt": "', timeout=5), 413, code="request_too_large")
    # An undeclared (chunked) one is counted as it arrives.
    chunk = b" " * 20_000
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(4)) + b"0\r\n\r\n"
    head = "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert_error(send(port, head, body), 413, code="request_too_large")
    assert post(port, OK)[0] == 200


def test_a_client_leaving_mid_body_is_a_disconnect_not_an_error(server, caplog):
    port, app = server
    before = app.state.metrics.value("balcony_rejected_total", {"reason": "disconnect"})
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\"")
        time.sleep(0.3)
    deadline = time.monotonic() + 5
    while app.state.metrics.value("balcony_rejected_total", {"reason": "disconnect"}) == before:
        assert time.monotonic() < deadline, "the half-sent request was not counted as a disconnect"
        time.sleep(0.02)
    assert not [r for r in caplog.records if r.levelname == "ERROR"], [r.getMessage() for r in caplog.records]
    assert post(port, OK)[0] == 200


class Tokenisations:
    """Records every tokenizer call in the process: the text's length and whether it ran on an event loop."""

    def __init__(self, monkeypatch, tok):
        self.calls: list[tuple[int, bool]] = []
        cls = type(tok)
        real = cls.__call__

        def spy(this, text=None, *args, **kwargs):
            try:
                asyncio.get_running_loop()
                on_loop = True
            except RuntimeError:
                on_loop = False
            self.calls.append((len(text) if isinstance(text, str) else -1, on_loop))
            return real(this, text, *args, **kwargs)

        monkeypatch.setattr(cls, "__call__", spy)


def test_huge_prompts_are_refused_before_tokenising(tiny, monkeypatch):
    with running(*tiny, max_body_bytes=4 * 2**20) as (port, _):
        spy = Tokenisations(monkeypatch, tiny[1])
        huge = "w1 " * 300_000  # 900,000 characters: far more than 256 tokens of at most 5 characters
        assert_error(post(port, {**OK, "prompt": huge}), 400, "prompt", "context_length_exceeded")
        chat = {"model": NAME, "messages": [{"role": "user", "content": huge}]}
        assert_error(post(port, chat, "/v1/chat/completions"), 400, "messages", "context_length_exceeded")
        assert all(n < 10_000 for n, _ in spy.calls), spy.calls
        assert post(port, OK)[0] == 200


def test_tokenisation_runs_off_the_event_loop(server, tiny, monkeypatch):
    port, _ = server
    spy = Tokenisations(monkeypatch, tiny[1])
    assert post(port, {**OK, "prompt": "hello world the"})[0] == 200
    chat = {"model": NAME, "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 2}
    assert post(port, chat, "/v1/chat/completions")[0] == 200
    encodes = [c for c in spy.calls if c[0] > 0]
    assert encodes and not any(on_loop for _, on_loop in encodes), spy.calls


# ------------------------------------------------------- 3. deadlines in prefill
class SlowPrefill:
    """Every prefill pass of the tiny model (more than one token) sleeps; counts them."""

    def __init__(self, model, seconds: float):
        self.passes = 0
        self.seconds = seconds

        def hook(module, args):
            if args[0].shape[1] > 1:
                self.passes += 1
                time.sleep(seconds)

        self.handle = model.parts.embed_tokens.register_forward_pre_hook(hook)

    def settled(self, quiet_s: float = 0.6, limit_s: float = 10.0) -> int:
        """Wait until no pass has started for `quiet_s`; the count then."""
        end = time.monotonic() + limit_s
        last, since = self.passes, time.monotonic()
        while time.monotonic() < end:
            time.sleep(0.05)
            if self.passes != last:
                last, since = self.passes, time.monotonic()
            elif time.monotonic() - since >= quiet_s:
                return last
        raise AssertionError("the prefill did not stop")


LONG = "w1 " * 200  # 200 tokens: 50 chunks of 4, 10 s of slowed prefill


def test_a_timeout_abandons_the_prefill_at_the_deadline(tiny):
    model, _ = tiny
    with running(*tiny, request_timeout_s=1.0, prefill_chunk=4, max_batch_size=1) as (port, app):
        slow = SlowPrefill(model, 0.2)
        try:
            t0 = time.monotonic()
            assert_error(post(port, {**OK, "prompt": LONG}), 504, code="timeout")
            waited = time.monotonic() - t0
            assert 0.9 <= waited < 1.6, f"the 504 came {waited:.2f} s after the request; its timeout is 1 s"
            passes = slow.settled()
            assert passes <= 1.0 / 0.2 + 3, f"{passes} prefill chunks ran for a request abandoned after 1 s"
            assert app.state.scheduler.running == 0
            t0 = time.monotonic()
            assert post(port, OK)[0] == 200  # the next request is not stuck behind the abandoned prompt
            assert time.monotonic() - t0 < 1.0
            assert app.state.metrics.value("balcony_rejected_total", {"reason": "timeout"}) == 1
        finally:
            slow.handle.remove()


def test_the_504_leaves_at_the_deadline_even_inside_one_long_pass(tiny):
    model, _ = tiny
    with running(*tiny, request_timeout_s=1.0, prefill_chunk=None, max_batch_size=1) as (port, _):
        slow = SlowPrefill(model, 3.0)  # one pass of 3 s that nothing can interrupt
        try:
            t0 = time.monotonic()
            assert_error(post(port, {**OK, "prompt": LONG}), 504, code="timeout")
            waited = time.monotonic() - t0
            assert 0.9 <= waited < 1.6, f"the 504 came {waited:.2f} s after the request; its timeout is 1 s"
            slow.settled()
        finally:
            slow.handle.remove()


def test_a_client_leaving_abandons_the_prefill(tiny):
    model, _ = tiny
    with running(*tiny, request_timeout_s=30.0, prefill_chunk=4, max_batch_size=1) as (port, app):
        slow = SlowPrefill(model, 0.2)
        try:
            body = json.dumps({**OK, "prompt": LONG}).encode()
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
            )
            deadline = time.monotonic() + 10
            while slow.passes < 2:
                assert time.monotonic() < deadline, f"the prompt ran in {slow.passes} pass(es), not in chunks"
                time.sleep(0.01)
            sock.close()
            passes = slow.settled()
            assert passes <= 2 + 4, f"{passes} of 50 prefill chunks ran after the client left at chunk 2"
            assert app.state.scheduler.running == 0
            assert app.state.metrics.value("balcony_rejected_total", {"reason": "disconnect"}) == 1
        finally:
            slow.handle.remove()


def test_a_long_prompt_is_not_batched_with_short_ones(tiny, monkeypatch):
    # A short request batched with a 300-token prompt would wait for its padded prefill, and time out with it.
    from balcony.serving import scheduler as serving

    shapes: list[tuple[int, int]] = []
    gate = threading.Event()
    real = serving.decode_tokens

    def recorded(model, input_ids, *args, **kwargs):
        gate.wait(20)
        shapes.append(tuple(input_ids.shape))
        yield from real(model, input_ids, *args, **kwargs)

    with running(*tiny, max_batch_size=4, batch_window_ms=50.0, max_body_bytes=2**20) as (port, app):
        monkeypatch.setattr(serving, "decode_tokens", recorded)
        monkeypatch.setattr(serving, "SHORT_PROMPT", 16)  # the tiny model's context is 256 tokens
        results: list[int] = []
        bodies = [{**OK, "model": f"{NAME}:M", "prompt": p} for p in ("hello", "w1 " * 230, "hello world", "the a of")]
        threads = [threading.Thread(target=lambda b=b: results.append(post(port, b)[0])) for b in bodies]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while app.state.scheduler.depth + app.state.scheduler.running < 4:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        gate.set()
        for t in threads:
            t.join(20)
    assert results == [200] * 4
    assert sorted(shapes) == [(1, 230), (3, 3)], shapes  # the long one alone, the short ones together


# ----------------------------------------------------------------- 5. metrics
def test_metrics_print_counts_exactly(server):
    port, app = server
    m = Metrics()
    m.inc("balcony_prompt_tokens_total", None, 1_234_567)
    m.inc("balcony_generation_tokens_total", {"budget": "S"}, 2**60)
    m.inc("balcony_generation_tokens_total", {"budget": "S"})
    for _ in range(3):
        m.observe("balcony_queue_wait_seconds", 0.1)
    text = m.render()
    assert "balcony_prompt_tokens_total 1234567\n" in text
    assert f'balcony_generation_tokens_total{{budget="S"}} {2**60 + 1}\n' in text
    assert "balcony_queue_wait_seconds_count 3\n" in text
    assert float(next(line for line in text.splitlines() if line.startswith("balcony_queue_wait_seconds_sum")).split()[1]) == 0.1 + 0.1 + 0.1
    app.state.metrics.inc("balcony_prompt_tokens_total", None, 3_000_001)
    status, _ = post(port, OK)  # the server's own exposition, after a request adds its prompt tokens
    assert status == 200
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    line = next(x for x in data.decode().splitlines() if x.startswith("balcony_prompt_tokens_total "))
    assert int(line.split()[1]) >= 3_000_002 and "e+" not in line


# ------------------------------------------------------- 6. malformed Unicode and JSON
def test_lone_surrogates_and_deep_nesting_are_400(server):
    port, _ = server
    head = '{"model": "tiny", "max_tokens": 2, '
    assert_error(post(port, head + '"prompt": "hi \\ud800"}'), 400, "prompt", "invalid_value")
    assert_error(post(port, '{"model": "\\udfff", "prompt": "hi"}'), 400, "model", "invalid_value")
    assert_error(post(port, head + '"prompt": "hi", "\\ud800": 1}'), 400, None, "invalid_value")
    assert_error(post(port, head + '"prompt": ["hi", "x\\udbff"]}'), 400, "prompt[1]", "invalid_value")
    chat = '{"model": "tiny", "messages": [{"role": "user", "content": "\\ud83d"}]}'
    assert_error(post(port, chat, "/v1/chat/completions"), 400, "messages[0].content", "invalid_value")
    assert post(port, head + '"prompt": "hello \\ud83d\\ude00"}')[0] == 200  # a surrogate pair is a character
    assert_error(post(port, head + '"prompt": ' + "[" * 3000 + "]" * 3000 + "}"), 400, code="invalid_json")
    assert_error(post(port, head + '"prompt": ' + "[" * 40 + '"hi"' + "]" * 40 + "}"), 400, code="invalid_json")
    assert_error(post(port, head + '"prompt": "hi", "n": ' + "9" * 5000 + "}"), 400, code="invalid_json")
    status, body = send(port, "GET /v1/models/tiny%ED%A0%80 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert status in (400, 404) and "error" in body
    assert post(port, OK)[0] == 200


# ---------------------------------------------------------- 7. numbers
@pytest.mark.parametrize(
    "field, literal",
    [
        ("temperature", "NaN"), ("temperature", "Infinity"), ("temperature", "-Infinity"), ("temperature", "1e999"),
        ("top_p", "NaN"), ("presence_penalty", "NaN"), ("frequency_penalty", "Infinity"),
        ("temperature", str(10**400)), ("seed", str(2**70)), ("seed", str(-(2**63) - 1)), ("top_k", str(2**70)),
        ("max_tokens", str(10**300)), ("n", str(2**64)),
    ],
)
def test_non_finite_and_out_of_range_numbers_name_their_field(server, field, literal):
    port, _ = server
    body = json.dumps({**OK, "temperature": 0.5})[:-1] + f', "{field}": {literal}}}'
    body = body.replace('"temperature": 0.5, ', "") if field == "temperature" else body
    assert_error(post(port, body), 400, field, "invalid_value")


def test_in_range_seeds_still_sample(server):
    port, _ = server
    for seed in (2**63 - 1, -(2**63), 0):
        status, body = post(port, {**OK, "temperature": 0.8, "seed": seed, "n": 2})
        assert status == 200 and len(body["choices"]) == 2, body


def test_the_server_survives_them_all_and_answers_the_same(server, tiny):
    port, _ = server
    model, tok = tiny
    got = client(port).completions.create(model=f"{NAME}:S", prompt="hello world", max_tokens=4, temperature=0)
    ids = torch.tensor([tok("hello world").input_ids])
    from balcony.inference.engine import generate

    want = generate(model, ids, exit="S", max_new_tokens=4, eos_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
    if tok.eos_token_id in want:
        want = want[: want.index(tok.eos_token_id)]
    assert got.choices[0].text == tok.decode(want, skip_special_tokens=True)
