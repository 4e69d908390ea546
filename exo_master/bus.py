"""The master's bus shell: an XPUB to the workers, a SUB from them. Decodes, counts, hands over.

XPUB rather than PUB so that the master learns when a worker's subscription to its node topic is
live (ZeroMQ's slow-joiner problem: anything published before that is silently lost). The core
places nothing on a node before its NodeSubscribed; AssignTask is also re-sent until confirmed.

High-water marks: 10,000 messages each way. A token stream of a few hundred messages per task
times a few dozen concurrent tasks fits with room to spare; past it ZeroMQ drops (PUB/SUB never
blocks), which sequence numbers make visible and the heartbeat snapshot heals.

Security (see bus_auth.py and bus_identity.py): with CURVE both sockets are CURVE servers behind
the ZAP authenticator. The XPUB runs in manual mode: a subscription takes effect only when the
master applies it, which it does for the broadcast topic and for `node/ID` when the subscriber may
speak for ID, so no peer can read another node's assignments (nor everything, with an empty
prefix). Every worker message passes the identity checks before it is delivered.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog
import zmq
import zmq.asyncio

from exo_master.bus_auth import MasterCurve
from exo_master.bus_identity import DropReason, IdentityGuard
from exo_master.core.events import NodeSubscribed, NodeUnsubscribed
from exo_master.incarnations import IncarnationGuard, Verdict
from protocol import codec
from protocol.envelope import SequenceTracker, Stamper
from protocol.ids import NodeId
from protocol.keys import fingerprint
from protocol.messages import (
    MasterMessage,
    NodeRefused,
    TaskAccepted,
    TaskChunk,
    TaskFailed,
    TaskFinished,
    WorkerHeartbeat,
    WorkerMessage,
)

log = structlog.get_logger("exo_master.bus")

HIGH_WATER_MARK = 10_000
MAX_WORKER_FRAME_BYTES = 4 * 1024 * 1024
_WORKER_TYPES = (WorkerHeartbeat, TaskAccepted, TaskChunk, TaskFinished, TaskFailed)
_NODE_PREFIX = b"node/"

Inbound = WorkerMessage | NodeSubscribed | NodeUnsubscribed


@dataclass(slots=True)
class BusCounters:
    received: dict[str, int] = field(default_factory=dict)
    sent: dict[str, int] = field(default_factory=dict)
    malformed: int = 0
    held: int = 0  # messages from a newcomer process while its predecessor may still be alive
    refused: int = 0  # messages from a second live process with an existing node id


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
    def __init__(
        self,
        host: str,
        port: int,
        origin: str,
        curve: MasterCurve | None = None,
        insecure: bool = False,
        incarnation_grace: float = 2.0,
    ) -> None:
        self.endpoint_out = f"tcp://{host}:{port}"
        self.endpoint_in = f"tcp://{host}:{port + 1}"
        self._ctx = zmq.asyncio.Context()
        self._origin = origin
        # One sequence per topic: a worker only receives its own topic and the broadcast one, so a
        # single master-wide sequence would look like constant gaps to every worker.
        self._stampers: dict[bytes, Stamper] = {}
        self.sequences = SequenceTracker()
        self.counters = BusCounters()
        self.incarnations = IncarnationGuard(incarnation_grace)
        self._told: set[tuple[NodeId, str]] = set()
        self._xpub = self._ctx.socket(zmq.XPUB)
        self._sub = self._ctx.socket(zmq.SUB)
        self.curve = curve
        # True only for a plaintext bus the operator asked for with --insecure (shown in the state).
        self.insecure = insecure and curve is None
        self.guard = IdentityGuard()

    def bind(self) -> None:
        self._xpub.setsockopt(zmq.XPUB_VERBOSE, 1)  # see every (re)subscription, e.g. after reconnects
        self._xpub.setsockopt(zmq.SNDHWM, HIGH_WATER_MARK)
        self._xpub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.RCVHWM, HIGH_WATER_MARK)
        # A larger frame is dropped by libzmq (and the sending peer disconnected) before it is
        # read: no worker message is near this once its fields are within the protocol's bounds.
        self._sub.setsockopt(zmq.MAXMSGSIZE, MAX_WORKER_FRAME_BYTES)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._xpub.setsockopt(zmq.XPUB_MANUAL, 1)  # the master decides who reads which topic
        if self.curve is not None:
            for sock in (self._xpub, self._sub):
                self.curve.secure(sock)
                self.curve.monitor(sock)
            self.curve.start(self._ctx)
        self._xpub.bind(self.endpoint_out)
        self._sub.bind(self.endpoint_in)

    async def send(self, topic: bytes, body: MasterMessage) -> None:
        stamper = self._stampers.get(topic)
        if stamper is None:
            name = topic.rstrip(b"\x00").decode(errors="replace")
            stamper = self._stampers[topic] = Stamper(f"{self._origin}/{name}")
        envelope = stamper.stamp(body, time.time())
        await self._xpub.send_multipart(codec.encode_frames(topic, envelope))
        name = type(body).__name__
        self.counters.sent[name] = self.counters.sent.get(name, 0) + 1

    async def serve_subscriptions(self, deliver: Callable[[Inbound], Awaitable[None]]) -> None:
        while True:
            message = await self._xpub.recv(copy=False)
            frame = message.bytes
            event = subscription_event(frame)
            if not self._admit_subscription(frame, event, _user_id(message)):
                continue
            if event is not None:
                log.info(
                    "bus.subscription", node_id=event.node_id, subscribed=isinstance(event, NodeSubscribed)
                )
                await deliver(event)

    def _admit_subscription(
        self, frame: bytes, event: NodeSubscribed | NodeUnsubscribed | None, key: str | None
    ) -> bool:
        """Apply (manual XPUB) a subscription to the broadcast topic or to a node the peer speaks for;
        True when the event may go on to the core.

        Called right after the recv, with no await in between: libzmq applies it to the pipe that
        sent the last subscription. An unsubscription is always applied to its own pipe (harmless),
        but reaches the core only from the node's key: otherwise another peer could subscribe and
        unsubscribe node A's topic and make the master stop placing on A. The ones libzmq makes
        for a closed connection carry no User-Id and pass.
        """
        if not frame or frame[0] not in (0, 1):
            return False
        topic = frame[1:]
        subscribe = frame[0] == 1
        if not subscribe:
            self._xpub.setsockopt(zmq.UNSUBSCRIBE, topic)
        refused: str | None = None
        if isinstance(event, NodeSubscribed | NodeUnsubscribed):
            refused = self.guard.check_key(event.node_id, key, time.monotonic())
        elif subscribe and topic != codec.BROADCAST_TOPIC:
            refused = self.guard.refuse(DropReason.FOREIGN_TOPIC)
        if refused is not None:
            total = self.guard.drops[refused]
            if total & (total - 1) == 0:  # 1, 2, 4, ...: visible, never a flood
                topic_text = topic[:80].decode(errors="replace")
                log.warning("bus.subscription_refused", reason=refused, topic=topic_text, total=total)
            return False
        if subscribe:
            self._xpub.setsockopt(zmq.SUBSCRIBE, topic)
        return True

    async def serve_workers(self, deliver: Callable[[Inbound], Awaitable[None]]) -> None:
        # Without CURVE there is no User-Id to read: keep the cheaper copying receive.
        with_key = self.curve is not None
        while True:
            key: str | None = None
            if with_key:
                parts = await self._sub.recv_multipart(copy=False)
                key = _user_id(parts[-1])
                frames: list[bytes] = [p.bytes for p in parts]
            else:
                frames = await self._sub.recv_multipart()
            try:
                _, envelope = codec.decode_frames(frames)
                if not isinstance(envelope.body, _WORKER_TYPES):
                    raise codec.ProtocolError(f"{type(envelope.body).__name__} is not a worker message")
            except codec.ProtocolError as exc:
                self.counters.malformed += 1
                log.warning("bus.malformed_frame", error=str(exc), frames=len(frames))
                continue
            refused = self.guard.check_message(envelope.origin, envelope.body, key, time.monotonic())
            if refused is not None:
                total = self.guard.drops[refused]
                if total & (total - 1) == 0:  # 1, 2, 4, ...: visible, never a flood
                    self._log_refusal(refused, total, envelope.origin, envelope.body, key)
                continue
            body = envelope.body
            verdict = self.incarnations.observe(body.node_id, envelope.incarnation, time.monotonic())
            if verdict is not Verdict.ADMIT:
                await self._turn_away(body.node_id, envelope.incarnation, verdict)
                continue
            missed = self.sequences.observe(envelope.origin, envelope.seq)
            if missed:
                log.warning("bus.sequence_gap", origin=envelope.origin, missed=missed, seq=envelope.seq)
            name = type(envelope.body).__name__
            self.counters.received[name] = self.counters.received.get(name, 0) + 1
            await deliver(envelope.body)

    async def _turn_away(self, node_id: NodeId, incarnation: str, verdict: Verdict) -> None:
        if verdict is Verdict.HOLD:
            self.counters.held += 1
            return
        self.counters.refused += 1
        if self.counters.refused == 1 or (node_id, incarnation) not in self._told:
            self._told.add((node_id, incarnation))
            log.error("bus.duplicate_node", node_id=node_id, incarnation=incarnation)
        reason = (
            f"node id {node_id!r} is already served by another running worker; stop that one, or give "
            "this one its own --node-id"
        )
        # Every message it sends is answered, so a refusal lost on the bus is repeated.
        await self.send(
            codec.node_topic(node_id), NodeRefused(node_id=node_id, incarnation=incarnation, reason=reason)
        )

    def _log_refusal(
        self, reason: str, total: int, origin: str, body: WorkerMessage, key: str | None
    ) -> None:
        log.warning(
            "bus.identity_refused",
            reason=reason,
            total=total,
            origin=origin[:80],
            node_id=body.node_id[:80],
            type=type(body).__name__,
            bound_key=_short(self.guard.bound_key(body.node_id)),
            key=_short(key),
        )

    def close(self) -> None:
        if self.curve is not None:
            self.curve.stop()
        self._xpub.close(linger=0)
        self._sub.close(linger=0)
        self._ctx.term()


def _user_id(frame: zmq.Frame) -> str | None:
    """The ZAP User-Id of the connection a frame came in on (the z85 public key); None without CURVE."""
    try:
        value = frame.get("User-Id")
    except zmq.ZMQError:  # no such property: a plaintext connection
        return None
    return value if isinstance(value, str) and value else None


def _short(key: str | None) -> str | None:
    return fingerprint(key) if key else None
