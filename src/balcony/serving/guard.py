"""Who may talk to the server: the API key, JSON-only POSTs, the body-size cap, and Host/Origin checks against browsers.

A server on 127.0.0.1 is reachable from every web page its user opens: a page
can POST a "simple" cross-origin request (``text/plain``, no preflight), and
with DNS rebinding (a name of the attacker's that resolves to 127.0.0.1) it
can even read the answers. `Guard`, an ASGI middleware in front of the app,
closes both doors and adds the API key:

* **Host**: a request must name this server: ``localhost`` (or a subdomain of
  it), an IP address, or a name in `ServeConfig.allowed_hosts` (``*``: any).
  DNS rebinding always arrives under the attacker's name, so it is refused.
* **Origin**: a browser's request must come from this server's own origin or
  one in `ServeConfig.allowed_origins` (``*``: any); these also get CORS headers.
* **API key**: with `ServeConfig.api_key` set, every ``/v1`` route needs
  ``Authorization: Bearer <key>`` (compared in constant time). ``/health`` and
  ``/metrics`` stay open for probes and scrapers.
* **Content type**: POST bodies must be ``application/json``, which a web page
  cannot send cross-origin without a preflight that this server does not grant.
* **Size**: a declared ``Content-Length`` over the cap is refused (413) before
  a byte of the body is read (`body.read_body` counts undeclared ones).

Errors have OpenAI's shape (`ApiError`).
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import TYPE_CHECKING, Sequence
from urllib.parse import urlsplit

from .body import too_large
from .errors import ApiError

if TYPE_CHECKING:  # heavy imports stay lazy: the CLI imports this module on every run
    from .config import ServeConfig


API_KEY_ENV = "BALCONY_API_KEY"
"""The environment variable `balcony serve` reads its API key from (vLLM's is VLLM_API_KEY)."""


WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def is_loopback(host: str) -> bool:
    """Whether listening on `host` keeps the server on this machine (``127.0.0.1``, ``::1``, ``localhost``).

    Example:
        >>> is_loopback("127.0.0.1"), is_loopback("0.0.0.0")
        (True, False)
    """
    name = host.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The start-up warning for a server reachable from other machines without an API key, else None.

    Example:
        >>> exposure_warning("127.0.0.1", None) is None
        True
        >>> "API key" in exposure_warning("0.0.0.0", None)
        True
    """
    if api_key or is_loopback(host):
        return None
    return (
        f"listening on {host or '*'} (beyond this machine) with no API key: anyone who can reach the port can generate. "
        f"Set {API_KEY_ENV} (or --api-key) to require 'Authorization: Bearer <key>' on /v1."
    )


def default_allowed_hosts(host: str) -> tuple[str, ...]:
    """The Host names a server listening on `host` answers to besides localhost and IP addresses.

    On a wildcard address (``0.0.0.0``) the names it is reached under are not
    known, so any is accepted (set ``--allowed-hosts`` to narrow it); on a named
    address, that name.
    """
    if host in WILDCARD_HOSTS:
        return ("*",)
    return () if is_loopback(host) else (host.lower(),)


class Guard:
    """ASGI middleware: Host, Origin, API key, content type and declared size, checked before the app runs.

    Args:
        app: The ASGI app behind it.
        config: The server settings (`api_key`, `allowed_hosts`, `allowed_origins`, `max_body_bytes`).
    """

    def __init__(self, app, config: "ServeConfig"):
        self.app = app
        self.api_key = config.api_key.encode() if config.api_key else None
        self.any_host = "*" in config.allowed_hosts
        self.hosts = {h.lower().strip("[]") for h in config.allowed_hosts}
        self.any_origin = "*" in config.allowed_origins
        self.origins = {o.lower().rstrip("/") for o in config.allowed_origins}
        self.max_body = config.max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            error = self.check(scope["method"], scope["path"], _headers(scope))
            if error is not None:
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def check(self, method: str, path: str, headers: dict[str, str]) -> ApiError | None:
        """The error that refuses this request, or None to let it through."""
        host = headers.get("host", "")
        if host and not self.host_ok(host):
            return ApiError(
                403, f"Host {host[:100]!r} is not served here: use localhost or an IP address, or start the server with "
                "--allowed-hosts naming it (this refuses DNS-rebinding attacks from web pages).",
                code="forbidden_host",
            )
        origin = headers.get("origin")
        if origin is not None and not self.origin_ok(origin, host):
            return ApiError(
                403, f"Requests from web pages of origin {origin[:100]!r} are refused; start the server with "
                "--allowed-origins naming it to allow them.",
                code="forbidden_origin",
            )
        if self.api_key is not None and (path == "/v1" or path.startswith("/v1/")):
            error = self.key_error(headers.get("authorization"))
            if error is not None:
                return error
        if method == "POST":
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return ApiError(
                    415, f"Unsupported Content-Type {ctype or 'none'!r}: send the JSON body with 'Content-Type: application/json' "
                    "(curl: -H 'Content-Type: application/json').",
                    code="unsupported_media_type",
                )
            declared = headers.get("content-length", "").strip()
            if declared.isdigit() and int(declared) > self.max_body:
                return too_large(self.max_body, int(declared))
        return None

    def key_error(self, authorization: str | None) -> ApiError | None:
        if not authorization:
            return ApiError(
                401, "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
            )
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("utf-8", "replace"), self.api_key):
            return ApiError(401, "Incorrect API key provided.", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return None

    def host_ok(self, host: str) -> bool:
        if self.any_host:
            return True
        name = _hostname(host)
        if name is None:
            return False
        if name == "localhost" or name.endswith(".localhost") or name in self.hosts:
            return True
        try:  # an address, not a name: DNS rebinding needs a name
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return False

    def origin_ok(self, origin: str, host: str) -> bool:
        origin = origin.strip().lower().rstrip("/")
        if self.any_origin or origin in self.origins:
            return True
        try:
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                return False  # "null" (sandboxed frames, file://) or something stranger
            theirs = (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
            here = urlsplit(f"//{host.lower()}")
            ours = (here.hostname, here.port or (443 if parts.scheme == "https" else 80))
        except ValueError:
            return False
        return theirs == ours  # a page served by this very server (e.g. FastAPI's /docs)


def _headers(scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def _hostname(host: str) -> str | None:
    try:
        name = urlsplit(f"//{host.strip()}").hostname
    except ValueError:
        return None
    return name.lower() if name else None


def resolve_api_key(flag: str | None, environ: Sequence[tuple[str, str]] | dict[str, str]) -> str | None:
    """The API key: ``--api-key`` if given, else ``$BALCONY_API_KEY``; None (no key) when both are empty.

    ``OPENAI_API_KEY`` is deliberately not read: it is a client's credential for
    api.openai.com, often set in the same shell, and a server must not adopt it.

    Example:
        >>> resolve_api_key(None, {"BALCONY_API_KEY": "k"})
        'k'
    """
    env = dict(environ)
    key = flag if flag else env.get(API_KEY_ENV)
    return key.strip() or None if key else None
