"""The FastAPI app: OpenAI-compatible completions and chat (streaming or not), models, health and metrics.

How a request is served: `protocol.Frontend` validates the body into a `Plan`
(budget from the model-name suffix ``name:M``, the ``"budget"`` field, or the
auto policy for the bare name), a `Ticket` queues its jobs on the `Scheduler`
and turns the worker's events into the JSON or SSE answer. Every response
names the budget that served it (``x-balcony-budget`` header and a ``budget`` field).

Nothing a request sends runs on the event loop in proportion to its size:
`guard.Guard` refuses foreign hosts and origins, missing API keys, non-JSON
and oversized bodies before the app runs; `body.read_body` stops at the size
cap; JSON parsing, validation and tokenisation run in a worker thread.
"""

import asyncio
import json
import logging
import time
import uuid
from typing import TYPE_CHECKING, AsyncIterator

from .body import parse_json, read_body
from .config import BUDGET_HEADER, SPECULATIVE_HEADER, ServeConfig
from .errors import ApiError, ClientGone, _timeout
from .guard import Guard
from .policy import AutoBudgetPolicy, PolicyConfig
from .prometheus import Metrics
from .protocol import Frontend, Plan
from .scheduler import Event, Job, Scheduler
from .text import TextStream

if TYPE_CHECKING:  # heavy imports stay lazy: the CLI imports this module on every run
    from fastapi import FastAPI, Request

    from ..modeling.model import BalconyModel


log = logging.getLogger("balcony.serving")


class Ticket:
    """The jobs of one HTTP request and the queue their events arrive on."""

    POLL_S = 0.25  # how often a waiting request checks whether its client is still there

    def __init__(self, scheduler: Scheduler, plan: Plan, config: ServeConfig):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

        def post(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, event)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

        self.scheduler = scheduler
        self.deadline = time.monotonic() + config.request_timeout_s
        self.timeout_s = config.request_timeout_s
        # Several choices of one request are pinned to one budget so the response names a single one.
        budget = plan.budget
        if budget is None and len(plan.prompts) * plan.n > 1:
            budget = scheduler.policy.budget
            if plan.speculative:
                budget = scheduler.draft_budget(budget)
        self.jobs = [
            Job(
                index=p * plan.n + k, prompt=prompt, max_tokens=plan.max_tokens, budget=budget, speculative=plan.speculative,
                sampling=plan.sampling, seed=None if plan.seed is None else plan.seed + k, deadline=self.deadline, post=post,
                auto=plan.budget is None, threshold=plan.threshold,
            )
            for p, prompt in enumerate(plan.prompts)
            for k in range(plan.n)
        ]
        self._open = {job.index for job in self.jobs}
        self.watch: "Request | None" = None  # poll this request for a disconnect while waiting

    def submit(self) -> None:
        self.scheduler.submit(self.jobs)

    def close(self, index: int | None = None) -> None:
        """Stop one job (or all): it leaves the queue or its batch."""
        for job in self.jobs:
            if index is None or job.index == index:
                self._open.discard(job.index)
                self.scheduler.cancel(job)

    async def events(self) -> AsyncIterator[Event]:
        """Events until every job is done.

        Raises:
            ApiError: 504 past the request's deadline.
            ClientGone: `watch` is set and its client disconnected.
        """
        next_check = time.monotonic() + self.POLL_S
        while self._open:
            now = time.monotonic()
            remaining = self.deadline - now  # the 504 leaves at the deadline; closing the jobs stops the worker's part
            if remaining <= 0:
                raise _timeout(self.timeout_s)
            if now >= next_check:
                next_check = now + self.POLL_S
                if self.watch is not None and await self.watch.is_disconnected():
                    self.close()
                    raise ClientGone()
            try:
                event = await asyncio.wait_for(self.queue.get(), timeout=min(self.POLL_S, remaining))
            except asyncio.TimeoutError:
                continue
            if event.index not in self._open:
                continue
            if event.kind in ("done", "error"):
                self._open.discard(event.index)
            yield event


def create_app(model: "BalconyModel", tokenizer, config: ServeConfig | None = None) -> "FastAPI":
    """The FastAPI app serving `model` (its worker thread runs while the app is up).

    Args:
        model: A `BalconyModel` (its exits give the budgets).
        tokenizer: The base model's tokenizer (its chat template serves chat requests).
        config: Server settings.

    Returns:
        The app; ``app.state.scheduler``, ``app.state.policy`` and ``app.state.metrics``
        expose the internals (for tests and embedding).
    """
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from .._version import __version__

    config = config or ServeConfig()
    frontend = Frontend(model, tokenizer, config)
    metrics = Metrics()
    try:
        auto = {frontend.budget_name(b, param="auto_budgets") for b in config.auto_budgets or frontend.budgets}
    except ApiError as e:
        raise ValueError(f"auto budgets: {e.message}") from None
    auto = tuple(sorted(auto, key=frontend.budgets.__getitem__))
    policy = AutoBudgetPolicy(
        PolicyConfig(
            budgets=auto,
            target_latency_s=None if config.target_latency_ms is None else config.target_latency_ms / 1000,
            max_queue=config.max_queue,
            down_hold_s=config.auto_down_hold_s,
            down_cooldown_s=config.auto_down_cooldown_s,
            up_hold_s=config.auto_up_hold_s,
            latency_window_s=config.auto_latency_window_s,
        )
    )
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    scheduler = Scheduler(model, eos, pad, config, policy, metrics)

    def live_gauges() -> list[tuple[str, dict[str, str], float]]:
        out = [
            ("balcony_queue_depth", {}, scheduler.depth),
            ("balcony_running_requests", {}, scheduler.running),
            ("balcony_queue_capacity", {}, config.queue_capacity),
            ("balcony_auto_pressure", {}, policy.pressure),
            ("balcony_arrival_rate", {}, scheduler.arrival_rate),
        ]
        out += [("balcony_auto_budget", {"budget": b}, float(b == policy.budget)) for b in auto]
        return out

    metrics.add_gauges(live_gauges)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.stop)

    app = FastAPI(title="balcony", version=__version__, lifespan=lifespan)
    app.add_middleware(Guard, config=config)
    if config.allowed_origins:  # added last, so it runs first: it answers the browsers' preflights
        from fastapi.middleware.cors import CORSMiddleware

        origins = ["*"] if "*" in config.allowed_origins else list(config.allowed_origins)
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"])
    app.state.scheduler = scheduler
    app.state.policy = policy
    app.state.metrics = metrics
    app.state.frontend = frontend

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = f"Invalid URL ({request.method} {request.url.path})" if exc.status_code in (404, 405) else str(exc.detail)
        return ApiError(exc.status_code, message, code=None).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("unhandled error")
        return ApiError(500, f"The server had an error while processing your request: {type(exc).__name__}", type="server_error").response()

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [frontend.model_card(i, b) for i, b in frontend.model_ids()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        budget, named = frontend.resolve_model(model_id)
        return frontend.model_card(model_id, budget if named else None)

    @app.get("/health")
    async def health():
        ok = scheduler.alive and scheduler.failure is None
        body = {
            "status": ("ok" if scheduler.ready.is_set() else "starting") if ok else "error",
            "model": frontend.name,
            "budgets": frontend.budgets,
            "auto_budget": policy.budget,
            "queue_depth": scheduler.depth,
            "running": scheduler.running,
            "speculative": scheduler.speculative_error is None if scheduler.ready.is_set() else None,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    def read_plan(raw: bytes, kind: str) -> Plan:
        """Parse, validate and tokenise a body (in a worker thread: its cost grows with the body)."""
        return frontend.parse(parse_json(raw), kind)

    def record(kind: str, status: int, budget: str | None, t0: float, prompt_tokens: int = 0) -> None:
        labels = {"endpoint": kind, "status": str(status), "budget": budget or "none"}
        metrics.inc("balcony_requests_total", labels)
        if status == 504:
            metrics.inc("balcony_rejected_total", {"reason": "timeout"})
        metrics.observe("balcony_request_latency_seconds", time.monotonic() - t0, {"endpoint": kind, "budget": budget or "none"})
        if prompt_tokens:
            metrics.inc("balcony_prompt_tokens_total", None, prompt_tokens)

    async def handle(request: Request, kind: str):
        t0 = time.monotonic()
        ticket: Ticket | None = None
        try:
            raw = await read_body(request, config.max_body_bytes)
            plan = await asyncio.to_thread(read_plan, raw, kind)
            del raw
            if plan.speculative and scheduler.ready.is_set() and scheduler.speculative_error:
                raise ApiError(400, scheduler.speculative_error, param="speculative", code="speculative_unsupported")
            ticket = Ticket(scheduler, plan, config)
            ticket.submit()
            if plan.stream:
                return await start_stream(request, plan, ticket, t0)
            return await answer(request, plan, ticket, t0)
        except ApiError as e:
            if ticket is not None:
                ticket.close()
            record(kind, e.status, None, t0)
            return e.response()
        except (ClientGone, asyncio.CancelledError) as e:  # the client left (the server may cancel us for it)
            if ticket is not None:
                ticket.close()
            metrics.inc("balcony_rejected_total", {"reason": "disconnect"})
            record(kind, 499, None, t0)
            if isinstance(e, asyncio.CancelledError):
                raise
            return JSONResponse({}, status_code=499)
        except BaseException:
            if ticket is not None:
                ticket.close()
            raise

    def envelope(plan: Plan, ident: str, created: int, budget: str) -> dict:
        obj = {"completions": "text_completion", "chat": "chat.completion"}[plan.kind]
        return {
            "id": ident, "object": obj + ("" if plan.kind == "completions" or not plan.stream else ".chunk"), "created": created,
            "model": f"{frontend.name}:{budget}", "system_fingerprint": f"balcony-{__version__}", "budget": budget,
            **({"speculative": True} if plan.speculative else {}),
        }

    def budget_headers(plan: Plan, budget: str) -> dict[str, str]:
        return {BUDGET_HEADER: budget, **({SPECULATIVE_HEADER: "true"} if plan.speculative else {})}

    def usage(plan: Plan, counts: dict[int, int]) -> dict:
        prompt = sum(len(plan.prompts[i // plan.n]) for i in counts)
        completion = sum(counts.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def answer(request: Request, plan: Plan, ticket: Ticket, t0: float):
        streams = {job.index: TextStream(tokenizer, plan.stop) for job in ticket.jobs}
        finish: dict[int, str] = {}
        budget = ticket.jobs[0].budget
        try:
            ticket.watch = request
            async for ev in ticket.events():
                if ev.kind == "start":
                    budget = ev.budget
                elif ev.kind == "token":
                    streams[ev.index].add(ev.token)
                    if streams[ev.index].stopped:
                        finish[ev.index] = "stop"
                        ticket.close(ev.index)
                elif ev.kind == "done":
                    streams[ev.index].finish()
                    finish[ev.index] = ev.finish_reason or "stop"
                else:
                    raise ev.error
        finally:
            ticket.close()
        budget = budget or policy.budget
        body = envelope(plan, f"{'cmpl' if plan.kind == 'completions' else 'chatcmpl'}-{uuid.uuid4().hex}", int(time.time()), budget)
        choices = []
        for i in sorted(streams):
            text = streams[i].text
            if plan.kind == "completions":
                if plan.echo:
                    text = plan.prompt_texts[i // plan.n] + text
                choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": finish.get(i, "stop")})
            else:
                choices.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish.get(i, "stop")})
        body["choices"] = choices
        body["usage"] = usage(plan, {i: len(s.ids) for i, s in streams.items()})
        record(plan.kind, 200, budget, t0, body["usage"]["prompt_tokens"])
        return JSONResponse(body, headers=budget_headers(plan, budget))

    async def start_stream(request: Request, plan: Plan, ticket: Ticket, t0: float):
        events = ticket.events()
        ticket.watch = request  # until the response starts; then Starlette watches for the disconnect
        try:
            first = await anext(events)
        except StopAsyncIteration:  # every job was closed before it started
            raise ApiError(500, "The request was cancelled before it started.", type="server_error") from None
        ticket.watch = None
        if first.kind == "error":
            raise first.error
        budget = first.budget or policy.budget
        ident = f"{'cmpl' if plan.kind == 'completions' else 'chatcmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())

        def chunk(index: int, text: str | None, finish_reason: str | None, role: bool = False) -> str:
            body = envelope(plan, ident, created, budget)
            if plan.kind == "completions":
                body["choices"] = [{"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}]
            else:
                delta: dict = {}
                if role:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                body["choices"] = [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
            return f"data: {json.dumps(body)}\n\n"

        async def sse() -> AsyncIterator[str]:
            streams = {job.index: TextStream(tokenizer, plan.stop) for job in ticket.jobs}
            started: set[int] = set()
            status = 200

            def opening(index: int) -> list[str]:
                if index in started:
                    return []
                started.add(index)
                if plan.kind == "chat":
                    return [chunk(index, "", None, role=True)]
                if plan.echo:
                    return [chunk(index, plan.prompt_texts[index // plan.n], None)]
                return []

            try:
                pending = [first]
                while True:
                    for ev in pending:
                        if ev.kind == "start":
                            for line in opening(ev.index):
                                yield line
                        elif ev.kind == "token":
                            for line in opening(ev.index):
                                yield line
                            stream = streams[ev.index]
                            delta = stream.add(ev.token)
                            if delta:
                                yield chunk(ev.index, delta, None)
                            if stream.stopped:
                                ticket.close(ev.index)
                                yield chunk(ev.index, None if plan.kind == "chat" else "", "stop")
                        elif ev.kind == "done":
                            for line in opening(ev.index):
                                yield line
                            delta = streams[ev.index].finish()
                            if delta:
                                yield chunk(ev.index, delta, None)
                            yield chunk(ev.index, None if plan.kind == "chat" else "", ev.finish_reason or "stop")
                        else:
                            raise ev.error
                    try:
                        pending = [await anext(events)]
                    except StopAsyncIteration:
                        break
                if plan.include_usage:
                    body = envelope(plan, ident, created, budget)
                    body["choices"] = []
                    body["usage"] = usage(plan, {i: len(s.ids) for i, s in streams.items()})
                    yield f"data: {json.dumps(body)}\n\n"
                yield "data: [DONE]\n\n"
            except ApiError as e:
                status = e.status
                yield f"data: {json.dumps(e.body())}\n\n"
            except (asyncio.CancelledError, GeneratorExit):
                status = 499
                metrics.inc("balcony_rejected_total", {"reason": "disconnect"})
                raise
            finally:
                ticket.close()
                record(plan.kind, status, budget, t0, sum(len(p) for p in plan.prompts) * plan.n)

        headers = {**budget_headers(plan, budget), "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(sse(), media_type="text/event-stream", headers=headers)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, "chat")

    return app


def _eos_ids(model: "BalconyModel", tokenizer) -> list[int]:
    """End-of-sequence ids: the tokenizer's EOS plus the base's generation config."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    gen_cfg = getattr(model.base, "generation_config", None)
    extra = getattr(gen_cfg, "eos_token_id", None)
    for i in [extra] if isinstance(extra, int) else (extra or []):
        if int(i) not in ids:
            ids.append(int(i))
    return ids
