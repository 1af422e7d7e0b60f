"""The automatic budget policy of `balcony serve`: pick a budget from the load.

A small, pure controller with no server, thread or clock of its own: feed it
observations (queue depth, time-to-first-token latencies) with explicit
timestamps and it answers which budget new work should run at. That keeps it
testable by replaying a synthetic load.

The rule, with hysteresis so it does not flap:

* **pressure** = the largest of ``queue_depth / max_queue`` and
  ``latency quantile / target_latency`` (each only when configured), and at
  least `REJECTION_PRESSURE` while a request refused for a full queue is
  recent (refusing work is the clearest sign of falling behind);
* pressure above 1 (behind) for ``down_hold_s`` -> one budget smaller, at most
  one step per ``down_cooldown_s``;
* pressure below ``low_water`` (comfortably ahead) for ``up_hold_s`` -> one
  budget larger, at most one step per ``up_hold_s``;
* in between, stay. Climbing back into a budget that overloaded right after the
  last step up doubles the time needed before the next climb (up to
  ``max_backoff`` times); a quiet spell halves it again.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class PolicyConfig:
    """Settings of `AutoBudgetPolicy`.

    Args:
        budgets: The budgets the policy moves between, cheapest first (e.g. S, M, L, XL).
        target_latency_s: Time-to-first-token SLO (queue wait + prefill), or None.
        max_queue: Queue depth (requests waiting) counted as "behind", or None.
            With neither this nor `target_latency_s`, a depth of 4 is used.
        low_water: Pressure under which the server counts as recovered (0 < low_water < 1).
        down_hold_s: How long pressure must stay above 1 before stepping down.
        down_cooldown_s: Minimum time between two changes when stepping down.
        up_hold_s: How long pressure must stay under `low_water` before stepping up
            (also the minimum time since the last change).
        latency_window_s: Latencies older than this are forgotten.
        latency_quantile: Which quantile of the window is compared with the target.
        max_backoff: Largest multiplier on `up_hold_s` after a failed climb.
    """

    budgets: tuple[str, ...]
    target_latency_s: float | None = None
    max_queue: float | None = None
    low_water: float = 0.5
    down_hold_s: float = 0.2
    down_cooldown_s: float = 1.0
    up_hold_s: float = 5.0
    latency_window_s: float = 10.0
    latency_quantile: float = 0.9
    max_backoff: float = 8.0

    def __post_init__(self) -> None:
        if not self.budgets:
            raise ValueError("the auto policy needs at least one budget")
        if self.target_latency_s is not None and self.target_latency_s <= 0:
            raise ValueError(f"target latency must be > 0, got {self.target_latency_s}")
        if self.max_queue is not None and self.max_queue <= 0:
            raise ValueError(f"max_queue must be > 0, got {self.max_queue}")
        if not 0.0 < self.low_water < 1.0:
            raise ValueError(f"low_water={self.low_water} must be in (0, 1)")
        if not 0.0 < self.latency_quantile <= 1.0:
            raise ValueError(f"latency_quantile={self.latency_quantile} must be in (0, 1]")
        for name in ("down_hold_s", "down_cooldown_s", "up_hold_s", "latency_window_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_backoff < 1:
            raise ValueError(f"max_backoff={self.max_backoff} must be >= 1")


@dataclass(frozen=True)
class Decision:
    """What `AutoBudgetPolicy.update` decided.

    Attributes:
        budget: The budget new work should run at.
        pressure: The load signal this decision saw (1.0 = exactly at the SLO).
        step: -1 stepped down, +1 stepped up, 0 stayed.
        reason: A short human-readable explanation (for logs).
    """

    budget: str
    pressure: float
    step: int
    reason: str


DEFAULT_MAX_QUEUE = 4
REJECTION_PRESSURE = 2.0


class AutoBudgetPolicy:
    """Chooses a budget from the observed load, with hysteresis.

    Thread-safe (one lock); time is always passed in, so it is deterministic.

    Args:
        config: The policy settings.
        start: The starting budget (default: the largest).

    Example:
        >>> p = AutoBudgetPolicy(PolicyConfig(("S", "M", "L", "XL"), max_queue=4, down_hold_s=0, down_cooldown_s=0))
        >>> p.update(now=0.0, queue_depth=10).budget
        'L'
        >>> p.update(now=0.1, queue_depth=10).budget
        'M'
    """

    def __init__(self, config: PolicyConfig, start: str | None = None):
        self.config = config
        if config.target_latency_s is None and config.max_queue is None:
            self._max_queue: float | None = DEFAULT_MAX_QUEUE
        else:
            self._max_queue = config.max_queue
        top = len(config.budgets) - 1
        self._level = top if start is None else list(config.budgets).index(start)
        self._latencies: deque[tuple[float, float]] = deque(maxlen=1024)
        self._rejections: deque[float] = deque(maxlen=1024)
        self._over_since: float | None = None
        self._healthy_since: float | None = None
        self._last_change = -math.inf
        self._last_up = -math.inf
        self._backoff = 1.0
        self._backoff_mark = -math.inf
        self._last_pressure = 0.0
        self.switches = {"down": 0, "up": 0}
        self._lock = threading.Lock()

    # ------------------------------------------------------------ observing
    @property
    def budget(self) -> str:
        """The budget the policy currently recommends."""
        return self.config.budgets[self._level]

    @property
    def pressure(self) -> float:
        """The pressure seen by the last `update`."""
        return self._last_pressure

    def observe_latency(self, now: float, seconds: float) -> None:
        """Record one request's time to first token (queue wait + prefill)."""
        with self._lock:
            self._latencies.append((now, seconds))

    def observe_rejection(self, now: float) -> None:
        """Record one request refused because the queue was full."""
        with self._lock:
            self._rejections.append(now)

    def _latency_quantile(self, now: float) -> float | None:
        horizon = now - self.config.latency_window_s
        while self._latencies and self._latencies[0][0] < horizon:
            self._latencies.popleft()
        if not self._latencies:
            return None
        values = sorted(v for _, v in self._latencies)
        k = min(len(values) - 1, max(0, math.ceil(self.config.latency_quantile * len(values)) - 1))
        return values[k]

    def _pressure(self, now: float, queue_depth: float) -> float:
        signals = [0.0]
        if self._max_queue is not None:
            signals.append(queue_depth / self._max_queue)
        if self.config.target_latency_s is not None:
            q = self._latency_quantile(now)
            if q is not None:
                signals.append(q / self.config.target_latency_s)
        while self._rejections and self._rejections[0] < now - self.config.latency_window_s:
            self._rejections.popleft()
        if self._rejections:
            signals.append(REJECTION_PRESSURE)
        return max(signals)

    # ------------------------------------------------------------- deciding
    def update(self, now: float, queue_depth: float) -> Decision:
        """Take the current queue depth into account and decide the budget.

        Args:
            now: The current time in seconds (any monotonic clock).
            queue_depth: Requests waiting to start (the server passes those beyond the next batch).

        Returns:
            The decision; `budget` is what new work should run at.
        """
        with self._lock:
            cfg = self.config
            p = self._pressure(now, queue_depth)
            self._last_pressure = p
            if self._backoff > 1 and now - max(self._last_change, self._backoff_mark) >= 4 * cfg.up_hold_s * self._backoff:
                self._backoff = max(1.0, self._backoff / 2)  # calm for a long while: trust climbing again
                self._backoff_mark = now
            if p > 1.0:
                self._healthy_since = None
                if self._over_since is None:
                    self._over_since = now
                held = now - self._over_since >= cfg.down_hold_s
                cooled = now - self._last_change >= cfg.down_cooldown_s
                if self._level > 0 and held and cooled:
                    if now - self._last_up < cfg.up_hold_s * self._backoff:
                        self._backoff = min(cfg.max_backoff, self._backoff * 2)
                    return self._step(now, -1, p, f"pressure {p:.2f} > 1")
                return Decision(self.budget, p, 0, "behind, holding" if self._level > 0 else "behind at the smallest budget")
            self._over_since = None
            if p < cfg.low_water:
                if self._healthy_since is None:
                    self._healthy_since = now
                hold = cfg.up_hold_s * self._backoff
                if (
                    self._level < len(cfg.budgets) - 1
                    and now - self._healthy_since >= hold
                    and now - self._last_change >= hold
                ):
                    return self._step(now, +1, p, f"pressure {p:.2f} < {cfg.low_water} for {hold:.2f} s")
                return Decision(self.budget, p, 0, "ahead, waiting to step up" if self._level < len(cfg.budgets) - 1 else "ahead")
            self._healthy_since = None
            return Decision(self.budget, p, 0, "within the hysteresis band")

    def _step(self, now: float, step: int, pressure: float, reason: str) -> Decision:
        self._level += step
        self._last_change = now
        if step > 0:
            self._last_up = now
            self._healthy_since = now
            self.switches["up"] += 1
        else:
            self._over_since = now
            self.switches["down"] += 1
        # Latencies and refusals seen at the old budget say little about the new one.
        self._latencies.clear()
        self._rejections.clear()
        return Decision(self.budget, pressure, step, reason)
