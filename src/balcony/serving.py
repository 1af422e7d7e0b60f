"""`balcony serve`: an OpenAI-compatible server whose budget is chosen per request or from the load.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (streaming or
not), ``GET /v1/models`` (one entry per budget, ``name:S`` ... ``name:XL``, plus
the bare name = auto), ``GET /health`` and ``GET /metrics`` (Prometheus text).

How a request is served:

* The budget comes from the model-name suffix (``smollm2-135m:M``), or the extra
  body field ``"budget": "M"``, or, for the bare name / ``"budget": "auto"``, from
  `serving_policy.AutoBudgetPolicy`, which watches queue depth and
  time-to-first-token against ``--target-latency-ms`` / ``--max-queue``.
* Requests wait in a bounded queue (full: an immediate 429). One worker thread
  runs the model: it takes the oldest request, adds every waiting request with
  the same budget and sampling settings (up to ``--max-batch-size``, after
  waiting at most ``--batch-window-ms`` for company), left-pads them and decodes
  them together (static batching). A request that finishes, times out or whose
  client goes away stops receiving tokens, and the batch ends once no request
  in it wants more.
* Every response names the budget that served it: the ``x-balcony-budget``
  header and a ``"budget"`` field in the JSON body (in every streamed chunk).

The decoder is called from one place, `decode_tokens`; switching to a faster
engine is a change there only.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` class in handler signatures.
import asyncio
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterator, Sequence

from .cli import command
from .serving_policy import AutoBudgetPolicy, PolicyConfig

if TYPE_CHECKING:  # heavy imports stay lazy: the CLI imports this module on every run
    import torch
    from fastapi import FastAPI, Request

    from .model import BalconyModel

log = logging.getLogger("balcony.serving")

AUTO = "auto"
BUDGET_HEADER = "x-balcony-budget"
SPECULATIVE_HEADER = "x-balcony-speculative"


# ====================================================================== errors
class ApiError(Exception):
    """An error answered as OpenAI does: ``{"error": {"message", "type", "param", "code"}}``.

    Args:
        status: HTTP status code.
        message: Human-readable explanation.
        type: OpenAI error type (``invalid_request_error``, ``server_error``, ...).
        param: The offending request field, if any.
        code: A machine-readable code (``model_not_found``, ...), if any.
        headers: Extra response headers (e.g. ``Retry-After``).
    """

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self):
        from fastapi.responses import JSONResponse

        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _queue_full(capacity: int) -> ApiError:
    return ApiError(
        429,
        f"The server is overloaded: its queue of {capacity} requests is full. Retry after a short wait.",
        type="server_error",
        code="server_overloaded",
        headers={"Retry-After": "1"},
    )


def _timeout(seconds: float) -> ApiError:
    return ApiError(504, f"The request did not finish within the server's timeout of {seconds:g} s.", type="server_error", code="timeout")


class SpeculativeUnavailable(RuntimeError):
    """The installed model cannot decode speculatively (yet)."""


# ===================================================================== metrics
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    """A tiny thread-safe Prometheus registry: counters, histograms and live gauges.

    Example:
        >>> m = Metrics()
        >>> m.inc("balcony_requests_total", {"endpoint": "chat", "status": "200"})
        >>> "balcony_requests_total" in m.render()
        True
    """

    FAMILIES: dict[str, tuple[str, str]] = {
        "balcony_requests_total": ("counter", "Requests answered, by endpoint, HTTP status and serving budget."),
        "balcony_budget_requests_total": ("counter", "Requests run, by budget and how it was chosen (fixed or auto)."),
        "balcony_prompt_tokens_total": ("counter", "Prompt tokens processed."),
        "balcony_generation_tokens_total": ("counter", "Tokens generated, by budget."),
        "balcony_rejected_total": ("counter", "Requests dropped by the server, by reason."),
        "balcony_budget_switches_total": ("counter", "Auto-policy budget changes, by direction."),
        "balcony_batches_total": ("counter", "Batches run, by budget."),
        "balcony_request_latency_seconds": ("histogram", "End-to-end request latency, by endpoint and budget."),
        "balcony_time_to_first_token_seconds": ("histogram", "Arrival to first token (queue wait + prefill), by budget."),
        "balcony_queue_wait_seconds": ("histogram", "Time spent waiting in the queue."),
        "balcony_batch_size": ("histogram", "Requests per batch."),
        "balcony_queue_depth": ("gauge", "Requests waiting to start."),
        "balcony_running_requests": ("gauge", "Requests in the running batch."),
        "balcony_queue_capacity": ("gauge", "Requests the queue holds before answering 429."),
        "balcony_auto_budget": ("gauge", "1 for the budget the auto policy currently picks."),
        "balcony_auto_pressure": ("gauge", "Load pressure the auto policy last saw (1 = at the SLO)."),
        "balcony_arrival_rate": ("gauge", "Requests per second arriving (exponential average)."),
    }

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, dict[tuple, float]] = {}
        self._hists: dict[str, dict[tuple, list[float]]] = {}
        self._buckets: dict[str, tuple[float, ...]] = {}
        self._gauges: list[Callable[[], list[tuple[str, dict[str, str], float]]]] = []

    @staticmethod
    def _key(labels: dict[str, str] | None) -> tuple:
        return tuple(sorted((labels or {}).items()))

    def inc(self, name: str, labels: dict[str, str] | None = None, value: float = 1.0) -> None:
        """Add `value` to a counter."""
        with self._lock:
            series = self._values.setdefault(name, {})
            key = self._key(labels)
            series[key] = series.get(key, 0.0) + value

    def observe(self, name: str, value: float, labels: dict[str, str] | None = None, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        """Record one observation in a histogram."""
        with self._lock:
            bounds = self._buckets.setdefault(name, tuple(buckets))
            series = self._hists.setdefault(name, {})
            key = self._key(labels)
            counts = series.setdefault(key, [0.0] * (len(bounds) + 2))  # buckets..., count, sum
            for i, b in enumerate(bounds):
                if value <= b:
                    counts[i] += 1
            counts[-2] += 1
            counts[-1] += value

    def add_gauges(self, fn: Callable[[], list[tuple[str, dict[str, str], float]]]) -> None:
        """Register a callback that returns (name, labels, value) gauges at scrape time."""
        self._gauges.append(fn)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A counter's current value (0 if never touched)."""
        with self._lock:
            return self._values.get(name, {}).get(self._key(labels), 0.0)

    def render(self) -> str:
        """The Prometheus text exposition (format 0.0.4)."""
        def fmt(labels: tuple | dict) -> str:
            items = labels.items() if isinstance(labels, dict) else labels
            inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in items)
            return "{" + inner + "}" if inner else ""

        gauges: dict[str, list[tuple[dict[str, str], float]]] = {}
        for fn in self._gauges:
            for name, labels, value in fn():
                gauges.setdefault(name, []).append((labels, value))
        lines: list[str] = []
        with self._lock:
            for name, (kind, help_) in self.FAMILIES.items():
                lines.append(f"# HELP {name} {help_}")
                lines.append(f"# TYPE {name} {kind}")
                if kind == "counter":
                    for key, v in sorted(self._values.get(name, {}).items()):
                        lines.append(f"{name}{fmt(key)} {v:g}")
                elif kind == "histogram":
                    bounds = self._buckets.get(name, ())
                    for key, counts in sorted(self._hists.get(name, {}).items()):
                        for b, c in zip(bounds, counts):
                            lines.append(f"{name}_bucket{fmt(key + (('le', f'{b:g}'),))} {c:g}")
                        lines.append(f"{name}_bucket{fmt(key + (('le', '+Inf'),))} {counts[-2]:g}")
                        lines.append(f"{name}_count{fmt(key)} {counts[-2]:g}")
                        lines.append(f"{name}_sum{fmt(key)} {counts[-1]:.6g}")
                else:
                    for labels, v in gauges.get(name, []):
                        lines.append(f"{name}{fmt(labels)} {v:g}")
        return "\n".join(lines) + "\n"


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


# ====================================================================== config
@dataclass
class ServeConfig:
    """Server settings (the `balcony serve` options, minus model loading).

    Args:
        model_name: The served model id; budgets are ``<model_name>:<budget>``.
        default_budget: Budget for the bare model name: ``auto`` or a budget name.
        max_batch_size: Most requests decoded together.
        batch_window_ms: How long a lone request waits for others to batch with.
        queue_capacity: Requests that may wait; beyond it the server answers 429.
        request_timeout_s: Per-request limit, queueing included (504 after it).
        max_tokens_limit: Largest `max_tokens` a request may ask for.
        context_length: Prompt + completion token limit (default: the base's
            `max_position_embeddings`).
        target_latency_ms: Auto policy: time-to-first-token SLO in ms.
        max_queue: Auto policy: requests waiting beyond the next batch counted as falling behind.
        auto_budgets: Budgets the auto policy may use (default: all).
        auto_up_hold_s: Auto policy: seconds of low load before stepping one budget up.
        auto_down_hold_s: Auto policy: seconds of overload before stepping one budget down.
        auto_down_cooldown_s: Auto policy: minimum seconds between two steps down.
        auto_latency_window_s: Auto policy: how long a latency observation counts.
        warmup: Run one tiny generation (and the speculative probe) at start-up.
    """

    model_name: str = "balcony"
    default_budget: str = AUTO
    max_batch_size: int = 8
    batch_window_ms: float = 5.0
    queue_capacity: int = 64
    request_timeout_s: float = 300.0
    max_tokens_limit: int = 1024
    context_length: int | None = None
    target_latency_ms: float | None = None
    max_queue: int | None = None
    auto_budgets: tuple[str, ...] | None = None
    auto_up_hold_s: float = 5.0
    auto_down_hold_s: float = 0.2
    auto_down_cooldown_s: float = 1.0
    auto_latency_window_s: float = 10.0
    warmup: bool = True

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "queue_capacity", "max_tokens_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.request_timeout_s <= 0 or self.batch_window_ms < 0:
            raise ValueError("request_timeout_s must be > 0 and batch_window_ms >= 0")


# ======================================================================== jobs
Sampling = tuple[bool, float, "int | None", float]
"""(do_sample, temperature, top_k, top_p); greedy requests all share (False, 1.0, None, 1.0)."""

GREEDY: Sampling = (False, 1.0, None, 1.0)


@dataclass
class Event:
    """What the worker tells a request: ``start``, ``token``, ``done`` or ``error``."""

    kind: str
    index: int
    token: int | None = None
    budget: str | None = None
    finish_reason: str | None = None
    error: ApiError | None = None


@dataclass(eq=False)
class Job:
    """One sequence to generate (a request with n > 1 or several prompts has several).

    Attributes:
        index: The choice index in the response.
        prompt: Prompt token ids.
        max_tokens: Tokens to generate at most.
        budget: Budget name, or None for the auto policy's choice at batch time.
        speculative: Decode with self-speculative decoding.
        sampling: (do_sample, temperature, top_k, top_p).
        seed: Seed for sampling (a seeded request is batched alone, for reproducibility).
        deadline: `time.monotonic()` after which the job is dropped.
        post: Thread-safe callback delivering an `Event` to the request.
        auto: The budget was left to the auto policy (for metrics).
    """

    index: int
    prompt: list[int]
    max_tokens: int
    budget: str | None
    speculative: bool
    sampling: Sampling
    seed: int | None
    deadline: float
    post: Callable[[Event], None]
    auto: bool = False
    arrival: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    finished: bool = False
    served_budget: str | None = None
    generated: int = 0

    def batch_key(self, auto_budget: str, draft_budget: str | None) -> tuple:
        """Jobs with equal keys can share a batch; the key starts with the budget to run at.

        Args:
            auto_budget: The auto policy's current choice.
            draft_budget: What a speculative auto job drafts with (the choice, below the full model).
        """
        seeded = self.sampling[0] and self.seed is not None
        budget = self.budget or (draft_budget if self.speculative else auto_budget)
        return (budget, self.speculative, self.sampling, id(self) if seeded else None)


# ===================================================================== decoder
def decode_tokens(
    model: "BalconyModel",
    input_ids: "torch.Tensor",
    attention_mask: "torch.Tensor | None",
    *,
    exit: int,
    max_new_tokens: int,
    sampling: Sampling,
    eos_token_id: list[int],
    generator: "torch.Generator | None" = None,
    speculative: bool = False,
) -> Iterator["torch.Tensor"]:
    """Yield (B,) tokens per step: the server's one call into the decoder.

    Nothing else in the server runs the model, so a different engine is a change
    here only. Finished rows may keep yielding an EOS id; the caller stops them.

    Args:
        model: The Balcony model.
        input_ids: (B, T) left-padded prompt ids.
        attention_mask: (B, T) 1 for real tokens, 0 for padding.
        exit: The exit layer to decode at (with `speculative`, the draft exit).
        max_new_tokens: Steps at most.
        sampling: (do_sample, temperature, top_k, top_p).
        eos_token_id: Ids that end a sequence.
        generator: Seeded generator for sampling.
        speculative: Self-speculative decoding (draft at `exit`, verify with the full model).

    Raises:
        SpeculativeUnavailable: `speculative` was asked and this build cannot do it.
    """
    from .generation import generate_stream

    do_sample, temperature, top_k, top_p = sampling
    kwargs = dict(
        exit=exit, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
        top_k=top_k, top_p=top_p, eos_token_id=eos_token_id, generator=generator,
    )
    if not speculative:
        yield from generate_stream(model, input_ids, attention_mask, **kwargs)
        return
    try:  # token by token when the build has it (one sequence at a time) ...
        from .speculative import speculative_stream
    except ImportError:
        speculative_stream = None
    if speculative_stream is not None and input_ids.shape[0] == 1:
        yield from speculative_stream(model, input_ids, attention_mask, **kwargs)
        return
    try:  # ... else the whole answer at once
        out = model.generate(input_ids, attention_mask, speculative=True, **kwargs)
    except (TypeError, NotImplementedError) as e:
        raise SpeculativeUnavailable(f"self-speculative decoding is not available in this build: {e}") from e
    yield from out[:, input_ids.shape[1]:].unbind(1)


# =================================================================== scheduler
class Scheduler:
    """The bounded queue and the worker thread that batches and runs requests.

    Args:
        model: The Balcony model (used only from the worker thread).
        eos_ids: Token ids that end a sequence.
        pad_id: Token id used for left padding.
        config: Server settings.
        policy: The auto-budget policy.
        metrics: Where to count things.
    """

    TICK_S = 0.05

    def __init__(self, model: "BalconyModel", eos_ids: list[int], pad_id: int, config: ServeConfig, policy: AutoBudgetPolicy, metrics: Metrics):
        self.model = model
        self.eos_ids = eos_ids
        self.pad_id = pad_id
        self.config = config
        self.policy = policy
        self.metrics = metrics
        self.speculative_error: str | None = None
        self.ready = threading.Event()
        self._waiting: list[Job] = []
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._arrival_rate = 0.0
        self._last_arrival: float | None = None
        self.failure: BaseException | None = None

    # ------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="balcony-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            for job in self._waiting:
                self._fail(job, ApiError(503, "The server is shutting down.", type="server_error", code="unavailable"))
            for job in self._running:
                job.cancelled = True
            self._waiting.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ----------------------------------------------------------------- queue
    @property
    def depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def arrival_rate(self) -> float:
        return self._arrival_rate

    def submit(self, jobs: list[Job]) -> None:
        """Queue `jobs` (all or none).

        Raises:
            ApiError: 429 when the queue cannot take them, 503 when shutting down.
        """
        with self._cond:
            if self._stopping or not self.alive:
                raise ApiError(503, "The server is shutting down or its worker has stopped.", type="server_error", code="unavailable")
            if len(self._waiting) + len(jobs) > self.config.queue_capacity:
                self.metrics.inc("balcony_rejected_total", {"reason": "queue_full"})
                self.policy.observe_rejection(time.monotonic())
                raise _queue_full(self.config.queue_capacity)
            now = time.monotonic()
            if self._last_arrival is not None:
                gap = max(now - self._last_arrival, 1e-3)
                self._arrival_rate = 0.9 * self._arrival_rate + 0.1 * (len(jobs) / gap)
            self._last_arrival = now
            self._waiting.extend(jobs)
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        """Stop `job`: dropped from the queue at once, or from its batch at the next step."""
        if job.finished:
            return
        job.cancelled = True
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                job.finished = True
                self.metrics.inc("balcony_rejected_total", {"reason": "cancelled"})

    # ---------------------------------------------------------------- worker
    def _main(self) -> None:
        import torch

        try:
            with torch.inference_mode():
                if self.config.warmup:
                    self._warmup()
                self.ready.set()
                while True:
                    picked = self._next_batch()
                    if picked is None:
                        return
                    self._run(*picked)
        except BaseException as e:  # the worker must never die silently
            self.failure = e
            log.exception("the balcony worker stopped")
            with self._cond:
                for job in self._waiting + self._running:
                    self._fail(job, ApiError(500, f"The model worker stopped: {e}", type="server_error"))
                self._waiting.clear()
            raise

    def _warmup(self) -> None:
        import torch

        device = next(self.model.parameters()).device
        ids = torch.full((1, 2), self.eos_ids[0] if self.eos_ids else 0, device=device)
        smallest = min(self.model.budgets.values())
        for _ in decode_tokens(self.model, ids, None, exit=smallest, max_new_tokens=2, sampling=GREEDY, eos_token_id=[]):
            pass
        try:
            for _ in decode_tokens(self.model, ids, None, exit=smallest, max_new_tokens=2, sampling=GREEDY, eos_token_id=[], speculative=True):
                pass
        except Exception as e:  # noqa: BLE001 - any failure means "not available"
            self.speculative_error = str(e) if isinstance(e, SpeculativeUnavailable) else f"self-speculative decoding failed its start-up check: {e}"
        log.info("warm-up done; speculative decoding %s", "unavailable" if self.speculative_error else "available")

    def _expire(self, now: float) -> None:
        keep = []
        for job in self._waiting:
            if job.cancelled:
                job.finished = True
            elif now > job.deadline:
                self.metrics.inc("balcony_rejected_total", {"reason": "timeout"})
                self.policy.observe_latency(now, now - job.arrival)
                self._fail(job, _timeout(self.config.request_timeout_s))
            else:
                keep.append(job)
        self._waiting[:] = keep

    def _next_batch(self) -> tuple[list[Job], str, bool] | None:
        cfg = self.config
        window = cfg.batch_window_ms / 1000
        with self._cond:
            while True:
                if self._stopping:
                    return None
                now = time.monotonic()
                self._expire(now)
                if not self._waiting:
                    self._decide(now, 0)
                    self._cond.wait(self.TICK_S)
                    continue
                head = self._waiting[0]
                if len(self._waiting) < cfg.max_batch_size and now - head.arrival < window:
                    self._cond.wait(head.arrival + window - now)
                    continue
                auto = self._decide(now, max(0, len(self._waiting) - cfg.max_batch_size))
                draft = self.draft_budget(auto)
                key = head.batch_key(auto, draft)
                limit = 1 if head.speculative else cfg.max_batch_size  # speculative decoding runs one sequence
                batch = [job for job in self._waiting if job.batch_key(auto, draft) == key][:limit]
                chosen = set(map(id, batch))
                self._waiting[:] = [job for job in self._waiting if id(job) not in chosen]
                self._running = batch
                return batch, key[0], head.speculative

    def draft_budget(self, auto: str) -> str:
        """The draft budget for a speculative auto request: the auto choice, kept below the full model."""
        below = [b for b, j in self.model.budgets.items() if j < self.model.num_layers]
        if self.model.budgets[auto] < self.model.num_layers or not below:
            return auto
        return below[-1]

    def _decide(self, now: float, backlog: int) -> str:
        decision = self.policy.update(now, backlog)
        if decision.step:
            direction = "down" if decision.step < 0 else "up"
            self.metrics.inc("balcony_budget_switches_total", {"direction": direction})
            log.info("auto budget -> %s (%s)", decision.budget, decision.reason)
        return decision.budget

    def _fail(self, job: Job, error: ApiError) -> None:
        if not job.finished:
            job.finished = True
            job.post(Event("error", job.index, error=error))

    def _finish(self, job: Job, reason: str) -> None:
        if not job.finished:
            job.finished = True
            job.post(Event("done", job.index, budget=job.served_budget, finish_reason=reason))

    def _pad(self, prompts: list[list[int]]) -> tuple["torch.Tensor", "torch.Tensor"]:
        import torch

        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        return ids.to(device), mask.to(device)

    def _run(self, batch: list[Job], budget: str, speculative: bool) -> None:
        start = time.monotonic()
        self.metrics.observe("balcony_batch_size", len(batch), buckets=BATCH_BUCKETS)
        self.metrics.inc("balcony_batches_total", {"budget": budget})
        for job in batch:
            job.served_budget = budget
            self.metrics.observe("balcony_queue_wait_seconds", start - job.arrival)
            self.metrics.inc("balcony_budget_requests_total", {"budget": budget, "mode": "auto" if job.auto else "fixed"})
            job.post(Event("start", job.index, budget=budget))
        try:
            self._generate(batch, budget, speculative)
        except SpeculativeUnavailable as e:
            self.speculative_error = str(e)
            for job in batch:
                self._fail(job, ApiError(400, str(e), param="speculative", code="speculative_unsupported"))
        except ValueError as e:
            for job in batch:
                self._fail(job, ApiError(400, str(e)))
        except Exception as e:  # noqa: BLE001 - answer the requests, keep serving
            log.exception("batch failed")
            for job in batch:
                self._fail(job, ApiError(500, f"Generation failed: {type(e).__name__}: {e}", type="server_error"))
        finally:
            with self._cond:
                self._running = []

    def _generate(self, batch: list[Job], budget: str, speculative: bool) -> None:
        import torch

        ids, mask = self._pad([job.prompt for job in batch])
        head = batch[0]
        generator = None
        if head.sampling[0] and head.seed is not None:
            generator = torch.Generator(device=ids.device).manual_seed(head.seed)
        stream = decode_tokens(
            self.model, ids, mask, exit=self.model.budgets[budget], max_new_tokens=max(job.max_tokens for job in batch),
            sampling=head.sampling, eos_token_id=self.eos_ids, generator=generator, speculative=speculative,
        )
        eos = set(self.eos_ids)
        active = [True] * len(batch)
        try:
            for step, tokens in enumerate(stream):
                now = time.monotonic()
                values = tokens.tolist()
                for i, job in enumerate(batch):
                    if not active[i]:
                        continue
                    if step == 0:
                        self.policy.observe_latency(now, now - job.arrival)
                        self.metrics.observe("balcony_time_to_first_token_seconds", now - job.arrival, {"budget": budget})
                    if job.cancelled or job.finished:
                        active[i] = False
                        job.finished = True
                        continue
                    if values[i] in eos:
                        self._finish(job, "stop")
                    else:
                        job.generated += 1
                        job.post(Event("token", job.index, token=values[i]))
                        if job.generated >= job.max_tokens:
                            self._finish(job, "length")
                        elif now > job.deadline:
                            self.metrics.inc("balcony_rejected_total", {"reason": "timeout"})
                            self._fail(job, _timeout(self.config.request_timeout_s))
                    active[i] = not job.finished
                if not any(active):
                    break
        finally:
            stream.close()
            self.metrics.inc("balcony_generation_tokens_total", {"budget": budget}, sum(job.generated for job in batch))
        for job in batch:  # the decoder stopped early (every row at EOS)
            self._finish(job, "stop")


# ================================================================ text output
class TextStream:
    """Incremental detokenisation with stop strings.

    Tokens go in one at a time; text comes out as soon as it is safe to show:
    not while it ends in half a UTF-8 character, nor while its tail could be the
    start of a stop string.

    Args:
        tokenizer: A Hugging Face tokenizer.
        stop: Stop strings; the text is cut before the first one.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self._longest = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self._text = ""
        self.sent = 0
        self.stopped = False

    @property
    def text(self) -> str:
        """The text released so far."""
        return self._text[: self.sent]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _pull(self, final: bool) -> None:
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self._text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)

    def add(self, token: int) -> str:
        """Append one token; returns the newly releasable text (maybe empty)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        self._pull(final=False)
        return self._release(final=False)

    def finish(self) -> str:
        """No more tokens: release whatever is held back."""
        if self.stopped:
            return ""
        if self._read < len(self.ids):
            self._pull(final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stop:
            start = max(0, self.sent - self._longest)
            hits = [p for p in (self._text.find(s, start) for s in self.stop) if p >= 0]
            if hits:
                cut = min(hits)
                out = self._text[self.sent:cut]
                self._text = self._text[:cut]
                self.sent = cut
                self.stopped = True
                return out
        end = len(self._text)
        if not final and self.stop:
            hold = max((k for s in self.stop for k in range(1, len(s)) if self._text.endswith(s[:k])), default=0)
            end = max(self.sent, end - hold)
        out = self._text[self.sent:end]
        self.sent = end
        return out


# ============================================================ request parsing
_MISSING = object()
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "an array", dict: "an object"}


def _type_name(value: Any) -> str:
    return _TYPE_NAMES.get(type(value), "null" if value is None else type(value).__name__)


def _get(body: dict, name: str, kinds: tuple[type, ...], default: Any) -> Any:
    """Read an optional field, checking its JSON type (None/absent -> default)."""
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        return default
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        expected = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
        raise ApiError(400, f"Invalid type for '{name}': expected {expected}, but got {_type_name(value)} instead.", param=name, code="invalid_type")
    return float(value) if float in kinds and int not in kinds and not isinstance(value, bool) else value


def _in_range(name: str, value: float, lo: float, hi: float, *, lo_open: bool = False) -> None:
    if value < lo or value > hi or (lo_open and value == lo):
        bound = f"({lo:g}" if lo_open else f"[{lo:g}"
        raise ApiError(400, f"Invalid '{name}': {value!r} is outside the range {bound}, {hi:g}].", param=name, code="invalid_value")


COMMON_FIELDS = {
    "model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed",
    "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "user", "budget", "speculative",
}
IGNORED_FIELDS = {"user", "store", "metadata", "service_tier", "parallel_tool_calls"}
COMPLETION_FIELDS = COMMON_FIELDS | IGNORED_FIELDS | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = COMMON_FIELDS | IGNORED_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "response_format"}


@dataclass
class Plan:
    """A validated request, ready to become jobs."""

    kind: str
    budget: str | None
    speculative: bool
    prompts: list[list[int]]
    prompt_texts: list[str]
    n: int
    max_tokens: int
    sampling: Sampling
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    echo: bool


class Frontend:
    """Turns HTTP bodies into `Plan`s and model output into OpenAI JSON.

    Args:
        model: The Balcony model (for budgets and layers).
        tokenizer: Its tokenizer.
        config: Server settings.
    """

    def __init__(self, model: "BalconyModel", tokenizer, config: ServeConfig):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.name = config.model_name
        self.budgets = dict(model.budgets)  # name -> layer, shallowest first
        self.layer_to_budget = {j: b for b, j in self.budgets.items()}
        base_ctx = getattr(model.base.config, "max_position_embeddings", None)
        self.context_length = int(config.context_length or base_ctx or 2048)
        self.chat_template = bool(getattr(tokenizer, "chat_template", None))
        if not self.chat_template:
            log.warning("the tokenizer has no chat template: /v1/chat/completions uses a plain 'role: content' format")
        default = config.default_budget
        try:
            self.default_budget = None if default.lower() == AUTO else self.budget_name(default, param="default_budget")
        except ApiError as e:
            raise ValueError(f"default budget: {e.message}") from None

    # ------------------------------------------------------------ budgets
    def model_ids(self) -> list[tuple[str, str | None]]:
        """(id, budget) for each served model id; the bare name first (budget None = its default)."""
        return [(self.name, None)] + [(f"{self.name}:{b}", b) for b in self.budgets]

    def budget_name(self, value: str | int, param: str = "budget") -> str:
        """Canonical budget name for a name or exit layer.

        Raises:
            ApiError: 400 for an unknown budget, listing the accepted ones.
        """
        try:
            return self.layer_to_budget[self.model.resolve_exit(value)]
        except ValueError as e:
            raise ApiError(400, f"{e}; or 'auto'", param=param, code="invalid_budget") from None

    def resolve_model(self, name: Any) -> tuple[str | None, bool]:
        """Model id -> (budget or None for auto, whether the id named a budget).

        Raises:
            ApiError: 400 when missing or not a string, 404 `model_not_found` when unknown.
        """
        if name is None or name == "":
            raise ApiError(400, "You must provide a model parameter.", param="model", code="missing_required_parameter")
        if not isinstance(name, str):
            raise ApiError(400, f"Invalid type for 'model': expected a string, but got {_type_name(name)} instead.", param="model", code="invalid_type")
        if name.lower() == self.name.lower():
            return self.default_budget, False
        base, sep, suffix = name.rpartition(":")
        if sep and base.lower() == self.name.lower():
            if suffix.lower() == AUTO:
                return None, True
            for b in self.budgets:
                if b.lower() == suffix.lower():
                    return b, True
        available = ", ".join(i for i, _ in self.model_ids()) + f", {self.name}:auto"
        raise ApiError(404, f"The model `{name}` does not exist. Available models: {available}.", param="model", code="model_not_found")

    # ------------------------------------------------------------ parsing
    def parse(self, body: Any, kind: str) -> Plan:
        """Validate a completions (`kind="completions"`) or chat (`"chat"`) body.

        Raises:
            ApiError: 400 / 404 with OpenAI's error shape.
        """
        if not isinstance(body, dict):
            raise ApiError(400, f"The request body must be a JSON object, not {_type_name(body)}.", code="invalid_body")
        known = COMPLETION_FIELDS if kind == "completions" else CHAT_FIELDS
        for key in body:
            if key not in known:
                raise ApiError(400, f"Unrecognized request argument supplied: {key}", param=key, code="unknown_parameter")
        budget, named = self.resolve_model(body.get("model"))
        field_budget = body.get("budget")
        if field_budget is not None:
            if not isinstance(field_budget, (str, int)) or isinstance(field_budget, bool):
                raise ApiError(400, f"Invalid type for 'budget': expected a string, but got {_type_name(field_budget)} instead.", param="budget", code="invalid_type")
            chosen = None if str(field_budget).lower() == AUTO else self.budget_name(field_budget)
            if named and chosen != budget:
                raise ApiError(
                    400, f"The model id `{body['model']}` asks for budget {budget or AUTO} but 'budget' asks for {chosen or AUTO}; give one.",
                    param="budget", code="conflicting_budget",
                )
            budget = chosen
        speculative = _get(body, "speculative", (bool,), False)
        if speculative and budget is not None and self.budgets[budget] >= self.model.num_layers:
            raise ApiError(
                400, f"Speculative decoding drafts with a smaller budget and verifies with the full model: "
                f"choose a draft budget below {budget} (e.g. {next(iter(self.budgets))}).",
                param="speculative", code="invalid_value",
            )
        stream = _get(body, "stream", (bool,), False)
        stream_options = _get(body, "stream_options", (dict,), {})
        include_usage = bool(stream_options.get("include_usage", False))
        n = _get(body, "n", (int,), 1)
        _in_range("n", n, 1, 16)
        temperature = _get(body, "temperature", (int, float), 1.0)
        _in_range("temperature", temperature, 0.0, 2.0)
        top_p = _get(body, "top_p", (int, float), 1.0)
        _in_range("top_p", top_p, 0.0, 1.0, lo_open=True)
        top_k = _get(body, "top_k", (int,), None)
        if top_k is not None:
            _in_range("top_k", top_k, 0, 1 << 30)
        seed = _get(body, "seed", (int,), None)
        for name in ("presence_penalty", "frequency_penalty"):
            value = _get(body, name, (int, float), 0.0)
            _in_range(name, value, -2.0, 2.0)
            if value:
                raise ApiError(400, f"'{name}' is not supported by this server (only 0).", param=name, code="unsupported_parameter")
        if _get(body, "logit_bias", (dict,), {}):
            raise ApiError(400, "'logit_bias' is not supported by this server.", param="logit_bias", code="unsupported_parameter")
        stop = self._stop(body)
        if kind == "completions":
            prompts, texts = self._completion_prompts(body)
            echo = _get(body, "echo", (bool,), False)
            if _get(body, "logprobs", (int,), 0):
                raise ApiError(400, "'logprobs' is not supported by this server.", param="logprobs", code="unsupported_parameter")
            if _get(body, "best_of", (int,), 1) != 1:
                raise ApiError(400, "'best_of' other than 1 is not supported by this server.", param="best_of", code="unsupported_parameter")
            if _get(body, "suffix", (str,), ""):
                raise ApiError(400, "'suffix' is not supported by this server.", param="suffix", code="unsupported_parameter")
            max_tokens = _get(body, "max_tokens", (int,), 16)
            max_param = "max_tokens"
        else:
            prompts, texts = self._chat_prompt(body)
            echo = False
            if _get(body, "logprobs", (bool,), False) or _get(body, "top_logprobs", (int,), 0):
                raise ApiError(400, "'logprobs' is not supported by this server.", param="logprobs", code="unsupported_parameter")
            if _get(body, "tools", (list,), []):
                raise ApiError(400, "'tools' are not supported by this server.", param="tools", code="unsupported_parameter")
            fmt = _get(body, "response_format", (dict,), {"type": "text"})
            if fmt.get("type", "text") != "text":
                raise ApiError(400, "Only response_format {'type': 'text'} is supported.", param="response_format", code="unsupported_parameter")
            max_param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
            max_tokens = _get(body, max_param, (int,), None)
            if max_tokens is None:
                max_tokens = max(1, min(self.config.max_tokens_limit, self.context_length - max(map(len, prompts))))
        longest = max(map(len, prompts))
        if longest >= self.context_length:
            raise ApiError(
                400, f"This model's maximum context length is {self.context_length} tokens. However, your prompt is {longest} tokens long.",
                param="prompt" if kind == "completions" else "messages", code="context_length_exceeded",
            )
        if max_tokens < 1 or max_tokens > self.config.max_tokens_limit:
            raise ApiError(400, f"Invalid '{max_param}': {max_tokens} is outside the range [1, {self.config.max_tokens_limit}].", param=max_param, code="invalid_value")
        if longest + max_tokens > self.context_length:
            raise ApiError(
                400,
                f"This model's maximum context length is {self.context_length} tokens. However, you requested "
                f"{longest + max_tokens} tokens ({longest} in the prompt, {max_tokens} in the completion). "
                f"Please reduce the prompt or the completion length.",
                param=max_param, code="context_length_exceeded",
            )
        if len(prompts) * n > self.config.queue_capacity:
            raise ApiError(400, f"This request asks for {len(prompts) * n} completions; the server takes at most {self.config.queue_capacity}.", param="n", code="invalid_value")
        sampling: Sampling = GREEDY if temperature == 0 else (True, float(temperature), top_k or None, float(top_p))
        return Plan(kind, budget, speculative, prompts, texts, n, max_tokens, sampling, seed, stop, stream, include_usage, echo)

    def _stop(self, body: dict) -> list[str]:
        stop = body.get("stop")
        if stop is None:
            return []
        if isinstance(stop, str):
            return [stop]
        if isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop):
            return list(stop)
        raise ApiError(400, "Invalid 'stop': expected a string or an array of at most 4 strings.", param="stop", code="invalid_value")

    def _encode(self, text: str, special: bool = True) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=special)["input_ids"]
        if not ids and self.tokenizer.bos_token_id is not None:
            ids = [self.tokenizer.bos_token_id]
        return list(ids)

    def _completion_prompts(self, body: dict) -> tuple[list[list[int]], list[str]]:
        prompt = body.get("prompt", _MISSING)
        if prompt is _MISSING or prompt is None:
            raise ApiError(400, "You must provide a prompt parameter.", param="prompt", code="missing_required_parameter")
        vocab = len(self.tokenizer)
        def is_ids(x: Any) -> bool:
            return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
        if isinstance(prompt, str):
            items: list = [prompt]
        elif is_ids(prompt):
            items = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_ids(p) for p in prompt):
            items = prompt
        else:
            raise ApiError(400, "Invalid 'prompt': expected a string, an array of strings, an array of token ids, or an array of such arrays.", param="prompt", code="invalid_type")
        prompts, texts = [], []
        for item in items:
            if isinstance(item, str):
                ids = self._encode(item)
                texts.append(item)
            else:
                if any(not 0 <= t < vocab for t in item):
                    raise ApiError(400, f"Invalid 'prompt': token ids must be in [0, {vocab}).", param="prompt", code="invalid_value")
                ids = list(item)
                texts.append(self.tokenizer.decode(ids))
            if not ids:
                raise ApiError(400, "The prompt is empty and the tokenizer has no BOS token to start from.", param="prompt", code="invalid_value")
            prompts.append(ids)
        return prompts, texts

    def _chat_prompt(self, body: dict) -> tuple[list[list[int]], list[str]]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty array of {role, content} objects.", param="messages", code="invalid_value")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ApiError(400, f"Invalid 'messages[{i}]': expected an object with a string 'role'.", param=f"messages[{i}]", code="invalid_value")
            role = m["role"]
            if role not in ("system", "developer", "user", "assistant", "tool"):
                raise ApiError(400, f"Invalid 'messages[{i}].role': {role!r} is not one of system, developer, user, assistant, tool.", param=f"messages[{i}].role", code="invalid_value")
            content = m.get("content")
            if content is None:
                content = ""
            elif isinstance(content, list):
                parts = []
                for part in content:
                    if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                        raise ApiError(400, f"Invalid 'messages[{i}].content': only text parts are supported.", param=f"messages[{i}].content", code="invalid_value")
                    parts.append(part["text"])
                content = "".join(parts)
            elif not isinstance(content, str):
                raise ApiError(400, f"Invalid type for 'messages[{i}].content': expected a string or an array of text parts, but got {_type_name(content)} instead.", param=f"messages[{i}].content", code="invalid_type")
            clean.append({"role": "system" if role == "developer" else role, "content": content})
        if self.chat_template:
            try:
                text = self.tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=True)
            except Exception as e:  # noqa: BLE001 - the template rejected the conversation (e.g. role order)
                raise ApiError(400, f"The chat template rejected these messages: {e}", param="messages", code="invalid_value") from None
        else:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in clean) + "assistant:"
        return [self._encode(text, special=False)], [text]


# ================================================================== requests
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
                auto=plan.budget is None,
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
        grace = 2.0
        next_check = time.monotonic() + self.POLL_S
        while self._open:
            now = time.monotonic()
            remaining = self.deadline + grace - now
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


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


# ======================================================================== app
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

    from . import __version__

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

    def model_card(model_id: str, budget: str | None) -> dict:
        card = {"id": model_id, "object": "model", "created": 0, "owned_by": "balcony"}
        if budget is None:
            card.update(budget=frontend.default_budget or AUTO, budgets=list(frontend.budgets))
        else:
            card.update(budget=budget, exit_layer=frontend.budgets[budget], num_layers=model.num_layers)
        card["context_length"] = frontend.context_length
        return card

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card(i, b) for i, b in frontend.model_ids()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        budget, named = frontend.resolve_model(model_id)
        return model_card(model_id, budget if named else None)

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

    async def read_json(request: Request) -> Any:
        raw = await request.body()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(
                400, f"We could not parse the JSON body of your request ({e}). The OpenAI API expects a JSON payload.",
                code="invalid_json",
            ) from None

    def record(kind: str, status: int, budget: str | None, t0: float, prompt_tokens: int = 0) -> None:
        labels = {"endpoint": kind, "status": str(status), "budget": budget or "none"}
        metrics.inc("balcony_requests_total", labels)
        metrics.observe("balcony_request_latency_seconds", time.monotonic() - t0, {"endpoint": kind, "budget": budget or "none"})
        if prompt_tokens:
            metrics.inc("balcony_prompt_tokens_total", None, prompt_tokens)

    async def handle(request: Request, kind: str):
        t0 = time.monotonic()
        ticket: Ticket | None = None
        try:
            plan = frontend.parse(await read_json(request), kind)
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


def served_name(model: str | None) -> str:
    """The default served id: ``smollm2-135m`` for the embedded model, else the hub id / folder name."""
    from .loading import DEFAULT_MODEL, is_default

    if is_default(model):
        return DEFAULT_MODEL
    assert model is not None
    return os.path.basename(os.path.normpath(model)) if os.path.isdir(model) else model


# ======================================================================== CLI
@command
def serve(
    model: str | None = None,
    exits: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    served_model_name: str | None = None,
    default_budget: str = AUTO,
    max_batch_size: int = 8,
    batch_window_ms: float = 5.0,
    queue_capacity: int = 64,
    request_timeout_s: float = 300.0,
    max_tokens_limit: int = 1024,
    target_latency_ms: float | None = None,
    max_queue: int | None = None,
    auto_budgets: str | None = None,
    auto_up_hold_s: float = 5.0,
    auto_down_cooldown_s: float = 1.0,
    dtype: str = "float32",
    device: str | None = None,
    log_level: str = "info",
) -> int:
    """Serve the model over an OpenAI-compatible HTTP API, budget per request or automatic.

    Args:
        model: Base model: hub id or local path (default: the embedded SmolLM2-135M-Instruct).
        exits: Directory (or hub id) of trained exits; without it, fresh untrained exits are attached.
        host: Address to listen on (127.0.0.1 keeps the server local).
        port: TCP port.
        served_model_name: The model id clients use (default: smollm2-135m, or the model's name).
        default_budget: Budget for the bare model id: auto, or a budget name such as XL.
        max_batch_size: Most requests decoded together in one batch.
        batch_window_ms: How long a lone request waits for others to batch with.
        queue_capacity: Requests that may wait; beyond it the server answers 429 at once.
        request_timeout_s: Per-request time limit, queueing included (504 after it).
        max_tokens_limit: Largest max_tokens a request may ask for.
        target_latency_ms: Auto budget: time-to-first-token SLO; step down when the p90 exceeds it.
        max_queue: Auto budget: step down when more than this many requests wait beyond the next batch (default 4 if no SLO is set).
        auto_budgets: Budgets the auto policy may use, comma-separated (default: all).
        auto_up_hold_s: Auto budget: seconds of low load before stepping one budget back up.
        auto_down_cooldown_s: Auto budget: minimum seconds between two steps down.
        dtype: Weights dtype (float32, bfloat16, float16).
        device: Where to run the model (cpu, cuda, ...; default cpu).
        log_level: uvicorn/balcony log level (debug, info, warning).
    """
    import uvicorn

    from .commands import build_model

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    m, tok, trained = build_model(model, exits, dtype=dtype, device=device)
    config = ServeConfig(
        model_name=served_model_name or served_name(model),
        default_budget=default_budget,
        max_batch_size=max_batch_size,
        batch_window_ms=batch_window_ms,
        queue_capacity=queue_capacity,
        request_timeout_s=request_timeout_s,
        max_tokens_limit=max_tokens_limit,
        target_latency_ms=target_latency_ms,
        max_queue=max_queue,
        auto_budgets=tuple(b.strip() for b in auto_budgets.split(",") if b.strip()) if auto_budgets else None,
        auto_up_hold_s=auto_up_hold_s,
        auto_down_cooldown_s=auto_down_cooldown_s,
    )
    app = create_app(m, tok, config)
    budgets = ", ".join(f"{b} (layer {j})" for b, j in m.budgets.items())
    note = "" if trained else " [exits UNTRAINED: pass --exits DIR for trained ones]"
    print(f"[balcony] serving {config.model_name} on http://{host}:{port}/v1 - budgets {budgets}; bare name = {default_budget}{note}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level.lower())
    return 0
