"""What the vLLM tests share: tiny bases with a head size vLLM's CPU attention takes, saved exits, servers in threads."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_base, tiny_hf_tokenizer

from balcony import BalconyConfig, BalconyModel
from balcony.vllm.launch import SETUP_HINT, vllm_python

# vLLM's CPU attention supports head sizes 32, 64, 80, ...: 64 hidden / 2 heads = 32.
VLLM_SHAPE = dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, intermediate_size=128)


def save_tiny_base(directory: Path, family: str = "llama", **overrides) -> tuple[Path, object]:
    """A tiny random base of `family` (head size 32) and the word-level tokenizer, saved to `directory`."""
    tok = tiny_hf_tokenizer()
    base = tiny_base(family, vocab_size=len(tok), **{**VLLM_SHAPE, **overrides})
    base.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory, base


def perturb_exits(model: BalconyModel, seed: int, scale: float) -> None:
    """Fixed-seed random exits: add seeded noise (relative to each tensor's mean magnitude) to every exit weight."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.exits.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * (p.abs().mean() + 1e-3))


def save_exits(directory: Path, base, base_dir: Path | str, exit_layers: list[int], *, seed: int = 1, scale: float = 0.5, **config) -> BalconyModel:
    """Exits on `base` (fixed-seed random unless scale=0) saved like `BalconyModel.save_pretrained`; returns the model."""
    model = BalconyModel(base, BalconyConfig(exit_layers=exit_layers, base_model_name_or_path=str(base_dir), **config))
    if scale:
        perturb_exits(model, seed, scale)
    model.save_pretrained(directory)
    return model.eval()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_app(app, port: int | None = None):
    """Run a FastAPI app with uvicorn on 127.0.0.1 in a daemon thread; yields its port (``app.state.uvicorn`` stops it)."""
    import uvicorn

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", timeout_graceful_shutdown=1))
    app.state.uvicorn = server
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        yield port
    finally:
        server.should_exit = True
        thread.join(30)


def require_vllm() -> str:
    """vLLM's Python, or skip (fail under BALCONY_REQUIRE_VLLM=1, as CI sets) saying how to create it."""
    python = vllm_python(required=False)
    if python is None:
        message = f"vLLM is not installed: {SETUP_HINT}"
        if os.environ.get("BALCONY_REQUIRE_VLLM") == "1":
            pytest.fail(message + " (BALCONY_REQUIRE_VLLM=1: these tests must run)")
        pytest.skip(message)
    return python
