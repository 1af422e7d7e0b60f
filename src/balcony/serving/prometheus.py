"""A small thread-safe Prometheus registry: counters, histograms and live gauges, rendered as text.

Counts are Python integers and are printed in full (``1234567``, never
``1.23457e+06``: six significant digits would make a counter past a million
step wrongly under ``rate()``); other values are printed with ``repr``, the
shortest text that reads back as the same float.
"""

from __future__ import annotations

import math
import threading
from typing import Callable, Sequence

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
        self._values: dict[str, dict[tuple, int | float]] = {}
        self._hists: dict[str, dict[tuple, list]] = {}
        self._buckets: dict[str, tuple[float, ...]] = {}
        self._gauges: list[Callable[[], list[tuple[str, dict[str, str], float]]]] = []

    @staticmethod
    def _key(labels: dict[str, str] | None) -> tuple:
        return tuple(sorted((labels or {}).items()))

    def inc(self, name: str, labels: dict[str, str] | None = None, value: int | float = 1) -> None:
        """Add `value` to a counter (integers stay exact integers)."""
        with self._lock:
            series = self._values.setdefault(name, {})
            key = self._key(labels)
            series[key] = series.get(key, 0) + value

    def observe(self, name: str, value: float, labels: dict[str, str] | None = None, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        """Record one observation in a histogram."""
        with self._lock:
            bounds = self._buckets.setdefault(name, tuple(buckets))
            series = self._hists.setdefault(name, {})
            key = self._key(labels)
            counts = series.setdefault(key, [0] * (len(bounds) + 1) + [0.0])  # buckets..., count, sum
            for i, b in enumerate(bounds):
                if value <= b:
                    counts[i] += 1
            counts[-2] += 1
            counts[-1] += value

    def add_gauges(self, fn: Callable[[], list[tuple[str, dict[str, str], float]]]) -> None:
        """Register a callback that returns (name, labels, value) gauges at scrape time."""
        self._gauges.append(fn)

    def value(self, name: str, labels: dict[str, str] | None = None) -> int | float:
        """A counter's current value (0 if never touched)."""
        with self._lock:
            return self._values.get(name, {}).get(self._key(labels), 0)

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
                        lines.append(f"{name}{fmt(key)} {number(v)}")
                elif kind == "histogram":
                    bounds = self._buckets.get(name, ())
                    for key, counts in sorted(self._hists.get(name, {}).items()):
                        for b, c in zip(bounds, counts):
                            lines.append(f"{name}_bucket{fmt(key + (('le', number(b)),))} {number(c)}")
                        lines.append(f"{name}_bucket{fmt(key + (('le', '+Inf'),))} {number(counts[-2])}")
                        lines.append(f"{name}_count{fmt(key)} {number(counts[-2])}")
                        lines.append(f"{name}_sum{fmt(key)} {number(counts[-1])}")
                else:
                    for labels, v in gauges.get(name, []):
                        lines.append(f"{name}{fmt(labels)} {number(v)}")
        return "\n".join(lines) + "\n"


def number(value: int | float) -> str:
    """A sample value as the exposition format writes it: exact integers, round-tripping floats, +Inf/-Inf/NaN.

    Example:
        >>> number(1234567), number(2.0), number(0.1), number(float("inf"))
        ('1234567', '2', '0.1', '+Inf')
    """
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:  # every integer below 2**53 is exact in a float
        return str(int(value))
    return repr(value)


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
