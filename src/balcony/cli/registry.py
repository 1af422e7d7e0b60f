"""The subcommand registry: `@command(name=...)` adds a typed function as `balcony <name>`."""

from __future__ import annotations

from typing import Callable

COMMANDS: dict[str, Callable[..., int]] = {}


def command(name: str | None = None) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Register the decorated function as ``balcony <name>`` (default: its name, underscores as dashes).

    Example:
        >>> @command(name="hello")
        ... def hello_command(who: str = "world") -> int:
        ...     print(f"hello {who}")
        ...     return 0
        >>> "hello" in COMMANDS
        True
        >>> del COMMANDS["hello"]
    """

    def register(fn: Callable[..., int]) -> Callable[..., int]:
        key = name or fn.__name__.replace("_", "-")
        if key in COMMANDS and COMMANDS[key] is not fn:
            raise ValueError(f"two commands are named {key!r}: {COMMANDS[key].__module__} and {fn.__module__}")
        COMMANDS[key] = fn
        return fn

    return register
