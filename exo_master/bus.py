"""The master's bus shell: an XPUB to the workers, a SUB from them. Decodes, counts, hands over.

XPUB rather than PUB so that the master learns when a worker's subscription to its node topic is
live (ZeroMQ's slow-joiner problem: anything published before that is silently lost). The core
places nothing on a node before its NodeSubscribed; AssignTask is also re-sent until confirmed.

High-water marks: 10,000 messages each way. A token stream of a few hundred messages per task
times a few dozen concurrent tasks fits with room to spare; past it ZeroMQ drops (PUB/SUB never
blocks), which sequence numbers make visible and the heartbeat snapshot heals.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog
import zmq
import zmq.asyncio

from exo_master.core.events import NodeSubscribed, NodeUnsubscribed
from protocol import codec
from protocol.envelope import SequenceTracker, Stamper
from protocol.ids import NodeId
from protocol.messages import (
    MasterMessage,
    TaskAccepted,
    TaskChunk,
    TaskFailed,
    TaskFinished,
    WorkerHeartbeat,
    WorkerMessage,
)

log = structlog.get_logger("exo_master.bus")

HIGH_WATER_MARK = 10_000
_WORKER_TYPES = (WorkerHeartbeat, TaskAccepted, TaskChunk, TaskFinished, TaskFailed)
_NODE_PREFIX = b"node/"
_RECV_BATCH = 256  # worker messages handled per wake-up before yielding to the event loop

Inbound = WorkerMessage | NodeSubscribed | NodeUnsubscribed


@dataclass(slots=True)
class BusCounters:
    received: dict[str, int] = field(default_factory=dict)
    sent: dict[str, int] = field(default_factory=dict)
    malformed: int = 0


def subscription_event(frame: bytes) -> NodeSubscribed | NodeUnsubscribed | None:
    """Decode an XPUB subscription frame (1 or 0, then the topic) into a core event."""
    if len(frame) < 2 or frame[0] not in (0, 1):
        return None
    topic = frame[1:]
    if not (topic.startswith(_NODE_PREFIX) and topic.endswith(b"\x00")):
        return None  # the broadcast topic, or a foreign subscriber
    try:
        node_id = NodeId(topic[len(_NODE_PREFIX) : -1].decode())
    except UnicodeDecodeError:
        return None
    return NodeSubscribed(node_id=node_id) if frame[0] == 1 else NodeUnsubscribed(node_id=node_id)


class MasterBus:
    def __init__(self, host: str, port: int, origin: str) -> None:
        self.endpoint_out = f"tcp://{host}:{port}"
        self.endpoint_in = f"tcp://{host}:{port + 1}"
        self._ctx = zmq.asyncio.Context()
        self._origin = origin
        # One sequence per topic: a worker only receives its own topic and the broadcast one, so a
        # single master-wide sequence would look like constant gaps to every worker.
        self._stampers: dict[bytes, Stamper] = {}
        self.sequences = SequenceTracker()
        self.counters = BusCounters()
        self._xpub = self._ctx.socket(zmq.XPUB)
        # The same libzmq socket seen through the plain (synchronous) API, for non-blocking sends.
        self._xpub_now: zmq.Socket[bytes] = zmq.Socket.shadow(self._xpub.underlying)
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub_now: zmq.Socket[bytes] = zmq.Socket.shadow(self._sub.underlying)

    def bind(self) -> None:
        self._xpub.setsockopt(zmq.XPUB_VERBOSE, 1)  # see every (re)subscription, e.g. after reconnects
        self._xpub.setsockopt(zmq.SNDHWM, HIGH_WATER_MARK)
        self._xpub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.RCVHWM, HIGH_WATER_MARK)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._xpub.bind(self.endpoint_out)
        self._sub.bind(self.endpoint_in)

    def send_now(self, topic: bytes, body: MasterMessage) -> None:
        """Publish at once, without awaiting: an XPUB never blocks (past its high-water mark it
        drops, which sequence numbers reveal), so the asyncio send path's future and poller
        bookkeeping buys nothing here and cost ~10% of the master's CPU at saturation."""
        stamper = self._stampers.get(topic)
        if stamper is None:
            name = topic.rstrip(b"\x00").decode(errors="replace")
            stamper = self._stampers[topic] = Stamper(f"{self._origin}/{name}")
        envelope = stamper.stamp(body, time.time())
        self._xpub_now.send_multipart(codec.encode_frames(topic, envelope), zmq.NOBLOCK)
        name = type(body).__name__
        self.counters.sent[name] = self.counters.sent.get(name, 0) + 1

    async def serve_subscriptions(self, deliver: Callable[[Inbound], Awaitable[None]]) -> None:
        while True:
            frame = await self._xpub.recv()
            event = subscription_event(frame)
            if event is not None:
                log.info(
                    "bus.subscription", node_id=event.node_id, subscribed=isinstance(event, NodeSubscribed)
                )
                await deliver(event)

    async def serve_workers(self, deliver: Callable[[Inbound], Awaitable[None]]) -> None:
        # The plain socket, drained without blocking whenever its descriptor says something
        # changed: the asyncio receive path (a future and its poller bookkeeping per message) was
        # a sixth of the master's CPU at saturation. ZMQ_FD is edge-like, so the loop only sleeps
        # after ZMQ_EVENTS confirms nothing is left; batches are bounded so a flood of chunks
        # cannot starve the HTTP side of the loop.
        loop = asyncio.get_running_loop()
        sock = self._sub_now
        fd = int(sock.getsockopt(zmq.FD))
        readable = asyncio.Event()
        loop.add_reader(fd, readable.set)
        try:
            while True:
                for _ in range(_RECV_BATCH):
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    await self._handle_worker_frames(frames, deliver)
                else:
                    await asyncio.sleep(0)  # a full batch: let others run, then go on draining
                    continue
                if int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                    continue
                readable.clear()
                await readable.wait()
        finally:
            loop.remove_reader(fd)

    async def _handle_worker_frames(
        self, frames: list[bytes], deliver: Callable[[Inbound], Awaitable[None]]
    ) -> None:
        try:
            _, envelope = codec.decode_frames(frames)
            if not isinstance(envelope.body, _WORKER_TYPES):
                raise codec.ProtocolError(f"{type(envelope.body).__name__} is not a worker message")
        except codec.ProtocolError as exc:
            self.counters.malformed += 1
            log.warning("bus.malformed_frame", error=str(exc), frames=len(frames))
            return
        missed = self.sequences.observe(envelope.origin, envelope.seq)
        if missed:
            log.warning("bus.sequence_gap", origin=envelope.origin, missed=missed, seq=envelope.seq)
        name = type(envelope.body).__name__
        self.counters.received[name] = self.counters.received.get(name, 0) + 1
        await deliver(envelope.body)

    def close(self) -> None:
        self._xpub.close(linger=0)
        self._sub.close(linger=0)
        self._ctx.term()
