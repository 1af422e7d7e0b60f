"""`balcony serve --engine vllm`: the same OpenAI-compatible surface, each budget answered by its own vLLM server.

vLLM serves one model per engine, so every budget is a vLLM OpenAI server of its
own (started by balcony on loopback ports, or already running elsewhere). This
front end validates each request exactly as the built-in server does
(`protocol.Frontend`: the model-name suffix ``name:M``, the ``budget`` field,
``auto`` through `policy.AutoBudgetPolicy`), forwards the body to that budget's
server and passes its answer back, streaming chunk by chunk, with the budget
named (``budget`` field, ``x-balcony-budget`` header, ``model`` = ``name:budget``).

A budget whose server is down or unreachable answers 503 naming that budget at
once (never a hang): its process has exited, its port refuses, or its health
check fails; the other budgets keep serving, and ``auto`` moves to the nearest
budget that is up. A health monitor brings a budget back when its server
answers again.
"""
# No `from __future__ import annotations`: FastAPI reads the endpoints' `Request` annotations at run time.

import asyncio
import json
import logging
import subprocess
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator, Callable

from .config import BUDGET_HEADER, ServeConfig
from .body import parse_json, read_body
from .errors import ApiError
from .guard import Guard
from .policy import AutoBudgetPolicy, PolicyConfig
from .prometheus import Metrics
from .protocol import Frontend

if TYPE_CHECKING:  # heavy imports stay lazy: the CLI imports this module on every run
    import httpx
    from fastapi import FastAPI

    from ..modeling.model import BalconyModel

log = logging.getLogger("balcony.serving.vllm")

ENGINE_FIELDS = ("budget", "speculative", "threshold")  # balcony's own request fields, not vLLM's


@dataclass
class Backend:
    """One budget's vLLM server.

    Attributes:
        budget: The budget it serves.
        url: Its base URL (``http://127.0.0.1:8101``).
        model: The model id it serves (None: read from its ``/v1/models`` on the first health check).
        process: The server process when balcony started it (None for a server given by URL).
        log_path: Where that process writes its output.
        up: Whether its last health check (or request) succeeded.
        error: Why it is down.
    """

    budget: str
    url: str
    model: str | None = None
    process: "subprocess.Popen | None" = None
    log_path: str | None = None
    up: bool = False
    error: str | None = "not checked yet"
    since: float = field(default_factory=time.monotonic)

    def mark(self, up: bool, error: str | None = None) -> None:
        if up != self.up:
            self.since = time.monotonic()
            (log.info if up else log.warning)(f"budget {self.budget} ({self.url}) is {'up' if up else 'down: ' + str(error)}")
        self.up, self.error = up, None if up else error

    def unavailable(self, reason: str | None = None) -> ApiError:
        """The 503 for a request that needed this budget."""
        why = reason or self.error or "it is not answering"
        return ApiError(
            503, f"The vLLM engine serving budget {self.budget} ({self.url}) is unavailable: {why}. "
            "Other budgets are still served; retry later or ask for another budget.",
            type="server_error", code="budget_unavailable", headers={"Retry-After": "1"},
        )


async def check_backend(client: "httpx.AsyncClient", backend: Backend, timeout: float = 2.0) -> bool:
    """Health-check one backend (its process, then ``GET /health``); learns its model id once."""
    import httpx

    if backend.process is not None and backend.process.poll() is not None:
        backend.mark(False, f"its process exited with code {backend.process.returncode}")
        return False
    try:
        r = await client.get(f"{backend.url}/health", timeout=timeout)
        if r.status_code != 200:
            backend.mark(False, f"its /health answered {r.status_code}")
            return False
        if backend.model is None:
            models = (await client.get(f"{backend.url}/v1/models", timeout=timeout)).json()
            backend.model = models["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
        backend.mark(False, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
        return False
    backend.mark(True)
    return True


class ProxyMetrics(Metrics):
    """The server's metrics plus the state of each budget's vLLM server."""

    FAMILIES = {**Metrics.FAMILIES, "balcony_backend_up": ("gauge", "1 when the vLLM server of a budget answers its health check.")}


def _rewrite(payload: dict, model_id: str, budget: str) -> dict:
    if isinstance(payload, dict) and "error" not in payload:
        payload["model"] = model_id
        payload["budget"] = budget
    return payload


def create_vllm_app(
    model: "BalconyModel",
    tokenizer,
    backends: dict[str, Backend],
    config: ServeConfig | None = None,
    *,
    health_interval_s: float = 1.0,
    on_shutdown: Callable[[], None] | None = None,
) -> "FastAPI":
    """The FastAPI app forwarding each budget to its vLLM server.

    Args:
        model: A `BalconyModel` giving the budgets (its weights are not used: a model on the meta
            device will do).
        tokenizer: The base's tokenizer (request validation and chat templates, as the built-in server).
        backends: Budget name -> its `Backend`; every budget of `model` needs one.
        config: Server settings (`max_batch_size` is the concurrency the auto policy counts as one batch).
        health_interval_s: Seconds between health checks of every backend.
        on_shutdown: Called when the app stops (balcony stops the servers it started).

    Returns:
        The app; ``app.state.backends`` and ``app.state.policy`` expose the internals.
    """
    from contextlib import asynccontextmanager

    import httpx
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    from .._version import __version__

    config = config or ServeConfig()
    frontend = Frontend(model, tokenizer, config)
    missing = [b for b in frontend.budgets if b not in backends]
    if missing:
        raise ValueError(f"no vLLM server for budget(s) {missing}: give one per budget of {list(frontend.budgets)}")
    try:
        auto = {frontend.budget_name(b, param="auto_budgets") for b in config.auto_budgets or frontend.budgets}
    except ApiError as e:
        raise ValueError(f"auto budgets: {e.message}") from None
    auto = tuple(sorted(auto, key=frontend.budgets.__getitem__))
    policy = AutoBudgetPolicy(PolicyConfig(
        budgets=auto,
        target_latency_s=None if config.target_latency_ms is None else config.target_latency_ms / 1000,
        max_queue=config.max_queue, down_hold_s=config.auto_down_hold_s, down_cooldown_s=config.auto_down_cooldown_s,
        up_hold_s=config.auto_up_hold_s, latency_window_s=config.auto_latency_window_s,
    ))
    metrics = ProxyMetrics()
    inflight = {"n": 0}
    metrics.add_gauges(lambda: [("balcony_backend_up", {"budget": b}, float(be.up)) for b, be in backends.items()]
                       + [("balcony_running_requests", {}, inflight["n"]), ("balcony_auto_pressure", {}, policy.pressure)]
                       + [("balcony_auto_budget", {"budget": b}, float(b == policy.budget)) for b in auto])
    timeout = httpx.Timeout(connect=5.0, read=config.request_timeout_s, write=30.0, pool=5.0)

    async def monitor(client: "httpx.AsyncClient") -> None:
        while True:
            await asyncio.gather(*(check_backend(client, be) for be in backends.values()))
            await asyncio.sleep(health_interval_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with httpx.AsyncClient(timeout=timeout) as client:
            app.state.client = client
            task = asyncio.create_task(monitor(client))
            try:
                yield
            finally:
                task.cancel()
                if on_shutdown is not None:
                    await asyncio.to_thread(on_shutdown)

    app = FastAPI(title="balcony (vLLM engines)", version=__version__, lifespan=lifespan)
    app.add_middleware(Guard, config=config)  # the same keys, hosts, origins and body limits as the built-in engine
    if config.allowed_origins:
        from fastapi.middleware.cors import CORSMiddleware

        origins = ["*"] if "*" in config.allowed_origins else list(config.allowed_origins)
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"])
    app.state.backends = backends
    app.state.policy = policy
    app.state.metrics = metrics
    app.state.frontend = frontend

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return exc.response()

    def pick(budget: str | None) -> str:
        """The budget a request runs at: its own, or the auto policy's nearest budget that is up."""
        if budget is not None:
            return budget
        choice = policy.update(time.monotonic(), max(0, inflight["n"] - config.max_batch_size)).budget
        order = sorted(auto, key=lambda b: (abs(auto.index(b) - auto.index(choice)), auto.index(b)))
        for b in order:
            if backends[b].up:
                return b
        down = "; ".join(f"{b}: {backends[b].error}" for b in auto)
        raise ApiError(503, f"No vLLM engine of the auto budgets is up ({down}).", type="server_error", code="budget_unavailable", headers={"Retry-After": "1"})

    def card(model_id: str, budget: str | None) -> dict:
        out = frontend.model_card(model_id, budget)
        if budget is not None:
            out.update(engine="vllm", up=backends[budget].up)
        return out

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [card(i, b) for i, b in frontend.model_ids()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        budget, named = frontend.resolve_model(model_id)
        return card(model_id, budget if named else None)

    @app.get("/health")
    async def health():
        up = [b for b, be in backends.items() if be.up]
        status = "ok" if len(up) == len(backends) else ("degraded" if up else "error")
        body = {
            "status": status, "model": frontend.name, "engine": "vllm", "budgets": frontend.budgets, "auto_budget": policy.budget,
            "backends": {b: {"url": be.url, "up": be.up, "error": be.error} for b, be in backends.items()},
        }
        return JSONResponse(body, status_code=200 if up else 503)

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    def record(kind: str, status: int, budget: str | None, t0: float) -> None:
        metrics.inc("balcony_requests_total", {"endpoint": kind, "status": str(status), "budget": budget or "none"})
        metrics.observe("balcony_request_latency_seconds", time.monotonic() - t0, {"endpoint": kind, "budget": budget or "none"})

    async def handle(request: Request, kind: str, path: str):
        t0 = time.monotonic()
        budget = None
        inflight["n"] += 1
        try:
            raw = await read_body(request, config.max_body_bytes)
            body = await asyncio.to_thread(parse_json, raw)  # big bodies never block the event loop
            plan = await asyncio.to_thread(frontend.parse, body, kind)
            if plan.threshold is not None:
                raise ApiError(
                    400, "Token-level exits ('threshold') need balcony's own engine (balcony serve --engine builtin): "
                    "a vLLM engine runs one fixed budget.", param="threshold", code="unsupported_parameter",
                )
            if plan.speculative:
                raise ApiError(
                    400, "With --engine vllm, speculative decoding is set when the full budget's engine starts "
                    "(balcony serve --vllm-draft S), not per request: ask for the full budget instead.",
                    param="speculative", code="speculative_unsupported",
                )
            budget = pick(plan.budget)
            backend = backends[budget]
            if not backend.up:
                raise backend.unavailable()
            metrics.inc("balcony_budget_requests_total", {"budget": budget, "mode": "auto" if plan.budget is None else "fixed"})
            forward = {k: v for k, v in body.items() if k not in ENGINE_FIELDS}
            forward["model"] = backend.model or body.get("model")
            model_id = f"{frontend.name}:{budget}"
            response = await send(request.app.state.client, backend, path, forward, plan.stream)
            if response.status_code != 200:
                content = await response.aread()
                await response.aclose()
                record(kind, response.status_code, budget, t0)
                return PlainTextResponse(content, status_code=response.status_code, media_type=response.headers.get("content-type", "application/json"))
            headers = {BUDGET_HEADER: budget}
            if not plan.stream:
                try:
                    payload = json.loads(await response.aread())
                except Exception as e:  # noqa: BLE001 - a backend that died mid-answer
                    raise backend.unavailable(f"its answer broke off ({type(e).__name__})") from None
                finally:
                    await response.aclose()
                record(kind, 200, budget, t0)
                return JSONResponse(_rewrite(payload, model_id, budget), headers=headers)
            return StreamingResponse(
                relay(response, backend, model_id, budget, kind, t0), media_type="text/event-stream",
                headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        except ApiError as e:
            if e.status >= 500:
                metrics.inc("balcony_rejected_total", {"reason": e.code or str(e.status)})
            record(kind, e.status, budget, t0)
            return e.response()
        finally:
            inflight["n"] -= 1

    async def send(client: "httpx.AsyncClient", backend: Backend, path: str, body: dict, stream: bool) -> "httpx.Response":
        """POST to the backend; connection failures become the budget's 503, a read timeout a 504."""
        try:
            req = client.build_request("POST", f"{backend.url}{path}", json=body)
            return await client.send(req, stream=True)
        except httpx.TimeoutException as e:
            if isinstance(e, (httpx.ConnectTimeout, httpx.PoolTimeout)):
                backend.mark(False, f"connecting timed out ({type(e).__name__})")
                raise backend.unavailable() from None
            raise ApiError(504, f"The vLLM engine of budget {backend.budget} did not answer within {config.request_timeout_s:g} s.", type="server_error", code="timeout") from None
        except httpx.HTTPError as e:
            backend.mark(False, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
            raise backend.unavailable() from None

    async def relay(response: "httpx.Response", backend: Backend, model_id: str, budget: str, kind: str, t0: float) -> AsyncIterator[str]:
        """The backend's SSE stream, each chunk naming the budget; a broken stream ends with the budget's error."""
        status, first = 200, True
        try:
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if first:
                    metrics.observe("balcony_time_to_first_token_seconds", time.monotonic() - t0, {"budget": budget})
                    policy.observe_latency(time.monotonic(), time.monotonic() - t0)
                    first = False
                if data.strip() == "[DONE]":
                    yield "data: [DONE]\n\n"
                    continue
                try:
                    chunk = _rewrite(json.loads(data), model_id, budget)
                except json.JSONDecodeError:
                    continue
                yield f"data: {json.dumps(chunk)}\n\n"
        except httpx.HTTPError as e:
            status = 503
            backend.mark(False, f"its stream broke off ({type(e).__name__})")
            yield f"data: {json.dumps(backend.unavailable(f'its stream broke off ({type(e).__name__})').body())}\n\n"
        finally:
            await response.aclose()
            record(kind, status, budget, t0)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, "completions", "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, "chat", "/v1/chat/completions")

    return app


def parse_backends(specs: list[str] | None, budgets: list[str]) -> dict[str, str]:
    """``["S=http://host:port", ...]`` -> {budget: url}, budget names matched case-insensitively.

    Raises:
        ValueError: a malformed spec, an unknown budget or a budget given twice, naming the value.

    Example:
        >>> parse_backends(["s=http://127.0.0.1:8101/"], ["S", "XL"])
        {'S': 'http://127.0.0.1:8101'}
    """
    out: dict[str, str] = {}
    for spec in specs or []:
        name, sep, url = str(spec).partition("=")
        if not sep or not name.strip() or not url.strip().startswith(("http://", "https://")):
            raise ValueError(f"--backend {spec!r} is not BUDGET=URL, e.g. S=http://127.0.0.1:8101")
        match = [b for b in budgets if b.lower() == name.strip().lower()]
        if not match:
            raise ValueError(f"--backend {spec!r}: unknown budget {name.strip()!r}; budgets are {', '.join(budgets)}")
        if match[0] in out:
            raise ValueError(f"--backend gives budget {match[0]} twice")
        out[match[0]] = url.strip().rstrip("/")
    return out

