"""The OpenAI-compatible server: per-request and load-adaptive budgets (needs the `serve` extra: fastapi, uvicorn)."""

from .app import create_app
from .config import ServeConfig
from .policy import AutoBudgetPolicy, PolicyConfig
from .text import TextStream

__all__ = ["AutoBudgetPolicy", "PolicyConfig", "ServeConfig", "TextStream", "create_app"]
