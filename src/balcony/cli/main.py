"""The `balcony` command line: the parser is built from each command's signature and docstring.

A subcommand is a typed function registered with `@command(name=...)` in its own
module under `balcony.cli`; its options and their help come from its signature
and the ``Args:`` section of its docstring, so they live in one place.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import time
import types
import typing

from .._version import __version__
from .registry import COMMANDS


def _arg_help(doc: str) -> dict[str, str]:
    helps: dict[str, str] = {}
    m = re.search(r"Args:\n(.*?)(\n\s*\n|\Z)", doc, re.S)
    if not m:
        return helps
    current = None
    for line in m.group(1).splitlines():
        hit = re.match(r"\s{4,8}(\w+):\s*(.*)", line)
        if hit:
            current = hit.group(1)
            helps[current] = hit.group(2)
        elif current:
            helps[current] += " " + line.strip()
    return helps


def _unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in re.split(r"[,\s]+", text.strip()) if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 14,17,20")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="balcony",
        description="Dynamic-depth inference for Hugging Face LLMs: one model, several compute budgets.",
    )
    parser.add_argument("--version", action="version", version=f"balcony {__version__}")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, fn in COMMANDS.items():
        doc = inspect.getdoc(fn) or ""
        sub = subs.add_parser(name, help=doc.splitlines()[0] if doc else "", description=doc.split("\n\nArgs:")[0])
        helps = _arg_help(doc)
        hints = typing.get_type_hints(fn)
        for pname, param in inspect.signature(fn).parameters.items():
            tp = _unwrap_optional(hints.get(pname, str))
            kwargs: dict = {"help": helps.get(pname, "")}
            if param.default is inspect.Parameter.empty:
                sub.add_argument(pname, type=tp, **kwargs)
                continue
            flag = "--" + pname.replace("_", "-")
            if tp is bool:
                sub.add_argument(flag, action=argparse.BooleanOptionalAction, default=param.default, **kwargs)
            elif typing.get_origin(tp) is list and typing.get_args(tp) == (str,):
                sub.add_argument(flag, action="append", default=param.default, metavar="VALUE", **kwargs)
            elif typing.get_origin(tp) is list:
                sub.add_argument(flag, type=_int_list, default=param.default, metavar="N,N,...", **kwargs)
            else:
                sub.add_argument(flag, type=tp, default=param.default, **kwargs)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `balcony ARGV...`; returns the exit status (2 for bad input, with the error on stderr)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    fn = COMMANDS[args.command]
    kwargs = {k: v for k, v in vars(args).items() if k != "command"}
    t0 = time.perf_counter()
    try:
        result = fn(**kwargs)
    except (ValueError, FileNotFoundError, OSError, ModuleNotFoundError) as e:
        print(f"balcony {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nbalcony {args.command}: interrupted after {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        return 130
    return int(result or 0)
