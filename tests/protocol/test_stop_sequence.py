"""The stop string that ended an answer, on the wire: TaskFinished.stop_sequence is optional (older
workers send none), bounded like the request's stop strings, and only comes with finish_reason stop."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from protocol import messages
from protocol.codec import ProtocolError, decode, encode
from protocol.envelope import Envelope
from protocol.ids import InstanceId, NodeId, TaskId
from protocol.messages import MAX_STOP_CHARS, MAX_STOPS, FinishReason, TaskFinished

_raw = msgspec.msgpack.Encoder()


def frame(body: dict[str, Any]) -> bytes:
    return _raw.encode({"origin": "n", "seq": 1, "sent_at": 0.0, "body": body})


def finished(**fields: Any) -> dict[str, Any]:
    return {"type": "TaskFinished", "node_id": "n", "task_id": "t", "instance_id": "n/0", **fields}


def assign(stop: list[str]) -> dict[str, Any]:
    params = {"kind": "TextGeneration", "model": "m", "messages": [], "stop": stop}
    return {"type": "AssignTask", "node_id": "n", "task_id": "t", "instance_id": "n/0", "params": params}


def test_a_stop_sequence_round_trips() -> None:
    message = TaskFinished(
        node_id=NodeId("n"),
        task_id=TaskId("t"),
        instance_id=InstanceId("n/0"),
        finish_reason=FinishReason.STOP,
        stop_sequence="\n\nHuman:",
    )
    envelope = Envelope(origin="n", seq=1, sent_at=0.0, body=message)
    assert decode(encode(envelope)) == envelope


def test_a_finish_from_an_older_worker_decodes_without_one() -> None:
    body = decode(frame(finished(finish_reason="stop"))).body
    assert isinstance(body, TaskFinished) and body.stop_sequence is None


def test_the_longest_stop_string_a_request_may_carry_fits_the_finish() -> None:
    longest = "s" * MAX_STOP_CHARS
    body = decode(frame(assign([longest] * MAX_STOPS))).body
    assert isinstance(body, messages.AssignTask) and isinstance(body.params, messages.TextGenerationParams)
    assert body.params.stop == (longest,) * MAX_STOPS
    back = decode(frame(finished(finish_reason="stop", stop_sequence=longest))).body
    assert isinstance(back, TaskFinished) and back.stop_sequence == longest


@pytest.mark.parametrize(
    "fields",
    [
        {"finish_reason": "stop", "stop_sequence": "s" * (MAX_STOP_CHARS + 1)},
        {"finish_reason": "stop", "stop_sequence": ""},
        {"finish_reason": "length", "stop_sequence": "end"},
        {"finish_reason": "cancelled", "stop_sequence": "end"},
        {"finish_reason": "stop", "stop_sequence": 7},
    ],
    ids=["too-long", "empty", "with-length", "with-cancelled", "not-a-string"],
)
def test_a_stop_sequence_outside_the_rules_is_a_protocol_error(fields: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        decode(frame(finished(**fields)))


@pytest.mark.parametrize(
    "stop",
    [["s" * (MAX_STOP_CHARS + 1)], ["s"] * (MAX_STOPS + 1)],
    ids=["too-long", "too-many"],
)
def test_request_stop_strings_outside_the_bounds_are_a_protocol_error(stop: list[str]) -> None:
    with pytest.raises(ProtocolError):
        decode(frame(assign(stop)))


def test_a_stop_sequence_with_another_finish_reason_cannot_be_built() -> None:
    with pytest.raises(ValueError, match="length"):
        TaskFinished(
            node_id=NodeId("n"),
            task_id=TaskId("t"),
            instance_id=InstanceId("n/0"),
            finish_reason=FinishReason.LENGTH,
            stop_sequence="end",
        )
