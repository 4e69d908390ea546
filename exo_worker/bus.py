"""The worker's bus shell: ZeroMQ sockets to the master, envelope stamping, liveness, reconnect.

Bus contract: the master binds XPUB at HOST:PORT (master -> workers) and SUB at HOST:PORT+1
(workers -> master). The worker only connects (it binds nothing, so many workers share a machine):
a SUB to PORT subscribed to its node topic and the broadcast topic, and a PUB to PORT+1 on which
every message carries the master topic.

The master counts as alive while valid messages arrive from it (its heartbeats come every interval,
but any valid message proves the link). After `liveness` silent intervals it is lost. Reconnecting
is libzmq's job, with capped exponential backoff (RECONNECT_IVL doubling up to RECONNECT_IVL_MAX)
and ZMTP heartbeats that drop a half-open TCP connection (a master machine that vanished). The
sockets are deliberately never closed and recreated on loss: that races with a master that comes
back at the same moment (it sees the subscription, then an unsubscribe) and gains nothing, since
libzmq re-sends subscriptions on every reconnect. Tasks keep running and heartbeats keep being
published throughout; a (re)started master rebuilds its view of this worker from the next snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
import zmq
import zmq.asyncio

from exo_worker.bus_auth import ClientCurve, monitor_socket, watch_handshakes
from protocol import codec
from protocol.envelope import SequenceTracker, Stamper
from protocol.ids import NodeId
from protocol.messages import (
    AssignTask,
    CancelTask,
    FetchOutput,
    MasterHeartbeat,
    MasterMessage,
    NodeRefused,
    TaskAck,
    WorkerMessage,
)

log = structlog.get_logger("exo_worker.bus")

_MASTER_TYPES = (AssignTask, CancelTask, MasterHeartbeat, FetchOutput, TaskAck, NodeRefused)

# Explicit high-water marks: the default (1000) silently drops chunk bursts from many concurrent
# streams; 10k small frames per socket still bounds memory to a few MB if the master stalls.
DEFAULT_HWM = 10_000
MAX_MASTER_FRAME_BYTES = 64 * 1024 * 1024
# A short linger lets the last messages (final CANCELLED results at shutdown) flush, yet closing
# never blocks for long when the master is gone. Reconnects close with linger 0: nobody is listening.
DEFAULT_LINGER_MS = 100
# Messages handled per wake-up before yielding to the event loop, so a flood cannot starve tasks.
_RECV_BATCH = 256


@dataclass(frozen=True, slots=True)
class MasterAddress:
    host: str
    port: int

    @property
    def bus_endpoint(self) -> str:
        """The master's XPUB (master -> workers)."""
        return f"tcp://{self._host_part}:{self.port}"

    @property
    def inbox_endpoint(self) -> str:
        """The master's SUB (workers -> master), always the next port."""
        return f"tcp://{self._host_part}:{self.port + 1}"

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    @property
    def _host_part(self) -> str:
        return f"[{self.host}]" if self.is_ipv6 else self.host

    def __str__(self) -> str:
        return f"{self._host_part}:{self.port}"


def parse_master_address(text: str) -> MasterAddress:
    """Parse HOST:PORT (IPv6 as [ADDR]:PORT). PORT+1 must be a valid port too."""
    host, sep, port_text = text.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    port = int(port_text)
    if not 1 <= port <= 65534:
        raise ValueError(f"port must be in 1..65534 (the master also uses PORT+1), got {port}")
    return MasterAddress(host=host, port=port)


@dataclass(slots=True)
class BusStats:
    sent: int = 0
    # Stamped but not handed to ZeroMQ (sockets closed at shutdown, or HWM refusal).
    dropped: int = 0
    received: int = 0
    # Undecodable frames, and decodable ones that are not master -> worker messages.
    malformed: int = 0
    # Messages missed, by the master's sequence numbers.
    gaps: int = 0
    master_losses: int = 0
    reconnects: int = 0


class WorkerBus:
    """The worker's sockets. `connect()`, then `run()` as a task; `send()` from anywhere on the loop."""

    def __init__(
        self,
        *,
        node_id: NodeId,
        master: MasterAddress,
        on_message: Callable[[MasterMessage], None],
        heartbeat_interval: float = 1.0,
        heartbeat_liveness: int = 3,
        backoff_initial: float = 0.5,
        backoff_max: float = 10.0,
        hwm: int = DEFAULT_HWM,
        linger_ms: int = DEFAULT_LINGER_MS,
        clock: Callable[[], float] = time.time,
        curve: ClientCurve | None = None,
    ) -> None:
        self.node_id = node_id
        self.curve = curve
        self.master = master
        self._on_message = on_message
        self._interval = heartbeat_interval
        self._liveness = heartbeat_liveness
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._hwm = hwm
        self._linger_ms = linger_ms
        self._clock = clock
        # A fresh id per process: the master tells two live processes with one node id apart.
        self.incarnation = uuid.uuid4().hex[:12]
        self._stamper = Stamper(origin=node_id, incarnation=self.incarnation)
        self.tracker = SequenceTracker()
        self.stats = BusStats()
        # "" until the first MasterHeartbeat; echoed in every WorkerHeartbeat.
        self.master_session = ""
        self._master_interval = heartbeat_interval
        # Set/cleared on transitions so the daemon and tests can await them instead of polling.
        self.master_alive = asyncio.Event()
        self.master_lost = asyncio.Event()
        self._ctx: zmq.asyncio.Context | None = None
        self._sub: zmq.asyncio.Socket | None = None
        self._pub: zmq.Socket[bytes] | None = None
        self._monitors: list[tuple[zmq.asyncio.Socket, zmq.Socket[Any], str]] = []
        self.handshake_failures: set[str] = set()  # failed handshakes said and not yet healed
        self._log = log.bind(node_id=node_id, master=str(master))

    # ---- sockets -----------------------------------------------------------------------------

    def connect(self) -> None:
        if self._ctx is None:
            self._ctx = zmq.asyncio.Context()
        self._open_sockets()

    def close(self) -> None:
        for mon, _, _ in self._monitors:
            mon.close(linger=0)
        self._monitors.clear()
        self._close_sockets(self._linger_ms)
        if self._ctx is not None:
            self._ctx.term()  # returns promptly: every socket is closed with a bounded linger
            self._ctx = None

    def _open_sockets(self) -> None:
        assert self._ctx is not None
        sub = self._ctx.socket(zmq.SUB)
        self._configure(sub)
        sub.setsockopt(zmq.RCVHWM, self._hwm)
        # Assignments carry prompts, bounded by the master's API; nothing legitimate is near this.
        sub.setsockopt(zmq.MAXMSGSIZE, MAX_MASTER_FRAME_BYTES)
        sub.setsockopt(zmq.SUBSCRIBE, codec.node_topic(self.node_id))
        sub.setsockopt(zmq.SUBSCRIBE, codec.BROADCAST_TOPIC)
        self._watch(sub, self.master.bus_endpoint)
        sub.connect(self.master.bus_endpoint)
        # The PUB is a plain (blocking-API) socket on the same context: a PUB never blocks on send
        # (it drops at HWM), so a synchronous send() lets runner callbacks publish without awaiting.
        pub: zmq.Socket[bytes] = zmq.Context.shadow(self._ctx.underlying).socket(zmq.PUB)
        self._configure(pub)
        pub.setsockopt(zmq.SNDHWM, self._hwm)
        self._watch(pub, self.master.inbox_endpoint)
        pub.connect(self.master.inbox_endpoint)
        self._sub, self._pub = sub, pub

    def _watch(self, sock: zmq.Socket[Any], endpoint: str) -> None:
        if self._ctx is not None:  # also without keys: to say so when the master requires them
            self._monitors.append((monitor_socket(sock, self._ctx), sock, endpoint))

    @staticmethod
    def _redial(sock: zmq.Socket[Any], endpoint: str) -> None:
        """Connect again after a ZAP refusal, which ends a connection for good in libzmq."""
        if sock.closed:
            return
        with contextlib.suppress(zmq.ZMQError):  # already gone with the refused connection
            sock.disconnect(endpoint)
        sock.connect(endpoint)

    def _configure(self, sock: zmq.Socket[Any]) -> None:
        if self.curve is not None:
            self.curve.secure(sock)
        sock.setsockopt(zmq.LINGER, self._linger_ms)
        sock.setsockopt(zmq.RECONNECT_IVL, max(1, round(self._backoff_initial * 1000)))
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, max(1, round(self._backoff_max * 1000)))
        sock.setsockopt(zmq.HEARTBEAT_IVL, max(1, round(self._interval * 1000)))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(1, round(self._interval * self._liveness * 1000)))
        if self.master.is_ipv6:
            sock.setsockopt(zmq.IPV6, 1)

    def _close_sockets(self, linger_ms: int) -> None:
        for sock in (self._sub, self._pub):
            if sock is not None:
                sock.close(linger=linger_ms)
        self._sub = self._pub = None

    # ---- sending -----------------------------------------------------------------------------

    def send(self, body: WorkerMessage) -> None:
        # Stamped even when it cannot go out: the master then sees the loss as a sequence gap.
        envelope = self._stamper.stamp(body, self._clock())
        if self._pub is None:
            self.stats.dropped += 1
            return
        try:
            self._pub.send_multipart(codec.encode_frames(codec.MASTER_TOPIC, envelope), flags=zmq.NOBLOCK)
        except zmq.Again:
            self.stats.dropped += 1
        else:
            self.stats.sent += 1

    # ---- receiving, liveness, reconnect ------------------------------------------------------

    def liveness_timeout(self) -> float:
        # Never stricter than the master's own advertised interval, so a slower master is not flapped.
        return self._liveness * max(self._interval, self._master_interval)

    async def run(self) -> None:
        """Receive until cancelled, marking the master lost while it is silent (libzmq reconnects)."""
        if self._sub is None:
            self.connect()
        backoff = (self._backoff_initial, self._backoff_max)
        reported = self.handshake_failures  # shared: one line per failure, not one per socket
        watchers = []
        for mon, sock, endpoint in self._monitors:
            redial = functools.partial(self._redial, sock, endpoint)
            watch = watch_handshakes(self.curve, mon, self._log, redial, reported, backoff, endpoint)
            watchers.append(asyncio.create_task(watch, name="bus-handshakes"))
        try:
            await self._serve()
        finally:
            for task in watchers:
                task.cancel()

    async def _serve(self) -> None:
        silent_since = self._clock()
        while True:
            await self._listen()
            if not self.master_lost.is_set():
                silent_since = self._clock() - self.liveness_timeout()
                self.stats.master_losses += 1
                self.master_alive.clear()
                self.master_lost.set()
                self._log.warning(
                    "master.lost", silent_s=round(self.liveness_timeout(), 3), session=self.master_session
                )
            elif self.handshake_failures:
                # The master answers but refuses us (said once, with why): not "unreachable".
                self._log.warning(
                    "master.refusing",
                    failures=sorted(self.handshake_failures),
                    silent_s=round(self._clock() - silent_since, 1),
                )
            else:
                # Say so every window, with where we are looking: a wrong address must not look idle.
                self._log.warning(
                    "master.unreachable",
                    tries=self.master.bus_endpoint,
                    publishes_to=self.master.inbox_endpoint,
                    silent_s=round(self._clock() - silent_since, 1),
                )

    async def _listen(self) -> None:
        """Handle messages; return once no valid message came for a whole liveness window."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.liveness_timeout()
        while (remaining := deadline - loop.time()) > 0:
            sub = self._sub
            assert sub is not None
            if not await sub.poll(math.ceil(remaining * 1000)):
                continue
            for _ in range(_RECV_BATCH):
                try:
                    frames = await sub.recv_multipart(flags=zmq.NOBLOCK)
                except zmq.Again:
                    break
                if self._handle_frames(frames):
                    deadline = loop.time() + self.liveness_timeout()

    def _handle_frames(self, frames: list[bytes]) -> bool:
        """Decode and dispatch one message; True when it was a valid message from the master."""
        self.stats.received += 1
        try:
            _, envelope = codec.decode_frames(frames)
        except codec.ProtocolError as exc:
            self._malformed(str(exc))
            return False
        body = envelope.body
        if not isinstance(body, MasterMessage):
            self._malformed(f"unexpected {type(body).__name__} from {envelope.origin}")
            return False
        if isinstance(body, MasterHeartbeat):
            self._on_heartbeat(envelope.origin, body)
        missed = self.tracker.observe(envelope.origin, envelope.seq)
        if missed:
            self.stats.gaps += missed
            self._log.warning(
                "bus.sequence_gap", origin=envelope.origin, missed=missed, total=self.stats.gaps
            )
        if not self.master_alive.is_set():
            if self.master_lost.is_set():
                self.stats.reconnects += 1
            self._log.info("master.connected", session=self.master_session or None)
            self.master_alive.set()
            self.master_lost.clear()
        # A handler that raises is a bug: it ends the receive loop, and the daemon fails loudly.
        self._on_message(body)
        return True

    def _on_heartbeat(self, origin: str, heartbeat: MasterHeartbeat) -> None:
        if heartbeat.interval > 0:
            self._master_interval = heartbeat.interval
        if heartbeat.session != self.master_session:
            if self.master_session:
                self._log.info("master.session_changed", old=self.master_session, new=heartbeat.session)
                # A restarted master numbers from 1 again: whatever it sent before we heard it is
                # not a gap in the old sequence.
                self.tracker.forget(origin)
            self.master_session = heartbeat.session

    def _malformed(self, error: str) -> None:
        self.stats.malformed += 1
        self._log.warning("bus.malformed_frame", error=error[:200], total=self.stats.malformed)
