"""Size and time bounds on HTTP requests, enforced before any route runs.

A pure ASGI wrapper reads a request body itself, bounded in size (413) and in time (408), then hands
the app the whole body at once. So a 50 MB body is refused without being buffered, and a slowloris
body (a byte every few seconds) is cut after `body_timeout_s` instead of holding a connection and a
coroutine forever. Requests without a body (GET, HEAD, ...) pass straight through.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import msgspec
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from exo_master.http.errors import error_body

_json = msgspec.json.Encoder()
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


@dataclass(frozen=True)
class ApiLimits:
    """The HTTP bounds; every one has a daemon flag and is listed in the README ("Bounds")."""

    max_body_bytes: int = 8 * 1024 * 1024
    body_timeout_s: float = 30.0
    keep_alive_s: float = 5.0
    max_prompt_chars: int = 1_000_000


async def send_error(
    send: Send, status: int, message: str, code: str, type_: str = "invalid_request_error"
) -> None:
    body = _json.encode(error_body(message, type_, code))
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                # The rest of the body is never read: the connection cannot be reused.
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return -1
    return None


class BodyReads:
    """The request bodies being read right now, so that shutdown can end each at once (503)."""

    def __init__(self) -> None:
        self.active: set[asyncio.Timeout] = set()
        self.stopping: str | None = None

    def stop(self, reason: str) -> None:
        self.stopping = reason
        now = asyncio.get_running_loop().time()
        for timeout in self.active:
            timeout.reschedule(now)  # fires at once: the reader answers 503 instead of 408


class BoundedBody:
    def __init__(self, app: ASGIApp, limits: ApiLimits, reads: BodyReads | None = None) -> None:
        self.app = app
        self.limits = limits
        self.reads = reads or BodyReads()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        limit = self.limits.max_body_bytes
        declared = _declared_length(scope)
        if declared is not None and declared < 0:
            await send_error(send, 400, "the Content-Length header is not a number", "invalid_header")
            return
        if declared is not None and declared > limit:
            await send_error(send, 413, self._too_large(declared), "body_too_large")
            return
        if self.reads.stopping is not None:
            await send_error(send, 503, self.reads.stopping, "shutting_down", "service_unavailable")
            return
        chunks: list[bytes] = []
        size = 0
        cut: str | None = None  # why the read stopped early: "too_large", "timeout" or "stopping"
        deadline = asyncio.timeout(self.limits.body_timeout_s)
        try:
            async with deadline:
                # Registered only while entered: shutdown reschedules it (allowed only then).
                self.reads.active.add(deadline)
                try:
                    while True:
                        message = await receive()
                        if message["type"] == "http.disconnect":
                            return  # the client left before sending its body: nobody to answer
                        chunk = message.get("body", b"")
                        size += len(chunk)
                        if size > limit:
                            cut = "too_large"
                            break
                        chunks.append(chunk)
                        if not message.get("more_body", False):
                            break
                finally:
                    self.reads.active.discard(deadline)
        except TimeoutError:
            cut = "stopping" if self.reads.stopping is not None else "timeout"
        if cut == "too_large":
            await send_error(send, 413, self._too_large(size), "body_too_large")
        elif cut == "stopping":
            await send_error(send, 503, self.reads.stopping or "", "shutting_down", "service_unavailable")
        elif cut == "timeout":
            timeout = self.limits.body_timeout_s
            why = f"the request body did not arrive within {timeout:g} s (--body-timeout)"
            await send_error(send, 408, why, "body_timeout")
        if cut is not None:
            return
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    def _too_large(self, size: int) -> str:
        return (
            f"the request body has {size}+ bytes; this server accepts at most "
            f"{self.limits.max_body_bytes} (--max-body-bytes)"
        )


def _replay(body: bytes, receive: Receive) -> Receive:
    """The whole body in one message, then the real channel (which reports the disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
