"""The instance-placement fields and messages: old peers' frames still decode, new ones round-trip,
and out-of-range values are protocol errors at decode."""

from __future__ import annotations

import msgspec
import pytest

from protocol import messages
from protocol.codec import ProtocolError, decode, encode
from protocol.envelope import Stamper
from protocol.ids import InstanceId, ModelId, NodeId


def _decode_body(body: dict[str, object]) -> object:
    frame = msgspec.msgpack.encode({"origin": "w", "seq": 1, "sent_at": 0.0, "body": body})
    return decode(frame).body


def test_a_heartbeat_from_an_older_worker_decodes_with_unknown_memory_and_no_models() -> None:
    body = {"type": "WorkerHeartbeat", "node_id": "n", "instances": [{"instance_id": "i", "model": "m"}]}
    heartbeat = _decode_body(body)
    assert isinstance(heartbeat, messages.WorkerHeartbeat)
    assert (heartbeat.memory_total, heartbeat.memory_available, heartbeat.backend) == (0, 0, "")
    assert heartbeat.models == ()
    report = heartbeat.instances[0]
    assert (report.memory_bytes, report.progress, report.placement) == (0, 0.0, "")


def test_a_full_heartbeat_round_trips() -> None:
    local = messages.LocalModel(
        model=ModelId("smollm2"), path="/m", size_bytes=10, weights_bytes=12, kv_bytes_per_token=3
    )
    report = messages.InstanceReport(
        instance_id=InstanceId("p1.0"),
        model=ModelId("smollm2"),
        status=messages.InstanceStatus.LOADING,
        memory_bytes=2**40,
        progress=0.5,
        placement="p1",
    )
    heartbeat = messages.WorkerHeartbeat(
        node_id=NodeId("n"),
        instances=(report,),
        memory_total=2**36,
        memory_available=2**35,
        backend="sim",
        host="mac-1",
        models=(local,),
    )
    assert decode(encode(Stamper("w").stamp(heartbeat, 1.0))).body == heartbeat


@pytest.mark.parametrize(
    "message",
    [
        messages.LoadInstance(
            node_id=NodeId("n"), instance_id=InstanceId("p.0"), model=ModelId("m"), placement="p"
        ),
        messages.UnloadInstance(node_id=NodeId("n"), instance_id=InstanceId("p.0")),
    ],
)
def test_load_and_unload_round_trip(message: messages.Message) -> None:
    assert decode(encode(Stamper("m").stamp(message, 0.0))).body == message


@pytest.mark.parametrize(
    "report",
    [
        {"instance_id": "i", "model": "m", "progress": 1.5},
        {"instance_id": "i", "model": "m", "memory_bytes": -1},
        {"instance_id": "i", "model": "m", "placement": "x" * 300},
    ],
)
def test_out_of_range_instance_fields_are_protocol_errors(report: dict[str, object]) -> None:
    with pytest.raises(ProtocolError):
        _decode_body({"type": "WorkerHeartbeat", "node_id": "n", "instances": [report]})


def test_a_load_with_zero_concurrency_is_a_protocol_error() -> None:
    body = {
        "type": "LoadInstance",
        "node_id": "n",
        "instance_id": "i",
        "model": "m",
        "placement": "p",
        "max_concurrency": 0,
    }
    with pytest.raises(ProtocolError):
        _decode_body(body)


def test_too_many_local_models_is_a_protocol_error() -> None:
    models = [{"model": f"m{i}"} for i in range(messages.MAX_LOCAL_MODELS + 1)]
    with pytest.raises(ProtocolError):
        _decode_body({"type": "WorkerHeartbeat", "node_id": "n", "models": models})
