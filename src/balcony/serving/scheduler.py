"""The server's bounded queue and the one worker thread that batches requests and runs the model.

Requests wait in a bounded queue (full: an immediate 429). The worker takes the
oldest request, adds every waiting request with the same budget and sampling
settings and a prompt of similar length (`length_bucket`; up to ``max_batch_size``,
after waiting at most ``batch_window_ms`` for company), left-pads them and decodes them together (static batching). A
request that finishes, times out or whose client goes away stops receiving
tokens; once none of a batch is left, the batch is abandoned, in the middle of a
long prompt's prefill too (it runs in `ServeConfig.prefill_chunk` chunks, checked
in between). The decoder is called from one place, `decode_tokens`.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

from .policy import AutoBudgetPolicy

if TYPE_CHECKING:  # heavy imports stay lazy: the CLI imports this module on every run
    import torch

    from ..modeling.model import BalconyModel
from ..inference.engine import generate_stream
from ..inference.options import DecodeOptions, ExitPolicy
from ..inference.speculative import speculative_stream
from ..inference.token_exits import checkpoints, token_exit_stream
from .config import ServeConfig
from .errors import ApiError, SpeculativeUnavailable, _queue_full, _timeout
from .prometheus import BATCH_BUCKETS, Metrics

log = logging.getLogger("balcony.serving")


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
        threshold: Token-level exits at this threshold (`budget` is then its ``auto@<threshold>`` label).
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
    threshold: float | None = None

    def batch_key(self, auto_budget: str, draft_budget: str | None) -> tuple:
        """Jobs with equal keys can share a batch; the key starts with the budget to run at.

        Args:
            auto_budget: The auto policy's current choice.
            draft_budget: What a speculative auto job drafts with (the choice, below the full model).
        """
        seeded = self.sampling[0] and self.seed is not None
        budget = self.budget or (draft_budget if self.speculative else auto_budget)
        return (budget, self.speculative, self.sampling, id(self) if seeded else None)


SHORT_PROMPT = 256
"""Prompts up to this many tokens batch together whatever their lengths; longer ones only within a factor of 2."""


def length_bucket(tokens: int) -> int:
    """Which prompts may share a batch: 0 up to `SHORT_PROMPT` tokens, then one bucket per power of two.

    Example:
        >>> length_bucket(10), length_bucket(256), length_bucket(257), length_bucket(512), length_bucket(5000)
        (0, 0, 9, 9, 13)
    """
    return 0 if tokens <= SHORT_PROMPT else (tokens - 1).bit_length()


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
    prefill_chunk: int | None = None,
    cancel: Callable[[], bool] | None = None,
    threshold: float | None = None,
    policy: ExitPolicy | None = None,
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
        prefill_chunk: Prompt positions per prefill pass (None: one pass).
        cancel: Asked between prefill chunks and decode steps; True ends the stream (the work is abandoned).
            Speculative decoding prefills in one pass and is stopped between tokens by the caller.
        threshold: Token-level exits at this threshold (`exit` is then ignored): each token leaves at the first
            exit confident enough. The prompt is prefilled in one pass; `cancel` is asked between steps.
        policy: Which exits may stop a token and how confidence is scored (its threshold is replaced by `threshold`).

    Raises:
        SpeculativeUnavailable: `speculative` was asked and this build cannot do it.
    """
    do_sample, temperature, top_k, top_p = sampling
    options = DecodeOptions(
        max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
        eos_token_id=eos_token_id, generator=generator,
    )
    if threshold is not None:
        yield from token_exit_stream(model, input_ids, attention_mask, options=options, policy=policy, threshold=threshold, cancel=cancel)
        return
    if not speculative:
        yield from generate_stream(model, input_ids, attention_mask, exit=exit, options=options.replace(prefill_chunk=prefill_chunk), cancel=cancel)
        return
    if input_ids.shape[0] == 1:  # token by token
        yield from speculative_stream(model, input_ids, attention_mask, exit=exit, options=options)
        return
    try:  # a batch: one sequence at a time, the whole answer at once
        out = model.generate(input_ids, attention_mask, exit=exit, speculative=True, options=options)
    except (TypeError, NotImplementedError) as e:
        raise SpeculativeUnavailable(f"self-speculative decoding is not available in this build: {e}") from e
    yield from out[:, input_ids.shape[1]:].unbind(1)


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
        # Token-level exits' policy for requests with a threshold; a bad exit name fails here, at start-up.
        self.exit_policy = ExitPolicy(exits=config.token_exits, confidence_vocab=config.confidence_vocab)
        if config.token_exits is not None:
            checkpoints(model, self.exit_policy)
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
            for job in self._waiting + self._running:
                self._fail(job, ApiError(503, "The server is shutting down.", type="server_error", code="unavailable"))
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
            elif now > job.deadline:  # (timeouts are counted where the 504 is answered)
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
                # Prompts of very different lengths are not batched: a short one would pay for the long one's
                # padded prefill (and share its fate at the deadline).
                size = length_bucket(len(head.prompt))
                batch = [job for job in self._waiting if job.batch_key(auto, draft) == key and length_bucket(len(job.prompt)) == size][:limit]
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

        def abandon() -> bool:
            """Between prefill chunks and steps: answer the requests past their deadline; True once none is left."""
            now = time.monotonic()
            for job in batch:
                if not job.finished and not job.cancelled and now > job.deadline:
                    self._fail(job, _timeout(self.config.request_timeout_s))
            return self._stopping or all(job.finished or job.cancelled for job in batch)

        stream = decode_tokens(
            self.model, ids, mask, exit=self.model.budgets.get(budget, self.model.num_layers),
            max_new_tokens=max(job.max_tokens for job in batch), sampling=head.sampling, eos_token_id=self.eos_ids,
            generator=generator, speculative=speculative, prefill_chunk=self.config.prefill_chunk, cancel=abandon,
            threshold=head.threshold, policy=self.exit_policy,
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
                            self._fail(job, _timeout(self.config.request_timeout_s))
                    active[i] = not job.finished
                if not any(active):
                    break
        finally:
            stream.close()
            self.metrics.inc("balcony_generation_tokens_total", {"budget": budget}, sum(job.generated for job in batch))
        for job in batch:
            if job.cancelled:  # its client left (or the server is stopping): nobody to answer
                job.finished = True
            elif time.monotonic() > job.deadline:  # abandoned at its deadline
                self._fail(job, _timeout(self.config.request_timeout_s))
            else:  # the decoder stopped early (every row at EOS)
                self._finish(job, "stop")
