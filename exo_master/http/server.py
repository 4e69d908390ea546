"""The master's HTTP server plumbing: the listening socket, uvicorn without its signal handling,
and the event loop (uvloop where installed)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Iterator
from typing import Any

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


def api_server(app: Any, host: str, port: int, http: Any, keep_alive_s: float) -> QuietServer:
    """The API's uvicorn server: no logging or lifespan of its own, the given HTTP protocol."""
    return QuietServer(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=None,
            access_log=False,
            lifespan="off",
            # No proxy in front by default: skip uvicorn's per-request X-Forwarded-* wrapper.
            proxy_headers=False,
            http=http,
            timeout_keep_alive=max(1, round(keep_alive_s)),
            # Open requests were already ended (api.shutdown); uvicorn then cancels whatever is
            # left (a client that will not read) itself, before the daemon's own 3 s wait runs out.
            timeout_graceful_shutdown=2,
        )
    )
