"""The master's XPUB subscription path with real loopback sockets: no subscription is left unread.

libzmq runs a socket's pending commands in any call on it. A send from the master can thus take in
a new peer's pipe, with its subscriptions, and consume the ZMQ_FD edge the subscription reader
sleeps on; the tests below put the socket in exactly that state, then check that the subscription
still reaches the core and is applied (the peer hears its topic).
"""

from __future__ import annotations

import asyncio
import select
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import zmq

from exo_master.bus.sockets import Inbound, MasterBus
from exo_master.core.events import NodeSubscribed, NodeUnsubscribed
from exo_master.devtools.ports import free_port_pair
from protocol import codec
from protocol.ids import NodeId
from protocol.messages import MasterHeartbeat

HEARTBEAT = MasterHeartbeat(session="unit", interval=1.0)
DEADLINE_S = 10.0


@asynccontextmanager
async def serving_bus() -> AsyncIterator[tuple[MasterBus, asyncio.Queue[Inbound]]]:
    bus = MasterBus("127.0.0.1", free_port_pair(), origin="master")
    bus.bind()
    events: asyncio.Queue[Inbound] = asyncio.Queue()
    task = asyncio.create_task(bus.serve_subscriptions(events.put))
    try:
        await asyncio.sleep(0)  # wait-ok: one loop pass, so the reader starts and sleeps on the descriptor
        yield bus, events
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        bus.close()


def subscriber(ctx: zmq.Context[zmq.Socket[bytes]], bus: MasterBus, *topics: bytes) -> zmq.Socket[bytes]:
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    for topic in topics:
        sock.setsockopt(zmq.SUBSCRIBE, topic)
    sock.connect(bus.endpoint_out)
    return sock


def publish_until_pending_unseen(bus: MasterBus) -> None:
    """Publish, without yielding to the loop, until the XPUB holds an unread subscription while its
    descriptor no longer says so: the state a send leaves behind when it takes in a new pipe."""
    probe: zmq.Socket[bytes] = zmq.Socket.shadow(bus._xpub.underlying)  # the same libzmq socket
    fd = int(probe.getsockopt(zmq.FD))
    deadline = time.monotonic() + DEADLINE_S
    while True:
        bus.send_now(codec.BROADCAST_TOPIC, HEARTBEAT)
        pending = int(probe.getsockopt(zmq.EVENTS)) & zmq.POLLIN
        if pending and not select.select([fd], [], [], 0)[0]:
            return
        assert time.monotonic() < deadline, "the subscription never reached the XPUB"


async def heard(sock: zmq.Socket[bytes], resend: Callable[[], None]) -> bytes:
    """The topic of the first message the subscriber hears, re-offered until it arrives."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        resend()
        if sock.poll(0):
            return sock.recv_multipart()[0]
        await asyncio.sleep(0.01)  # wait-ok: a polling step inside the deadline
    raise TimeoutError("the subscriber heard nothing")


def test_a_subscription_taken_in_by_a_send_still_reaches_the_core_and_is_applied() -> None:
    async def scenario() -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        try:
            async with serving_bus() as (bus, events):
                sock = subscriber(ctx, bus, codec.node_topic(NodeId("n1")))
                publish_until_pending_unseen(bus)
                event = await asyncio.wait_for(events.get(), DEADLINE_S)
                assert event == NodeSubscribed(node_id=NodeId("n1"))
                topic = codec.node_topic(NodeId("n1"))
                assert await heard(sock, lambda: bus.send_now(topic, HEARTBEAT)) == topic
        finally:
            ctx.destroy(linger=0)  # closes the subscriber too when an assertion failed

    asyncio.run(scenario())


def test_the_broadcast_topic_is_applied_and_a_foreign_one_is_not() -> None:
    """The rogue e2e test's insider, at the bus level: asks for everything and for the broadcast
    topic while a send takes its pipe in; it hears the broadcast topic, and only that."""

    async def scenario() -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        try:
            async with serving_bus() as (bus, events):
                sock = subscriber(ctx, bus, b"", codec.BROADCAST_TOPIC)
                publish_until_pending_unseen(bus)
                other = codec.node_topic(NodeId("n2"))

                def offer() -> None:
                    bus.send_now(other, HEARTBEAT)  # never heard: "" was refused
                    bus.send_now(codec.BROADCAST_TOPIC, HEARTBEAT)

                assert await heard(sock, offer) == codec.BROADCAST_TOPIC
                while sock.poll(0):
                    assert sock.recv_multipart()[0] == codec.BROADCAST_TOPIC
                assert events.empty()  # no node topic: nothing for the core
                assert bus.guard.drops == {"foreign_topic": 1}
        finally:
            ctx.destroy(linger=0)  # closes the subscriber too when an assertion failed

    asyncio.run(scenario())


def test_a_refused_subscriber_hanging_up_does_not_unsubscribe_the_node() -> None:
    """A peer refused node A's topic, then gone: libzmq reports an unsubscription of A's topic for
    its closed connection, with no key. The node itself must stay subscribed in the core's eyes."""
    bus = MasterBus("127.0.0.1", free_port_pair(), origin="master")
    bus.bind()
    try:
        a, topic = NodeId("a"), codec.node_topic(NodeId("a"))
        subscribe, unsubscribe = b"\x01" + topic, b"\x00" + topic
        assert bus._on_subscription(subscribe, "key-a") == NodeSubscribed(node_id=a)
        # A rogue asks for A's topic (refused), and hangs up: its keyless unsubscription is absorbed.
        assert bus._on_subscription(subscribe, "key-rogue") is None
        assert bus._on_subscription(unsubscribe, None) is None
        # A forger asks and takes it back itself (both refused): libzmq reports nothing at its close.
        assert bus._on_subscription(subscribe, "key-forger") is None
        assert bus._on_subscription(unsubscribe, "key-forger") is None
        assert bus.guard.drops == {"key_mismatch": 3}
        # Now A's own connection closes: that one unsubscribes A.
        assert bus._on_subscription(unsubscribe, None) == NodeUnsubscribed(node_id=a)
    finally:
        bus.close()
