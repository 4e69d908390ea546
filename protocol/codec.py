"""Encoding and framing. Encoders/decoders are built once; anything undecodable is a ProtocolError.

Frames on the bus are two parts: [topic, msgpack(Envelope)]. Topics end in NUL so that ZeroMQ's
prefix matching cannot confuse node "a" with node "ab".
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from protocol.envelope import Envelope
from protocol.ids import NodeId


class ProtocolError(ValueError):
    """A frame that is not a valid message of this protocol. Drop it, log it, count it."""


BROADCAST_TOPIC = b"*\x00"
MASTER_TOPIC = b"master\x00"

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Envelope)


def node_topic(node_id: NodeId) -> bytes:
    return b"node/" + node_id.encode() + b"\x00"


def encode(envelope: Envelope) -> bytes:
    return _encoder.encode(envelope)


def decode(payload: bytes) -> Envelope:
    try:
        return _decoder.decode(payload)
    # msgspec reports invalid UTF-8 in a string as UnicodeDecodeError and too deep nesting (even in
    # an ignored unknown field) as RecursionError, not as a DecodeError.
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError(str(exc)) from exc


def encode_frames(topic: bytes, envelope: Envelope) -> list[bytes]:
    return [topic, encode(envelope)]


def decode_frames(frames: Sequence[bytes]) -> tuple[bytes, Envelope]:
    if len(frames) != 2:
        raise ProtocolError(f"expected 2 frames (topic, payload), got {len(frames)}")
    topic, payload = frames
    return bytes(topic), decode(bytes(payload))
