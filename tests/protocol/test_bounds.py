"""Bounds checked at the decode boundary: a frame outside them is one ProtocolError, never a crash
or an unbounded allocation in the master's projection."""

from __future__ import annotations

import math
from typing import Any

import msgspec
import pytest

from protocol import messages
from protocol.codec import ProtocolError, decode
from protocol.envelope import Stamper

_raw = msgspec.msgpack.Encoder()


def frame(body: dict[str, Any]) -> bytes:
    """An envelope encoded from plain data, so that out-of-bounds values can be written at all."""
    return _raw.encode({"origin": "n", "seq": 1, "sent_at": 0.0, "body": body})


def heartbeat(**instance: Any) -> dict[str, Any]:
    report = {"instance_id": "n/0", "model": "m", **instance}
    return {"type": "WorkerHeartbeat", "node_id": "n", "instances": [report]}


def test_a_valid_heartbeat_decodes() -> None:
    body = decode(frame(heartbeat(max_concurrency=4, capacity=2.0))).body
    assert isinstance(body, messages.WorkerHeartbeat) and body.instances[0].max_concurrency == 4


@pytest.mark.parametrize(
    "instance",
    [
        {"max_concurrency": 0},
        {"max_concurrency": -1},
        {"max_concurrency": messages.MAX_CONCURRENCY + 1},
        {"capacity": 0.0},
        {"capacity": math.inf},
        {"capacity": math.nan},
        {"capacity": -1.0},
        {"error": "x" * (messages.MAX_REASON_CHARS + 1)},
        {"instance_id": "i" * (messages.MAX_ID_CHARS + 1)},
        {"active_tasks": [f"t{i}" for i in range(messages.MAX_TASKS_PER_INSTANCE + 1)]},
    ],
    ids=lambda d: next(iter(d)),
)
def test_an_instance_outside_the_bounds_is_a_protocol_error(instance: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        decode(frame(heartbeat(**instance)))


def test_too_many_instances_in_one_heartbeat_is_a_protocol_error() -> None:
    reports = [{"instance_id": f"n/{i}", "model": "m"} for i in range(messages.MAX_INSTANCES_PER_NODE + 1)]
    with pytest.raises(ProtocolError):
        decode(frame({"type": "WorkerHeartbeat", "node_id": "n", "instances": reports}))


@pytest.mark.parametrize(
    ("field", "value"),
    [("index", -1), ("index", 2**40), ("text", "x" * (messages.MAX_TEXT_CHARS + 1)), ("node_id", "n" * 300)],
)
def test_a_chunk_outside_the_bounds_is_a_protocol_error(field: str, value: Any) -> None:
    chunk = {
        "type": "TaskChunk",
        "node_id": "n",
        "task_id": "t",
        "instance_id": "n/0",
        "index": 0,
        "text": "",
    }
    with pytest.raises(ProtocolError):
        decode(frame({**chunk, field: value}))


def test_envelopes_carry_the_incarnation() -> None:
    stamper = Stamper("n", incarnation="abc123")
    envelope = stamper.stamp(messages.MasterHeartbeat(session="s"), now=1.0)
    assert decode(msgspec.msgpack.encode(envelope)).incarnation == "abc123"


def test_sequence_numbers_tell_reordering_from_loss() -> None:
    from protocol.envelope import SequenceTracker

    tracker = SequenceTracker()
    for seq in (1, 2, 5, 3, 6, 4, 4):  # 3 and 4 arrive late; 4 twice
        tracker.observe("w", seq)
    assert tracker.gaps["w"] == 0, "late messages were counted as lost"
    assert tracker.reordered["w"] == 2 and tracker.duplicates["w"] == 1
    tracker.observe("w", 9)  # 7 and 8 never come
    assert tracker.gaps["w"] == 2
    tracker.observe("w", 1)  # the publisher restarted
    tracker.observe("w", 2)
    assert tracker.gaps["w"] == 2
