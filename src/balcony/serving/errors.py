"""Errors answered as OpenAI does, and the server's common error cases."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # heavy imports stay lazy: the CLI imports this module on every run

    pass


class ApiError(Exception):
    """An error answered as OpenAI does: ``{"error": {"message", "type", "param", "code"}}``.

    Args:
        status: HTTP status code.
        message: Human-readable explanation.
        type: OpenAI error type (``invalid_request_error``, ``server_error``, ...).
        param: The offending request field, if any.
        code: A machine-readable code (``model_not_found``, ...), if any.
        headers: Extra response headers (e.g. ``Retry-After``).
    """

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        param = None if self.param is None else _printable(self.param)
        return {"error": {"message": _printable(self.message), "type": self.type, "param": param, "code": self.code}}

    def response(self):
        from fastapi.responses import JSONResponse

        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _printable(text: str) -> str:
    """`text` as valid UTF-8: a lone surrogate (from a URL or a field the message quotes) is spelled ``\\udXXX``."""
    return text if text.isascii() else text.encode("utf-8", "backslashreplace").decode("utf-8")


def _queue_full(capacity: int) -> ApiError:
    return ApiError(
        429,
        f"The server is overloaded: its queue of {capacity} requests is full. Retry after a short wait.",
        type="server_error",
        code="server_overloaded",
        headers={"Retry-After": "1"},
    )


def _timeout(seconds: float) -> ApiError:
    return ApiError(504, f"The request did not finish within the server's timeout of {seconds:g} s.", type="server_error", code="timeout")


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


class SpeculativeUnavailable(RuntimeError):
    """The installed model cannot decode speculatively (yet)."""
