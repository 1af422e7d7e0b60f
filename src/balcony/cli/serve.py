"""`balcony serve`: the OpenAI-compatible server, budget per request or from the load."""

from __future__ import annotations

import logging
import os

from ..modeling.loading import DEFAULT_MODEL, is_default
from ..serving.app import create_app
from ..serving.config import AUTO, ServeConfig
from .common import build_model
from .registry import command


def served_name(model: str | None) -> str:
    """The default served id: ``smollm2-135m`` for the embedded model, else the hub id / folder name."""
    if is_default(model):
        return DEFAULT_MODEL
    assert model is not None
    return os.path.basename(os.path.normpath(model)) if os.path.isdir(model) else model


@command()
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
    dtype: str = "auto",
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
        dtype: Weights dtype: auto (bfloat16 on CUDA, else float32), float32, bfloat16, float16.
        device: cpu, cuda, cuda:1, mps (default: CUDA, then MPS, else the CPU).
        log_level: uvicorn/balcony log level (debug, info, warning).
    """
    import uvicorn

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
