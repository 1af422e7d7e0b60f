"""`balcony` on the command line: one module per subcommand, each registered with `@command(name=...)`.

Command modules import the library lazily, inside the command, so `balcony --help`
stays quick and an optional extra (the server, lm-eval) is needed only by its command.
"""

from . import ablate, bench, demo, evaluate, export_vllm, generate, info, serve, train  # noqa: F401  (registers the commands)
from .main import build_parser, main
from .registry import COMMANDS, command

__all__ = ["COMMANDS", "build_parser", "command", "main"]
