"""A cap on the API's open connections, enforced when a connection is accepted, so descriptors never
run out and /health still answers while someone holds a thousand slow request bodies open.

uvicorn's own `limit_concurrency` is no help here: it still accepts and reads the request head of
every connection past the limit, then answers 503 to all of them, /health included.

Connections are in one of two states: waiting on the client (reading a request, or idle between
keep-alive requests) or being answered (a whole request arrived; its response, maybe a long stream,
is under way). At the cap, a new connection takes the place of the one that has waited on its client
the longest: that one is closed at once. Connections being answered are never closed for a newcomer;
if every connection is being answered, the newcomer is closed at once instead. Both are counted
(exo_http_connections_evicted_total, exo_http_connections_refused_total) and logged (1, 2, 4, ...
lines, never a flood).

The default cap comes from the open-files limit (RLIMIT_NOFILE), which the daemon first raises to
its hard limit where allowed, keeping room for the bus sockets, the log files and the libraries:
`default_max_connections`.
"""

from __future__ import annotations

import asyncio
import resource
from collections import OrderedDict
from dataclasses import dataclass, field

import structlog

log = structlog.get_logger("exo_master.http.connections")

MAX_DEFAULT_CONNECTIONS = 4096
WANTED_NOFILE = 65_536


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft open-files limit towards the hard one (where allowed); return (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = WANTED_NOFILE if hard == resource.RLIM_INFINITY else min(hard, WANTED_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass  # not allowed here: the cap follows the limit we have
    return soft, hard


def default_max_connections(nofile_soft: int) -> int:
    """Leave an eighth of the descriptors (at least 64) to the bus, the logs and the libraries."""
    if nofile_soft == resource.RLIM_INFINITY:
        return MAX_DEFAULT_CONNECTIONS
    return max(8, min(MAX_DEFAULT_CONNECTIONS, nofile_soft - max(64, nofile_soft // 8)))


@dataclass
class ConnectionCounts:
    evicted: int = 0  # closed to make room for a newcomer (they waited on their client longest)
    refused: int = 0  # newcomers closed at once: every connection was being answered


@dataclass
class ConnectionCap:
    limit: int
    counts: ConnectionCounts = field(default_factory=ConnectionCounts)
    # Least recently active first. The value: the connection's transport.
    _waiting: OrderedDict[object, asyncio.Transport] = field(default_factory=OrderedDict)
    _answering: dict[object, asyncio.Transport] = field(default_factory=dict)

    @property
    def open(self) -> int:
        return len(self._waiting) + len(self._answering)

    def admit(self, conn: object, transport: asyncio.Transport) -> bool:
        """A connection was accepted: make room for it, or say no (the caller closes it)."""
        if self.open >= self.limit:
            if not self._waiting:
                self.counts.refused += 1
                self._say("http.connection_refused", self.counts.refused)
                return False
            _, victim_transport = self._waiting.popitem(last=False)
            self.counts.evicted += 1
            self._say("http.connection_evicted", self.counts.evicted)
            victim_transport.abort()  # its connection_lost follows: `closed` is then a no-op
        self._waiting[conn] = transport
        return True

    def answering(self, conn: object) -> None:
        """A whole request arrived on `conn`: it is being answered, never closed for a newcomer."""
        transport = self._waiting.pop(conn, None)
        if transport is not None:
            self._answering[conn] = transport

    def waiting(self, conn: object) -> None:
        """`conn` waits on its client again (its response ended, or a new request began)."""
        transport = self._answering.pop(conn, None) or self._waiting.pop(conn, None)
        if transport is not None:
            self._waiting[conn] = transport  # the most recently active, last

    def closed(self, conn: object) -> None:
        self._waiting.pop(conn, None)
        self._answering.pop(conn, None)

    def _say(self, event: str, total: int) -> None:
        if total & (total - 1) == 0:  # 1, 2, 4, ...: visible, never a flood
            log.warning(event, total=total, max_connections=self.limit, open=self.open)
