"""Bearer API keys and CORS for the HTTP API, as plain ASGI wrappers around the Starlette app.

A pure ASGI check (not a BaseHTTPMiddleware): one header lookup and a constant-time comparison
per request, no extra task or body wrapping on the hot route. Every path except the open ones
(`/health`, `/ready`, and the dashboard's static files at `/` and `/dashboard/`) needs
`Authorization: Bearer KEY` or, as Anthropic's clients send it, `x-api-key: KEY`; anything else
gets a 401 in the shape of the surface asked (OpenAI's `invalid_api_key`, Anthropic's
`authentication_error`, Ollama's `{"error"}`). Keys are only ever compared, never logged or shown.

CORS (Starlette's CORSMiddleware) is added only for the origins given, outside the key check, so a
browser's preflight (which carries no credentials) is answered and the 401s carry CORS headers too.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Sequence
from pathlib import Path

import msgspec
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from exo_master.http.errors import ApiError, ErrorStyle, error_payload

OPEN_PATHS = frozenset({"/health", "/ready", "/"})
# The dashboard's static files hold no data: the page asks for the key and sends it to the API.
OPEN_PREFIX = "/dashboard/"
_MISSING = ApiError(
    401,
    "Incorrect or missing API key: send the header 'Authorization: Bearer KEY' (or 'x-api-key: KEY').",
    "invalid_request_error",
    code="invalid_api_key",
)
_UNAUTHORIZED = {style: msgspec.json.encode(error_payload(_MISSING, style)) for style in ErrorStyle}


def style_of_path(path: str) -> ErrorStyle:
    """Which surface a path belongs to, for errors answered before any route runs."""
    if path.startswith("/v1/messages"):
        return ErrorStyle.ANTHROPIC
    if path.startswith("/api/"):
        return ErrorStyle.OLLAMA
    return ErrorStyle.OPENAI


def _headers(body: bytes) -> list[tuple[bytes, bytes]]:
    return [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"www-authenticate", b'Bearer realm="exo"'),
    ]


class ApiKeyError(ValueError):
    """An unusable key or key file: one line for the user."""


def read_keys(keys: Iterable[str], keys_file: Path | None) -> list[str]:
    """The keys from the command line plus those in the file (one per line; blank and # lines skipped)."""
    found = [k.strip() for k in keys if k.strip()]
    if keys_file is not None:
        try:
            text = keys_file.read_text()
        except OSError as exc:
            raise ApiKeyError(f"cannot read --api-keys-file {keys_file}: {exc.strerror or exc}") from None
        found += [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    for key in found:
        if not key.isascii() or not key.isprintable() or " " in key:
            raise ApiKeyError("an API key must be printable ASCII without spaces")
    return found


class ApiKeyAuth:
    """Let a request through only with a known bearer key (or to an open path)."""

    def __init__(self, app: ASGIApp, keys: Sequence[str]) -> None:
        assert keys, "ApiKeyAuth needs at least one key"
        self.app = app
        self._keys = [k.encode() for k in keys]

    def allowed(self, authorization: bytes | None, api_key: bytes | None = None) -> bool:
        if api_key is not None and authorization is None:
            token = api_key.strip()
        elif authorization is None:
            return False
        else:
            scheme, _, token = authorization.partition(b" ")
            if scheme.lower() != b"bearer":
                return False
            token = token.strip()
        # Compare with every key (no early exit), each in constant time.
        ok = False
        for key in self._keys:
            ok |= hmac.compare_digest(token, key)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        if scope["type"] != "http" or path in OPEN_PATHS or path.startswith(OPEN_PREFIX):
            await self.app(scope, receive, send)
            return
        authorization = api_key = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
            elif name == b"x-api-key":
                api_key = value
        if self.allowed(authorization, api_key):
            await self.app(scope, receive, send)
            return
        body = _UNAUTHORIZED[style_of_path(scope["path"])]
        await send({"type": "http.response.start", "status": 401, "headers": _headers(body)})
        await send({"type": "http.response.body", "body": body})


def secure_app(app: ASGIApp, api_keys: Sequence[str], cors_origins: Sequence[str]) -> ASGIApp:
    """Wrap the API: key check when keys are given, CORS outside it when origins are given."""
    if api_keys:
        app = ApiKeyAuth(app, api_keys)
    if cors_origins:
        app = CORSMiddleware(
            app,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["authorization", "content-type", "x-api-key", "anthropic-version"],
            expose_headers=["x-exo-task", "x-exo-instance", "x-exo-node"],
        )
    return app
