"""`balcony serve`: the OpenAI-compatible server, budget per request or from the load."""

from __future__ import annotations

import logging
import os

from ..modeling.loading import DEFAULT_MODEL, is_default
from ..serving.app import create_app
from ..serving.config import AUTO, ServeConfig
from ..serving.guard import (
    API_KEY_ENV,
    default_allowed_hosts,
    exposure_warning,
    resolve_api_key,
)
from .common import build_model, parse_exits
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
    api_key: str | None = None,
    allowed_hosts: str | None = None,
    allowed_origins: str | None = None,
    max_body_mb: float = 8.0,
    prefill_chunk: int = 256,
    chat_special_tokens: bool = False,
    auto_exits: str | None = None,
    confidence_vocab: int | None = None,
    dtype: str = "auto",
    device: str | None = None,
    log_level: str = "info",
    engine: str = "builtin",
    backend: list[str] | None = None,
    vllm_dir: str | None = None,
    vllm_max_model_len: int = 2048,
    vllm_kv_cache_mb: int = 512,
    vllm_draft: str | None = None,
    vllm_args: str = "",
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
        api_key: Require 'Authorization: Bearer KEY' on every /v1 route (default: $BALCONY_API_KEY; none if unset). The environment variable keeps the key out of the process list.
        allowed_hosts: Host names the server answers to besides localhost and IP addresses, comma-separated ('*': any; default: any on 0.0.0.0, else the --host name). Other names get 403 (DNS rebinding).
        allowed_origins: Browser origins allowed to call the server besides its own, comma-separated ('*': any); they get CORS headers. Other origins get 403.
        max_body_mb: Largest request body in MiB; larger ones get 413 before they are read.
        prefill_chunk: Prompt tokens per prefill pass; between passes, requests past their timeout or whose client left are dropped (0: one pass).
        chat_special_tokens: Parse control tokens such as <|im_end|> inside chat message content as control tokens (unsafe: a user can forge a system turn); by default they are plain text.
        auto_exits: Requests with a "threshold" (token-level exits) stop only at these exits, comma-separated (e.g. S,L; default all; `balcony eval --calibrate` says which pay).
        confidence_vocab: Token-level exits score confidence over the first this many token ids only (e.g. 8192; default all).
        dtype: Weights dtype: auto (bfloat16 on CUDA, else float32), float32, bfloat16, float16.
        device: cpu, cuda, cuda:1, mps (default: CUDA, then MPS, else the CPU).
        log_level: uvicorn/balcony log level (debug, info, warning).
        engine: builtin (balcony's own engine, one process) or vllm (one vLLM server per budget; needs vLLM, see docs/vllm.md).
        backend: vllm engine: BUDGET=URL of a vLLM server already serving that budget (repeatable); other budgets are started here.
        vllm_dir: vllm engine: where the budgets are exported (default: a temporary directory).
        vllm_max_model_len: vllm engine: context length of the servers started here.
        vllm_kv_cache_mb: vllm engine: KV-cache memory of each server started here (MiB).
        vllm_draft: vllm engine: B or B:K, the full budget drafts K tokens with budget B (vLLM speculative decoding, lossless).
        vllm_args: vllm engine: more `vllm serve` arguments for each server started here.
    """
    import uvicorn

    if engine not in ("builtin", "vllm"):
        raise ValueError(f"engine={engine!r} is not one of builtin, vllm")
    if engine == "builtin" and (backend or vllm_draft):
        raise ValueError("--backend and --vllm-draft need --engine vllm")
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    key = resolve_api_key(api_key, os.environ)
    warning = exposure_warning(host, key)
    if warning:
        logging.getLogger("balcony.serving").warning(warning)
    hosts = _names(allowed_hosts) if allowed_hosts else default_allowed_hosts(host)
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
        api_key=key,
        allowed_hosts=hosts,
        allowed_origins=_names(allowed_origins) if allowed_origins else (),
        max_body_bytes=int(max_body_mb * 2**20),
        prefill_chunk=prefill_chunk or None,
        chat_special_tokens=chat_special_tokens,
        token_exits=parse_exits(auto_exits, "--auto-exits"),
        confidence_vocab=confidence_vocab,
    )
    if engine == "vllm":
        from .serve_vllm import vllm_app

        app, where = vllm_app(model, exits, config, backend=backend, directory=vllm_dir, dtype=dtype, max_model_len=vllm_max_model_len,
                              kv_cache_mb=vllm_kv_cache_mb, draft=vllm_draft, extra_args=vllm_args)
        print(f"[balcony] serving {config.model_name} on http://{host}:{port}/v1 with vLLM engines: {where}; bare name = {default_budget}", flush=True)
        uvicorn.run(app, host=host, port=port, log_level=log_level.lower())
        return 0
    m, tok, trained = build_model(model, exits, dtype=dtype, device=device)
    app = create_app(m, tok, config)
    budgets = ", ".join(f"{b} (layer {j})" for b, j in m.budgets.items())
    note = "" if trained else " [exits UNTRAINED: pass --exits DIR for trained ones]"
    guard = "API key required" if key else f"no API key (set {API_KEY_ENV})"
    print(f"[balcony] serving {config.model_name} on http://{host}:{port}/v1 - budgets {budgets}; bare name = {default_budget}; {guard}{note}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level.lower())
    return 0


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())
