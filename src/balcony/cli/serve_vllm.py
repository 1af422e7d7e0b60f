"""The vLLM side of `balcony serve --engine vllm`: export the budgets, start one vLLM server per budget, build the front end.

Budgets given as ``--backend S=http://host:port`` are servers already running
elsewhere; every other budget is exported (`balcony.vllm.export`) and served by
a ``vllm serve`` process that balcony starts on a free loopback port, with vLLM's
own Python (`balcony.vllm.launch.vllm_python`), and stops when it stops.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from ..modeling.config import BalconyConfig
from ..modeling.saving import resolve_exits_dir
from ..serving.config import ServeConfig
from ..serving.vllm_backend import Backend, create_vllm_app, parse_backends
from ..vllm.export import export_vllm, read_budget
from ..vllm.launch import serve_command, vllm_env, vllm_python


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def meta_model(base: str, config: BalconyConfig):
    """The `BalconyModel` of `base` with `config`'s exits on the meta device: budgets and validation, no weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..modeling.model import BalconyModel

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    return BalconyModel(skeleton, BalconyConfig(exit_layers=config.exit_layers, budget_names=config.budget_names, exit_kind=config.exit_kind))


def stop_processes(backends: dict[str, Backend], grace_s: float = 10.0) -> None:
    """Stop the vLLM servers balcony started (their process groups: vLLM runs an engine process under each)."""
    started = [be.process for be in backends.values() if be.process is not None and be.process.poll() is None]
    for p in started:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    for p in started:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def wait_until_up(backends: dict[str, Backend], timeout_s: float) -> None:
    """Block until every started server answers ``/health`` (and report its model id).

    Raises:
        RuntimeError: a server exited or did not come up in time; the message holds the end of its log.
    """
    import httpx

    started = {b: be for b, be in backends.items() if be.process is not None}
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=2.0) as client:
        while True:
            pending = []
            for b, be in started.items():
                if be.process.poll() is not None:
                    raise RuntimeError(f"the vLLM server of budget {b} exited with code {be.process.returncode}:\n{_tail(be.log_path)}")
                try:
                    if client.get(f"{be.url}/health").status_code == 200:
                        be.model = be.model or client.get(f"{be.url}/v1/models").json()["data"][0]["id"]
                        be.mark(True)
                        continue
                except httpx.HTTPError:
                    pass
                pending.append(b)
            if not pending:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the vLLM server(s) of budget(s) {pending} did not come up within {timeout_s:g} s:\n{_tail(started[pending[0]].log_path)}")
            time.sleep(1.0)


def _tail(path: str | None, n: int = 3000) -> str:
    return Path(path).read_text(errors="replace")[-n:] if path and Path(path).is_file() else "(no log)"


def vllm_app(
    model: str | None,
    exits: str | None,
    config: ServeConfig,
    *,
    backend: list[str] | None = None,
    directory: str | None = None,
    dtype: str = "float32",
    max_model_len: int = 2048,
    kv_cache_mb: int = 512,
    draft: str | None = None,
    extra_args: str = "",
    start_timeout_s: float = 900.0,
):
    """Build the `--engine vllm` front end; returns (app, one-line description of what serves what).

    Args:
        model: Base path or hub id (None: what the exits name, or the embedded model).
        exits: Saved exits (None: fresh untrained exits, saved next to the export).
        config: Server settings; its context length becomes `max_model_len`.
        backend: ``BUDGET=URL`` for budgets served by vLLM servers already running.
        directory: Where to export the budgets (default: a temporary directory).
        dtype: vLLM's dtype for the servers balcony starts.
        max_model_len: Their context length.
        kv_cache_mb: Their KV-cache memory (MiB).
        draft: ``B`` or ``B:K``: the full budget's server drafts K tokens (default 3) with budget B
            through vLLM's speculative decoding (its output stays the full model's).
        extra_args: More ``vllm serve`` arguments for every server balcony starts.
        start_timeout_s: How long to wait for the servers to come up.
    """
    import logging

    from transformers import AutoTokenizer

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health check otherwise
    out = Path(directory or tempfile.mkdtemp(prefix="balcony-vllm-"))
    if exits is None:
        from .common import build_model

        fresh, _, _ = build_model(model, None)
        exits = str(out / "untrained-exits")
        fresh.save_pretrained(exits)
        del fresh
    exits_config = BalconyConfig.load(resolve_exits_dir(exits))
    urls = parse_backends(backend, list(exits_config.budget_names or []))  # bad --backend fails before any work
    exported = {e.budget: e for e in export_vllm(exits, out, base=model, overwrite=True)}
    budgets = list(exported)
    full = budgets[-1]
    draft_budget, draft_tokens = _parse_draft(draft, budgets)
    python = vllm_python() if len(urls) < len(budgets) else None
    backends: dict[str, Backend] = {}
    try:
        for b, e in exported.items():
            if b in urls:
                backends[b] = Backend(b, urls[b])
                continue
            port = free_port()
            extra = shlex.split(extra_args)
            if draft_budget and b == full:
                spec = {"method": "draft_model", "model": str(exported[draft_budget].path), "num_speculative_tokens": draft_tokens}
                extra += ["--speculative-config", json.dumps(spec)]
            cmd = serve_command(e.path, port, python=python, served_name=f"{config.model_name}:{b}", dtype=dtype,
                                max_model_len=max_model_len, kv_cache_bytes=kv_cache_mb << 20, extra=extra)
            log_path = str(out / f"vllm-{b}.log")
            with open(log_path, "w") as logf:
                proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=vllm_env(), start_new_session=True)
            backends[b] = Backend(b, f"http://127.0.0.1:{port}", process=proc, log_path=log_path)
        print(f"[balcony] starting {sum(be.process is not None for be in backends.values())} vLLM server(s); logs in {out}", flush=True)
        wait_until_up(backends, start_timeout_s)
    except BaseException:
        stop_processes(backends)
        raise
    base = read_budget(exported[full].path)["base_model"]
    tokenizer = AutoTokenizer.from_pretrained(exported[full].path)
    config.context_length = config.context_length or max_model_len
    app = create_vllm_app(meta_model(base, exits_config), tokenizer, backends, config, on_shutdown=lambda: stop_processes(backends))
    where = ", ".join(f"{b} -> {be.url}" for b, be in backends.items())
    return app, where + (f"; {full} drafts with {draft_budget} ({draft_tokens} tokens)" if draft_budget else "")


def _parse_draft(draft: str | None, budgets: list[str]) -> tuple[str | None, int]:
    if not draft:
        return None, 0
    name, _, k = draft.partition(":")
    match = [b for b in budgets[:-1] if b.lower() == name.strip().lower()]
    if not match:
        raise ValueError(f"--vllm-draft {draft!r}: the draft must be a budget below the full one: {', '.join(budgets[:-1])}")
    if k and (not k.isdigit() or int(k) < 1):
        raise ValueError(f"--vllm-draft {draft!r}: the token count after ':' must be a positive integer, e.g. S:3")
    return match[0], int(k) if k else 3
