"""What an inbound bus frame says beyond its bytes: the XPUB subscription it carries, and the
connection metadata libzmq attaches (the CURVE key a frame came in with, and whether a peer sent it)."""

from __future__ import annotations

import zmq

from exo_master.core.events import NodeSubscribed, NodeUnsubscribed
from protocol.ids import NodeId

_NODE_PREFIX = b"node/"


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


def user_id(frame: zmq.Frame) -> str | None:
    """The ZAP User-Id of the connection a frame came in on (the z85 public key); None without CURVE."""
    try:
        value = frame.get("User-Id")
    except zmq.ZMQError:  # no such property: a plaintext connection
        return None
    return value if isinstance(value, str) and value else None


def from_a_peer(frame: zmq.Frame) -> bool:
    """Whether a subscription frame was sent by a connection (it has the connection's metadata) rather
    than made by libzmq for a connection that closed (no metadata)."""
    try:
        return bool(frame.get("Socket-Type"))
    except zmq.ZMQError:
        return False
