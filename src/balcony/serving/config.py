"""`ServeConfig`: the server's settings, and the names shared by its modules."""

from __future__ import annotations

from dataclasses import dataclass

AUTO = "auto"


BUDGET_HEADER = "x-balcony-budget"


SPECULATIVE_HEADER = "x-balcony-speculative"


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
        max_body_bytes: Largest request body accepted; larger ones get 413 before they are read.
        prefill_chunk: Prompt positions per prefill pass: between passes the worker drops requests
            past their deadline or whose client left (None: one pass, which cannot be interrupted).
        api_key: Required as ``Authorization: Bearer <key>`` on every /v1 route (None: no key).
        allowed_hosts: Host names served besides localhost and IP addresses (``*``: any; see `guard`).
        allowed_origins: Browser origins allowed besides the server's own (``*``: any); they get CORS headers.
        chat_special_tokens: Parse control tokens (e.g. ``<|im_end|>``) inside chat message content as
            control tokens, as before; by default they are plain text, so a user cannot forge a turn.
        token_exits: Requests with a ``threshold`` (token-level exits) may stop only at these exits (names
            or layers; None: every exit), e.g. the set `balcony eval --calibrate` chose.
        confidence_vocab: Token-level exits score confidence over the first this many token ids (None: all).
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
    max_body_bytes: int = 8 * 2**20
    prefill_chunk: int | None = 256
    api_key: str | None = None
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    chat_special_tokens: bool = False
    token_exits: tuple[int | str, ...] | None = None
    confidence_vocab: int | None = None

    def __post_init__(self) -> None:
        self.allowed_hosts = tuple(self.allowed_hosts)
        self.allowed_origins = tuple(self.allowed_origins)
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk={self.prefill_chunk} must be >= 1 (or None for one pass)")
        for name in ("max_batch_size", "queue_capacity", "max_tokens_limit", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.request_timeout_s <= 0 or self.batch_window_ms < 0:
            raise ValueError("request_timeout_s must be > 0 and batch_window_ms >= 0")
