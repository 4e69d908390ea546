"""`GET /v1/events`: the cluster's state changes as Server-Sent Events, for the dashboard and scripts.

    curl -N http://127.0.0.1:52415/v1/events

Events (each `data:` is one JSON object):
    state    the whole picture: nodes, instances, models, requests in flight (first on connect,
             then whenever something other than a heartbeat age changed, and every few seconds)
    change   one transition, for scripts: {"kind": "node", "id", "from", "to"} with to in
             joined | alive | dead | gone, or {"kind": "instance", "id", "from", "to"} with the
             instance status (loading | ready | failed | dead | gone)
    stats    one point of the charts (`live_stats.StatsPoint`); the first `state` carries the
             recent history as `stats`

The hub looks at the core's read-only view on a timer and diffs it, so the core needs no hook and
a burst of heartbeats costs one diff. Bounds: at most MAX_CLIENTS streams (then 503); each client
has its own queue of QUEUE_EVENTS events, and a client that lets it fill (it does not read) is
dropped with a last `dropped` event, so a slow reader never holds memory or slows the others.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from exo_master.http.errors import ApiError
from exo_master.http.live_stats import LiveStats
from exo_master.runtime import MasterRuntime
from protocol.cluster_view import ClusterView, TaskStatus

MAX_CLIENTS = 32
QUEUE_EVENTS = 64
IN_FLIGHT_ROWS = 50
_json = msgspec.json.Encoder()
_LIVE = tuple(s for s in TaskStatus if not s.is_final)


def sse(event: str, data: Any) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + _json.encode(data) + b"\n\n"


def snapshot(view: ClusterView) -> dict[str, Any]:
    """What the dashboard draws: the view without ended tasks (they are `exoctl tasks`' business)."""
    in_flight = [t for t in view.tasks if t.status in _LIVE][:IN_FLIGHT_ROWS]
    return {
        "policy": view.policy,
        "session": view.session,
        "nodes": msgspec.to_builtins(view.nodes),
        "instances": msgspec.to_builtins(view.instances),
        "models": msgspec.to_builtins(view.models),
        "in_flight": msgspec.to_builtins(in_flight),
        "in_flight_total": sum(1 for t in view.tasks if t.status in _LIVE),
    }


def _without_ages(state: dict[str, Any]) -> bytes:
    """The snapshot minus what changes on every look (ages): what "changed" compares."""
    nodes = [{k: v for k, v in n.items() if k != "last_heartbeat_age"} for n in state["nodes"]]
    in_flight = [{k: v for k, v in t.items() if k != "age"} for t in state["in_flight"]]
    return _json.encode({**state, "nodes": nodes, "in_flight": in_flight})


def changes(before: dict[str, Any] | None, after: dict[str, Any]) -> list[dict[str, str]]:
    """Node and instance transitions between two snapshots (none against the first)."""
    if before is None:
        return []
    found: list[dict[str, str]] = []

    def nodes(state: dict[str, Any]) -> dict[str, str]:
        return {n["node_id"]: "alive" if n["alive"] else "dead" for n in state["nodes"]}

    def instances(state: dict[str, Any]) -> dict[str, str]:
        return {i["instance_id"]: i["status"] for i in state["instances"]}

    for kind, read, new in (("node", nodes, "joined"), ("instance", instances, None)):
        old, now = read(before), read(after)
        for ident, status in now.items():
            if ident not in old:
                found.append({"kind": kind, "id": ident, "from": "", "to": new or status})
            elif old[ident] != status:
                found.append({"kind": kind, "id": ident, "from": old[ident], "to": status})
        found += [{"kind": kind, "id": i, "from": s, "to": "gone"} for i, s in old.items() if i not in now]
    return found


class Client:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=QUEUE_EVENTS)
        self.dropped = False

    def offer(self, event: bytes) -> None:
        if self.dropped:
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped = True  # the stream ends after what it has queued; the rest is not kept


class EventHub:
    def __init__(
        self,
        runtime: MasterRuntime,
        stats: LiveStats,
        interval: float = 0.5,
        stats_every: float = 2.0,
        refresh_every: float = 5.0,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.runtime = runtime
        self.stats = stats
        self.interval = interval
        self.stats_every = stats_every
        self.refresh_every = refresh_every
        self.wall_clock = wall_clock
        self.clients: set[Client] = set()
        self.dropped = 0
        self.closed = False
        self._state: dict[str, Any] | None = None
        self._compared = b""

    def _look(self) -> dict[str, Any]:
        view = self.runtime.core.view(self.runtime.clock(), task_limit=IN_FLIGHT_ROWS * 4)
        return snapshot(view)

    def broadcast(self, event: bytes) -> None:
        for client in list(self.clients):
            client.offer(event)
            if client.dropped:  # its stream ends once it has read what is queued
                self.clients.discard(client)
                self.dropped += 1

    def step(self, refresh: bool) -> None:
        """One look: `change` events and a `state` when something changed (or `refresh`)."""
        state = self._look()
        compared = _without_ages(state)
        for change in changes(self._state, state):
            self.broadcast(sse("change", change))
        if compared != self._compared or refresh:
            self.broadcast(sse("state", state))
        self._state, self._compared = state, compared

    async def run(self) -> None:
        """Forever: a look every `interval` while anyone listens, a stats point every `stats_every`."""
        next_stats = next_refresh = 0.0
        self.stats.sample(self.wall_clock())
        while True:
            await asyncio.sleep(self.interval)  # wait-ok: the hub's own sampling period
            now = time.monotonic()
            if now >= next_stats:
                next_stats = now + self.stats_every
                point = self.stats.sample(self.wall_clock())
                if point is not None and self.clients:
                    self.broadcast(sse("stats", point.as_dict()))
            if self.clients:
                refresh = now >= next_refresh
                if refresh:
                    next_refresh = now + self.refresh_every
                self.step(refresh)

    def close(self) -> None:
        """End every stream (the master is stopping)."""
        self.closed = True
        for client in list(self.clients):
            client.dropped = True
            if client.queue.full():
                client.queue.get_nowait()
            client.queue.put_nowait(None)
        self.clients.clear()

    async def stream(self, client: Client) -> AsyncIterator[bytes]:
        try:
            state = self._look()
            yield sse("state", {**state, "stats": self.stats.history()})
            while not (client.dropped and client.queue.empty()):
                try:
                    event = await asyncio.wait_for(client.queue.get(), timeout=15)
                except TimeoutError:
                    yield b": keep-alive\n\n"  # proxies and browsers keep an idle stream open
                    continue
                if event is None:
                    break
                yield event
            if client.dropped and not self.closed:
                yield sse("dropped", {"reason": "this client read too slowly; reconnect"})
        finally:
            self.clients.discard(client)

    async def endpoint(self, request: Request) -> Response:
        if self.closed:
            raise ApiError(503, "the master is shutting down", "service_unavailable", code="shutting_down")
        if len(self.clients) >= MAX_CLIENTS:
            raise ApiError(
                503, f"too many event streams open (at most {MAX_CLIENTS})", "service_unavailable",
                code="too_many_streams",
            )  # fmt: skip
        client = Client()
        self.clients.add(client)
        headers = {"cache-control": "no-cache", "x-accel-buffering": "no"}
        return StreamingResponse(self.stream(client), media_type="text/event-stream", headers=headers)

    def route(self) -> Route:
        return Route("/v1/events", self.endpoint, methods=["GET"])
