"""`balcony serve --engine vllm`'s front end, against stand-in vLLM servers (no vLLM needed).

Each budget's "vLLM server" here is a small FastAPI app speaking the part of
vLLM's OpenAI API that balcony uses (/health, /v1/models, completions and chat,
streaming), which records what it was sent and can fail on demand: refuse, hang,
answer an error, or break off a stream. The real servers are tested in test_vllm.py.
"""

# No `from __future__ import annotations`: FastAPI reads the stand-in endpoints' `Request` annotations at run time.

import asyncio
import contextlib
import json
import subprocess
import sys
import time

import pytest
from tiny_models import tiny_base, tiny_hf_tokenizer
from vllm_helpers import free_port, serve_app

from balcony import BalconyConfig, BalconyModel
from balcony.serving.config import ServeConfig
from balcony.serving.vllm_backend import Backend, create_vllm_app, parse_backends

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

BUDGETS = ["S", "M", "L", "XL"]


def fake_vllm(name: str):
    """A stand-in vLLM OpenAI server serving model id `name`; `app.state.mode` picks how it answers."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI()
    app.state.mode = "ok"
    app.state.bodies = []

    @app.get("/health")
    async def health():
        return JSONResponse({}, status_code=200)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model"}]}

    async def answer(request: Request, chat: bool):
        body = await request.json()
        app.state.bodies.append(body)
        mode = app.state.mode
        if mode == "hang":
            await asyncio.sleep(3600)
        if mode == "error":
            return JSONResponse({"error": {"message": "bad request at the backend", "type": "BadRequestError", "code": 400}}, status_code=400)
        text = f"from {name}"
        if not body.get("stream"):
            choice = {"index": 0, "message": {"role": "assistant", "content": text}} if chat else {"index": 0, "text": text}
            return {"id": "x", "object": "chat.completion" if chat else "text_completion", "model": name, "choices": [{**choice, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}

        async def sse():
            for i, word in enumerate(text.split()):
                if mode == "break" and i == 1:
                    raise RuntimeError("the engine died")
                delta = {"delta": {"content": word}} if chat else {"text": word}
                yield f"data: {json.dumps({'id': 'x', 'model': name, 'choices': [{'index': 0, **delta, 'finish_reason': None}]})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await answer(request, chat=True)

    return app


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_hf_tokenizer()
    return BalconyModel(tiny_base(vocab_size=len(tok)), BalconyConfig(exit_layers=[2, 3, 4])), tok


@contextlib.contextmanager
def fleet(tiny, **overrides):
    """Four stand-in servers and the front end over them; yields (front-end port, {budget: stand-in app}, front-end app)."""
    fakes = {b: fake_vllm(f"backend-{b}") for b in BUDGETS}
    with contextlib.ExitStack() as stack:
        ports = {b: stack.enter_context(serve_app(app)) for b, app in fakes.items()}
        backends = {b: Backend(b, f"http://127.0.0.1:{ports[b]}") for b in BUDGETS}
        cfg = dict(model_name="tiny", request_timeout_s=2.0, max_tokens_limit=64, **overrides)
        app = create_vllm_app(tiny[0], tiny[1], backends, ServeConfig(**cfg), health_interval_s=0.1)
        port = stack.enter_context(serve_app(app))
        _wait(lambda: all(be.up for be in backends.values()))
        yield port, fakes, app


def _wait(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def client(port: int):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=20)


def test_every_budget_goes_to_its_own_server_and_is_named(tiny):
    with fleet(tiny) as (port, fakes, app):
        c = client(port)
        for b in BUDGETS:
            r = c.completions.with_raw_response.create(model=f"tiny:{b}", prompt="hello world", max_tokens=4, temperature=0)
            body = r.parse()
            assert body.choices[0].text == f"from backend-{b}" and body.model == f"tiny:{b}" and body.budget == b
            assert r.headers["x-balcony-budget"] == b
            sent = fakes[b].state.bodies[-1]
            assert sent["model"] == f"backend-{b}" and "budget" not in sent and sent["max_tokens"] == 4
        # The `budget` field works as in the built-in server, and the bare name follows the auto policy (XL at rest).
        r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, extra_body={"budget": "M"})
        assert r.choices[0].message.content == "from backend-M" and r.budget == "M"
        r = c.completions.create(model="tiny:auto", prompt="hello", max_tokens=4)
        assert r.budget == app.state.policy.budget == "XL" and r.choices[0].text == "from backend-XL"


def test_streams_pass_through_chunk_by_chunk_naming_the_budget(tiny):
    with fleet(tiny) as (port, fakes, _):
        chunks = list(client(port).chat.completions.create(model="tiny:L", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True))
        assert [ch.choices[0].delta.content for ch in chunks] == ["from", "backend-L"]
        assert {ch.model for ch in chunks} == {"tiny:L"} and {ch.budget for ch in chunks} == {"L"}
        assert fakes["L"].state.bodies[-1]["stream"] is True


def test_requests_are_validated_as_by_the_builtin_server(tiny):
    with fleet(tiny) as (port, fakes, _):
        c = client(port)
        with pytest.raises(openai.NotFoundError, match="tiny:Q"):
            c.completions.create(model="tiny:Q", prompt="hello", max_tokens=4)
        with pytest.raises(openai.BadRequestError, match="unknown budget 'Q'"):
            c.completions.create(model="tiny", prompt="hello", max_tokens=4, extra_body={"budget": "Q"})
        with pytest.raises(openai.BadRequestError, match="max_tokens"):
            c.completions.create(model="tiny:S", prompt="hello", max_tokens=10_000)
        with pytest.raises(openai.BadRequestError, match="--vllm-draft"):
            c.completions.create(model="tiny:S", prompt="hello", max_tokens=4, extra_body={"speculative": True})
        assert all(not f.state.bodies for f in fakes.values())  # nothing invalid reached a backend


def test_a_dead_budget_answers_503_naming_it_and_the_others_keep_serving(tiny):
    with fleet(tiny) as (port, fakes, app):
        c = client(port)
        _stop(fakes["S"], app.state.backends["S"])  # as a crash does: its port stops answering
        t0 = time.monotonic()
        with pytest.raises(openai.InternalServerError) as err:
            c.completions.create(model="tiny:S", prompt="hello", max_tokens=4)
        assert time.monotonic() - t0 < 5 and err.value.status_code == 503
        assert "budget S" in str(err.value) and err.value.code == "budget_unavailable"
        for b in ("M", "L", "XL"):
            assert c.completions.create(model=f"tiny:{b}", prompt="hello", max_tokens=4).choices[0].text == f"from backend-{b}"
        _wait(lambda: not app.state.backends["S"].up)
        health = httpx.get(f"http://127.0.0.1:{port}/health").json()
        assert health["status"] == "degraded" and health["backends"]["S"]["up"] is False and health["backends"]["M"]["up"] is True


def _stop(fake, backend: Backend) -> None:
    """Close a stand-in server (its uvicorn thread exits and its port refuses connections)."""
    fake.state.uvicorn.should_exit = True
    _wait(lambda: _refuses(int(backend.url.rsplit(":", 1)[1])))


def _refuses(port: int) -> bool:
    try:
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5)
        return False
    except httpx.HTTPError:
        return True


def test_auto_moves_to_the_nearest_budget_that_is_up(tiny):
    with fleet(tiny) as (port, fakes, app):
        _stop(fakes["XL"], app.state.backends["XL"])
        _wait(lambda: not app.state.backends["XL"].up)
        r = client(port).completions.create(model="tiny", prompt="hello", max_tokens=4)
        assert r.budget == "L" and r.choices[0].text == "from backend-L"


def test_backend_errors_pass_through_a_hang_times_out_and_a_broken_stream_names_the_budget(tiny):
    with fleet(tiny) as (port, fakes, app):
        c = client(port)
        fakes["M"].state.mode = "error"
        with pytest.raises(openai.BadRequestError, match="bad request at the backend"):
            c.completions.create(model="tiny:M", prompt="hello", max_tokens=4)
        fakes["L"].state.mode = "hang"
        t0 = time.monotonic()
        with pytest.raises(openai.APIStatusError) as err:
            c.completions.create(model="tiny:L", prompt="hello", max_tokens=4)
        assert err.value.status_code == 504 and time.monotonic() - t0 < 10  # request_timeout_s=2: never a hang
        fakes["S"].state.mode = "break"
        events = [json.loads(line[6:]) for line in httpx.post(
            f"http://127.0.0.1:{port}/v1/completions", json={"model": "tiny:S", "prompt": "hello", "max_tokens": 4, "stream": True}, timeout=20,
        ).text.splitlines() if line.startswith("data: {")]
        assert events[0]["choices"][0]["text"] == "from"
        assert "budget S" in events[-1]["error"]["message"] and events[-1]["error"]["code"] == "budget_unavailable"
        assert c.completions.create(model="tiny:XL", prompt="hello", max_tokens=4).budget == "XL"


def test_backend_specs_are_checked():
    assert parse_backends(["s=http://h:1/", "XL=https://h:2"], BUDGETS) == {"S": "http://h:1", "XL": "https://h:2"}
    with pytest.raises(ValueError, match=r"unknown budget 'Q'; budgets are S, M, L, XL"):
        parse_backends(["Q=http://h:1"], BUDGETS)
    with pytest.raises(ValueError, match=r"'S:http://h:1' is not BUDGET=URL"):
        parse_backends(["S:http://h:1"], BUDGETS)
    with pytest.raises(ValueError, match="budget S twice"):
        parse_backends(["S=http://h:1", "s=http://h:2"], BUDGETS)


def test_cli_serves_budgets_given_as_backend_urls(tiny_model_dir, tmp_path):
    """`balcony serve --engine vllm --backend B=URL ...` for every budget: nothing is started, all is forwarded."""
    from transformers import AutoModelForCausalLM

    model = BalconyModel(AutoModelForCausalLM.from_pretrained(tiny_model_dir), BalconyConfig(exit_layers=[2, 3, 4]))
    model.save_pretrained(tmp_path / "exits")
    fakes = {b: fake_vllm(f"backend-{b}") for b in BUDGETS}
    with contextlib.ExitStack() as stack:
        ports = {b: stack.enter_context(serve_app(app)) for b, app in fakes.items()}
        port = free_port()
        cmd = [sys.executable, "-m", "balcony.cli", "serve", "--model", str(tiny_model_dir), "--exits", str(tmp_path / "exits"), "--engine", "vllm",
               "--port", str(port), "--served-model-name", "tiny", "--vllm-dir", str(tmp_path / "export"), "--log-level", "warning"]
        cmd += [arg for b in BUDGETS for arg in ("--backend", f"{b}=http://127.0.0.1:{ports[b]}")]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            _wait(lambda: proc.poll() is not None or not _refuses(port), timeout=120)
            assert proc.poll() is None, proc.stdout.read()
            _wait(lambda: httpx.get(f"http://127.0.0.1:{port}/health").json()["status"] == "ok")
            for b in BUDGETS:
                r = client(port).completions.create(model=f"tiny:{b}", prompt="hello", max_tokens=4)
                assert r.budget == b and r.choices[0].text == f"from backend-{b}"
        finally:
            proc.terminate()
            proc.wait(30)
    assert (tmp_path / "export" / "S" / "config.json").is_file()
