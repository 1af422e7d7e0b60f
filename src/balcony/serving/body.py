"""Request bodies: read under a size cap, parsed as JSON, and checked for what JSON allows but Unicode and we do not.

`read_body` stops reading (413) as soon as a body passes the cap, whether or not
it announced its length; `parse_json` turns every malformed body into a 400
naming the problem: bad JSON, nesting deeper than `MAX_DEPTH`, and strings
(values or field names) holding a lone UTF-16 surrogate such as ``"\\ud800"``,
which JSON can spell but no UTF-8 tokenizer or response can carry. Numbers
that are NaN or infinite are left to the field validation (`protocol`), which
names the field.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from .errors import ApiError, ClientGone

if TYPE_CHECKING:  # heavy imports stay lazy: the CLI imports this module on every run
    from fastapi import Request


MAX_DEPTH = 32
"""Deepest nesting of arrays and objects accepted (a chat body needs 5: body, messages, message, content, part)."""


def too_large(limit: int, size: int | None = None) -> ApiError:
    """The 413 for a body over `limit` bytes."""
    seen = f" ({size} bytes)" if size is not None else ""
    return ApiError(
        413, f"The request body{seen} is larger than this server accepts ({limit} bytes; see --max-body-mb).",
        code="request_too_large",
    )


async def read_body(request: "Request", limit: int) -> bytes:
    """The body of `request`, or a 413 as soon as it passes `limit` bytes.

    A declared ``Content-Length`` over the limit is refused before reading
    anything; a chunked body is counted as it arrives.

    Raises:
        ApiError: 413 past the limit, 400 for an unreadable Content-Length.
        ClientGone: the client hung up before sending the whole body.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise ApiError(400, f"Invalid Content-Length header: {declared[:40]!r}.", code="invalid_request")
        if int(declared) > limit:
            raise too_large(limit, int(declared))
    from starlette.requests import ClientDisconnect

    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone() from None
    return b"".join(chunks)


def parse_json(raw: bytes) -> Any:
    """Parse a request body; every way it can be malformed is a 400.

    Example:
        >>> parse_json(b'{"model": "m"}')
        {'model': 'm'}

    Raises:
        ApiError: 400 ``invalid_json`` for bad JSON or nesting deeper than `MAX_DEPTH`,
            400 ``invalid_value`` for a lone surrogate (its field is the `param`).
    """
    try:
        body = json.loads(raw)
    except RecursionError:  # the decoder's own limit, far deeper than MAX_DEPTH
        raise _too_deep() from None
    except ValueError as e:  # JSONDecodeError, bad UTF-8, integers of more than 4300 digits
        raise ApiError(
            400, f"We could not parse the JSON body of your request ({_short(str(e), 200)}). The OpenAI API expects a JSON payload.",
            code="invalid_json",
        ) from None
    check_tree(body)
    return body


def check_tree(value: Any) -> None:
    """Refuse nesting deeper than `MAX_DEPTH` and strings that are not valid Unicode (iteratively: no recursion)."""
    stack: list[tuple[Any, int, str]] = [(value, 1, "")]
    while stack:
        item, depth, path = stack.pop()
        if isinstance(item, str):
            _check_text(item, path, key=False)
        elif isinstance(item, (dict, list)):
            if depth > MAX_DEPTH:
                raise _too_deep()
            if isinstance(item, dict):
                for name, sub in item.items():
                    _check_text(name, path, key=True)
                    stack.append((sub, depth + 1, f"{path}.{name}" if path else name))
            else:
                for i, sub in enumerate(item):
                    if isinstance(sub, (str, dict, list)):
                        stack.append((sub, depth + 1, f"{path}[{i}]"))


def _check_text(text: str, path: str, key: bool) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        if key:
            where = "Invalid field name" + (f" in '{path}'" if path else "")
        else:
            where = f"Invalid '{path}'" if path else "Invalid body"
        raise ApiError(
            400, f"{where}: the string holds a lone UTF-16 surrogate (\\u{ord(text[e.start]):04x}) at character {e.start}, "
            "which is not valid Unicode; send surrogate pairs or UTF-8.",
            param=path or None, code="invalid_value",
        ) from None


def _too_deep() -> ApiError:
    return ApiError(400, f"The JSON body is nested more than {MAX_DEPTH} levels deep; requests need at most a few.", code="invalid_json")


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
