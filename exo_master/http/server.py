"""The master's HTTP server plumbing: the listening socket, uvicorn without its signal handling,
and the event loop (uvloop where installed)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Iterator

import uvicorn


class QuietServer(uvicorn.Server):
    """uvicorn without its own signal handling: the daemon owns SIGINT/SIGTERM for every task."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where installed (Linux and macOS: a dependency there), else asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def bind_http(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: accepted sockets inherit the protocol, and asyncio sets TCP_NODELAY only on
    # sockets whose proto is IPPROTO_TCP. Without it uvicorn's separate header and body writes meet
    # Nagle and the client's delayed ACK: ~40 ms on every keep-alive request after the first.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock
