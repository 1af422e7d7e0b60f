"""`ServeConfig`: the server's settings, and the names shared by its modules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # heavy imports stay lazy: the CLI imports this module on every run

    pass


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
