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

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog
import zmq
import zmq.asyncio

from exo_master.bus.curve import MasterCurve
from exo_master.bus.drain import drain
from exo_master.bus.frames import from_a_peer, subscription_event, user_id
from exo_master.bus.identity import MAX_NODES, DropReason, IdentityGuard
from exo_master.bus.incarnations import IncarnationGuard, Verdict
from exo_master.bus.refusals import Refusal, Refusals
from exo_master.core.events import NodeSubscribed, NodeUnsubscribed
from protocol import codec
from protocol.envelope import SequenceTracker, Stamper
from protocol.ids import NodeId
from protocol.keys import fingerprint
from protocol.messages import (
    MasterMessage,
    TaskAccepted,
    TaskChunk,
    TaskFailed,
    TaskFinished,
    WorkerHeartbeat,
    WorkerMessage,
)

log = structlog.get_logger("exo_master.bus.sockets")

HIGH_WATER_MARK = 10_000
MAX_WORKER_FRAME_BYTES = 4 * 1024 * 1024
_WORKER_TYPES = (WorkerHeartbeat, TaskAccepted, TaskChunk, TaskFinished, TaskFailed)

Inbound = WorkerMessage | NodeSubscribed | NodeUnsubscribed


@dataclass(slots=True)
class BusCounters:
    received: dict[str, int] = field(default_factory=dict)
    sent: dict[str, int] = field(default_factory=dict)
    malformed: int = 0
    held: int = 0  # messages from a newcomer process while its predecessor may still be alive
    refused: int = 0  # messages from a second live process with an existing node id
    ignored_unsubscriptions: int = 0  # keyless unsubscriptions sent by a peer (plaintext)


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
        self._stampers: OrderedDict[bytes, Stamper] = OrderedDict()  # least recently used first
        self.sequences = SequenceTracker()
        self.counters = BusCounters()
        self.incarnations = IncarnationGuard(incarnation_grace)
        self.refusals = Refusals(MAX_NODES)  # what a refused process is told, and how often
        self._subscribers: dict[NodeId, int] = {}  # live subscriptions per node topic
        # Refused subscriptions per node topic, still held by their connections: libzmq answers each
        # one with a keyless unsubscription when its connection closes (see _admit_subscription).
        self._refused_held: dict[NodeId, int] = {}
        self._xpub = self._ctx.socket(zmq.XPUB)
        # The same libzmq socket seen through the plain (synchronous) API, for non-blocking sends.
        self._xpub_now: zmq.Socket[bytes] = zmq.Socket.shadow(self._xpub.underlying)
        self._sub = self._ctx.socket(zmq.SUB)
        self.curve = curve
        # True only for a plaintext bus the operator asked for with --insecure (shown in the state).
        self.insecure = insecure and curve is None
        self.guard = IdentityGuard(owners=curve.authorized.names_of if curve is not None else None)
        self._sub_now: zmq.Socket[bytes] = zmq.Socket.shadow(self._sub.underlying)
        # Set while serve_subscriptions runs: its wake-up, and whether a look after sends is due.
        self._subscriptions_readable: asyncio.Event | None = None
        self._subscriptions_loop: asyncio.AbstractEventLoop | None = None
        self._recheck_due = False

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

    def send_now(self, topic: bytes, body: MasterMessage) -> None:
        """Publish at once, without awaiting: an XPUB never blocks (past its high-water mark it
        drops, which sequence numbers reveal), so the asyncio send path's future and poller
        bookkeeping buys nothing here and cost ~10% of the master's CPU at saturation."""
        stamper = self._stampers.get(topic)
        if stamper is None:
            name = topic.rstrip(b"\x00").decode(errors="replace")
            stamper = self._stampers[topic] = Stamper(f"{self._origin}/{name}")
            if len(self._stampers) > MAX_NODES:  # a forgotten topic restarts at 1: a restart to its reader
                self._stampers.popitem(last=False)
        else:
            self._stampers.move_to_end(topic)
        envelope = stamper.stamp(body, time.time())
        self._xpub_now.send_multipart(codec.encode_frames(topic, envelope), zmq.NOBLOCK)
        self._recheck_subscriptions()
        name = type(body).__name__
        self.counters.sent[name] = self.counters.sent.get(name, 0) + 1

    def _recheck_subscriptions(self) -> None:
        """After a send, look once more for subscriptions (once per pass of the loop, not per send).

        Any libzmq call on the XPUB first runs the socket's pending commands: a new peer's pipe is
        taken in, with its subscriptions. That consumes the edge on ZMQ_FD that serve_subscriptions
        sleeps on, and the descriptor is not signalled again for them: without this look, a peer's
        subscriptions (a worker's node topic, the broadcast topic) would lie unread and unapplied
        until some unrelated event woke the socket, and the peer would hear nothing meanwhile.
        """
        loop = self._subscriptions_loop
        if self._recheck_due or loop is None:
            return
        self._recheck_due = True
        loop.call_soon(self._recheck_now)

    def _recheck_now(self) -> None:
        self._recheck_due = False
        readable = self._subscriptions_readable
        if readable is not None and int(self._xpub_now.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            readable.set()

    async def serve_subscriptions(self, deliver: Callable[[Inbound], Awaitable[None]]) -> None:
        # The plain socket, drained like serve_workers' (bus_drain), not through the asyncio wrapper, for two
        # reasons. libzmq applies a manual (un)subscription to the pipe of the last one received,
        # and any call on the socket may take in a pipe's termination, which forgets that pipe: so
        # each one is applied right after its recv, with no other call in between (an awaited recv
        # returns a pass of the loop later, after sends may have run). And our sends consume the
        # descriptor's edge (see _recheck_subscriptions), which the wrapper cannot know about.
        loop = asyncio.get_running_loop()
        sock = self._xpub_now
        readable = self._subscriptions_readable = asyncio.Event()
        self._subscriptions_loop = loop
        self._recheck_due = False  # a look queued on a loop that has since stopped never ran

        async def take_one() -> bool:
            try:
                message = sock.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return False
            event = self._on_subscription(message.bytes, user_id(message), from_a_peer(message))
            if event is not None:
                await deliver(event)
            return True

        try:
            await drain(sock, readable, take_one)
        finally:
            self._subscriptions_readable = self._subscriptions_loop = None

    def _on_subscription(
        self, frame: bytes, key: str | None, from_a_peer: bool = False
    ) -> NodeSubscribed | NodeUnsubscribed | None:
        """Admit (or not) one (un)subscription just received; the event for the core, if any.

        `from_a_peer`: the frame came from a connection (it carries the connection's metadata);
        libzmq's own unsubscriptions for a closed connection carry none."""
        event = subscription_event(frame)
        if not self._admit_subscription(frame, event, key) or event is None:
            return None
        if isinstance(event, NodeUnsubscribed) and key is None and from_a_peer:
            # Plaintext: nothing ties this connection to the one that subscribed, so a peer's own
            # unsubscription never counts (workers never send one: they hang up). The close of the
            # subscribing connection does, and liveness is the authority on whether a node is there.
            self.counters.ignored_unsubscriptions += 1
            return None
        if not self._subscription_changed(event):
            return None
        log.info("bus.subscription", node_id=event.node_id, subscribed=isinstance(event, NodeSubscribed))
        return event

    def _subscription_changed(self, event: NodeSubscribed | NodeUnsubscribed) -> bool:
        """Count a node topic's subscribers; only the first subscribe and the last unsubscribe
        change what the core sees. The manual XPUB passes every (un)subscription of every
        connection: a worker that reconnects subscribes on its new connection before its old one
        closes, and a refused duplicate's connection closing must not unsubscribe the live one."""
        count = self._subscribers.get(event.node_id, 0)
        if isinstance(event, NodeSubscribed):
            if not count and len(self._subscribers) >= MAX_NODES:
                log.warning("bus.subscriptions_full", node_id=event.node_id[:80], tracked=MAX_NODES)
                return False
            self._subscribers[event.node_id] = count + 1
            return count == 0
        if count <= 1:
            self._subscribers.pop(event.node_id, None)
            return count == 1
        self._subscribers[event.node_id] = count - 1
        return False

    def _admit_subscription(
        self, frame: bytes, event: NodeSubscribed | NodeUnsubscribed | None, key: str | None
    ) -> bool:
        """Apply (manual XPUB) a subscription to the broadcast topic or to a node the peer speaks for;
        True when the event may go on to the core.

        Called right after the recv, with no other call on the socket in between: libzmq applies it
        to the pipe that sent the last subscription received. An unsubscription is always applied
        to its own pipe (harmless), but reaches the core only from the node's key: otherwise another
        peer could subscribe and unsubscribe node A's topic and make the master stop placing on A.
        The ones libzmq makes for a closed connection carry no User-Id, and for every topic that
        connection asked for, refused or not: one for a topic refused to it is absorbed here, so a
        peer refused node A's topic cannot unsubscribe A by hanging up. Keyless ones cannot be
        tied to a connection, so the count is per node and best effort (liveness still applies).
        """
        if not frame or frame[0] not in (0, 1):
            return False
        topic = frame[1:]
        subscribe = frame[0] == 1
        if not subscribe:
            self._xpub_now.setsockopt(zmq.UNSUBSCRIBE, topic)
        refused: str | None = None
        if isinstance(event, NodeSubscribed | NodeUnsubscribed):
            refused = self.guard.check_key(event.node_id, key, time.monotonic())
        elif subscribe and topic != codec.BROADCAST_TOPIC:
            refused = self.guard.refuse(DropReason.FOREIGN_TOPIC)
        if refused is not None:
            if isinstance(event, NodeSubscribed | NodeUnsubscribed) and refused in (
                DropReason.KEY_MISMATCH,
                DropReason.NOT_OWNER,
            ):
                # Unsubscribing a refused topic takes it off the connection's list: no keyless one then.
                self._hold_refused(event.node_id, 1 if subscribe else -1)
            total = self.guard.drops[refused]
            if total & (total - 1) == 0:  # 1, 2, 4, ...: visible, never a flood
                topic_text = topic[:80].decode(errors="replace")
                log.warning("bus.subscription_refused", reason=refused, topic=topic_text, total=total)
            return False
        if isinstance(event, NodeUnsubscribed) and key is None and self._refused_held.get(event.node_id):
            self._hold_refused(event.node_id, -1)  # a refused subscriber's connection closed
            return False
        if subscribe:
            self._xpub_now.setsockopt(zmq.SUBSCRIBE, topic)
        return True

    def _hold_refused(self, node_id: NodeId, change: int) -> None:
        if node_id not in self._refused_held and len(self._refused_held) >= MAX_NODES:
            # Bounded: this refusal goes untracked (its hang-up may then unsubscribe the node).
            log.warning("bus.refused_subscriptions_untracked", node_id=node_id, tracked=MAX_NODES)
            return
        held = max(0, self._refused_held.get(node_id, 0) + change)
        if held:
            self._refused_held[node_id] = held
        else:
            self._refused_held.pop(node_id, None)

    async def serve_workers(self, deliver: Callable[[Inbound], Awaitable[None]]) -> None:
        # The plain socket, drained whenever its descriptor fires (bus_drain: the asyncio receive
        # path cost a sixth of the master's CPU). With CURVE, frames are read without copying to
        # learn the connection's authenticated key (User-Id).
        with_key = self.curve is not None
        sock = self._sub_now
        readable = asyncio.Event()

        async def take_one() -> bool:
            key: str | None = None
            try:
                if with_key:
                    parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    key = user_id(parts[-1])
                    frames = [p.bytes for p in parts]
                else:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return False
            await self._handle_worker_frames(frames, key, deliver)
            return True

        await drain(sock, readable, take_one)

    async def _handle_worker_frames(
        self, frames: list[bytes], key: str | None, deliver: Callable[[Inbound], Awaitable[None]]
    ) -> None:
        try:
            _, envelope = codec.decode_frames(frames)
            if not isinstance(envelope.body, _WORKER_TYPES):
                raise codec.ProtocolError(f"{type(envelope.body).__name__} is not a worker message")
        except codec.ProtocolError as exc:
            self.counters.malformed += 1
            log.warning("bus.malformed_frame", error=str(exc), frames=len(frames))
            return
        now = time.monotonic()
        refused = self.guard.check_message(envelope.origin, envelope.body, key, now)
        if refused is not None:
            total = self.guard.drops[refused]
            if total & (total - 1) == 0:  # 1, 2, 4, ...: visible, never a flood
                self._log_refusal(refused, total, envelope.origin, envelope.body, key)
            if refused == DropReason.NOT_OWNER and envelope.origin == envelope.body.node_id:
                directory = self.curve.authorized.directory if self.curve is not None else None
                node_id, incarnation = envelope.body.node_id, envelope.incarnation
                self._tell(self.refusals.not_owner(node_id, incarnation, key, directory, now))
            return
        body = envelope.body
        verdict = self.incarnations.observe(body.node_id, envelope.incarnation, now)
        if verdict is not Verdict.ADMIT:
            self._turn_away(body.node_id, envelope.incarnation, verdict)
            return
        missed = self.sequences.observe(envelope.origin, envelope.seq)
        if missed:
            log.warning("bus.sequence_gap", origin=envelope.origin, missed=missed, seq=envelope.seq)
        name = type(body).__name__
        self.counters.received[name] = self.counters.received.get(name, 0) + 1
        await deliver(body)

    def _turn_away(self, node_id: NodeId, incarnation: str, verdict: Verdict) -> None:
        if verdict is Verdict.HOLD:
            self.counters.held += 1
            return
        self.counters.refused += 1
        if not self.refusals.told_before(node_id):
            log.error("bus.duplicate_node", node_id=node_id, incarnation=incarnation)
        self._tell(self.refusals.duplicate(node_id, incarnation, time.monotonic()))

    def _tell(self, refusal: Refusal | None) -> None:
        if refusal is not None:
            self.send_now(*refusal)

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
        self._subscriptions_readable = self._subscriptions_loop = None  # no look after sends now
        if self.curve is not None:
            self.curve.stop()
        self._xpub.close(linger=0)
        self._sub.close(linger=0)
        self._ctx.term()


def _short(key: str | None) -> str | None:
    return fingerprint(key) if key else None
