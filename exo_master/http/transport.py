"""The HTTP transport under uvicorn: writes made in one loop iteration leave as one segment.

uvicorn writes a response's head and its body separately; for the small JSON answers of the hot
routes that doubled the send syscalls and the packets the client wakes for. The daemon hands
`coalescing_http_protocol()` to uvicorn as its `http` protocol class.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from exo_master.http.connection_cap import ConnectionCap


class _CoalescingTransport:
    """A transport whose writes made in one loop iteration leave as one write (one syscall, one
    TCP segment). uvicorn writes a response's head and its body separately; for the small JSON
    answers of the hot route that doubled the send syscalls and the packets the client wakes for.
    Everything else is the real transport's."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(bytes(data))

    def _flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def coalescing_http_protocol(cap: ConnectionCap | None = None) -> type[asyncio.Protocol] | str:
    """uvicorn's httptools protocol over a coalescing transport, within the connection cap if one is
    given (see connection_cap.py); "auto" where httptools is absent."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return "auto"

    class CoalescingHttpToolsProtocol(HttpToolsProtocol):
        _turned_away = False

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            # uvloop's transports are not asyncio.Transport subclasses, hence the cast.
            real = cast(asyncio.Transport, transport)
            if cap is not None and not cap.admit(self, real):
                self._turned_away = True
                real.abort()  # at once: nothing is read from a connection past the cap
                return
            coalescing = _CoalescingTransport(real, asyncio.get_running_loop())
            super().connection_made(coalescing)  # type: ignore[arg-type]

        def connection_lost(self, exc: Exception | None) -> None:
            if self._turned_away:
                return
            if cap is not None:
                cap.closed(self)
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            if cap is not None:
                cap.waiting(self)
            super().on_message_begin()

        def on_message_complete(self) -> None:
            if cap is not None:
                cap.answering(self)
            super().on_message_complete()

        def on_response_complete(self) -> None:
            if cap is not None:
                cap.waiting(self)
            super().on_response_complete()

    return CoalescingHttpToolsProtocol
