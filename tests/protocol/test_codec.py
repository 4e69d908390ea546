"""The wire codec: every message survives a round trip; nothing undecodable escapes as anything but
ProtocolError; sequence numbering detects gaps and restarts."""

from __future__ import annotations

import contextlib
import enum
import types
import typing
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import messages
from protocol.codec import (
    BROADCAST_TOPIC,
    ProtocolError,
    decode,
    decode_frames,
    encode,
    encode_frames,
    node_topic,
)
from protocol.envelope import Envelope, SequenceTracker, Stamper
from protocol.ids import NodeId
from protocol.messages import (
    ChatMessage,
    ImageEditsParams,
    ImageGenerationParams,
    MasterHeartbeat,
    Message,
    TaskParams,
    TextGenerationParams,
)
from protocol.sharding import MAX_SHARDS, RingPorts, ShardAssignment, Sharding

MESSAGE_TYPES: tuple[type[msgspec.Struct], ...] = typing.get_args(Message)
PARAMS_TYPES: tuple[type[msgspec.Struct], ...] = typing.get_args(TaskParams)

# ---- strategies derived from the Struct definitions ----------------------------------------------

_INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
_TEXT = st.text(max_size=12)


def strategy_for(tp: Any) -> st.SearchStrategy[Any]:
    """A strategy for any type that appears in protocol.messages, read off its annotations."""
    supertype = getattr(tp, "__supertype__", None)  # typing.NewType (the ids)
    if supertype is not None:
        return strategy_for(supertype)
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return struct_strategy(tp)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return st.sampled_from(list(tp))
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        base, *metas = typing.get_args(tp)
        return constrained(base, [m for m in metas if isinstance(m, msgspec.Meta)])
    if origin in (typing.Union, types.UnionType):
        return st.one_of([strategy_for(arg) for arg in typing.get_args(tp)])
    if origin is typing.Literal:
        return st.sampled_from(typing.get_args(tp))
    if origin is dict:  # a JSON schema (ToolSpec.parameters): JSON-like values under string keys
        scalar = st.none() | st.booleans() | _INT64 | _TEXT
        return st.dictionaries(
            _TEXT, st.recursive(scalar, lambda inner: st.lists(inner, max_size=2)), max_size=3
        )
    if origin is tuple:
        args = typing.get_args(tp)
        if args[-1] is not Ellipsis:  # fixed length, e.g. a (start, end) range
            return st.tuples(*(strategy_for(arg) for arg in args))
        return st.lists(strategy_for(args[0]), max_size=3).map(tuple)
    leaves: dict[Any, st.SearchStrategy[Any]] = {
        str: _TEXT,
        int: _INT64,
        float: st.floats(allow_nan=False),
        bool: st.booleans(),
        type(None): st.none(),
    }
    return leaves[tp]


def constrained(base: Any, metas: list[msgspec.Meta]) -> st.SearchStrategy[Any]:
    """Values of `base` inside the bounds its msgspec.Meta annotations declare."""
    bounds = {
        k: getattr(m, k)
        for m in metas
        for k in ("ge", "gt", "le", "min_length", "max_length")
        if getattr(m, k) is not None
    }
    if base is int:
        lo = bounds.get("ge", bounds["gt"] + 1 if "gt" in bounds else -(2**63))
        return st.integers(min_value=lo, max_value=bounds.get("le", 2**63 - 1))
    if base is float:
        return st.floats(min_value=1e-6, max_value=bounds.get("le", 1e6))
    if "max_length" in bounds and typing.get_origin(base) is tuple:
        return strategy_for(base).filter(lambda t: len(t) <= bounds["max_length"])
    if base is str and "min_length" in bounds:
        return st.text(min_size=bounds["min_length"], max_size=max(12, bounds["min_length"]))
    return strategy_for(base)


def struct_strategy(cls: type[msgspec.Struct]) -> st.SearchStrategy[Any]:
    if cls in _CROSS_FIELD:
        return _CROSS_FIELD[cls]
    fields = {f.name: strategy_for(f.type) for f in msgspec.structs.fields(cls)}
    return st.builds(cls, **fields)


_ADDRESS = st.builds("{}:{}".format, st.from_regex(r"[a-z0-9.]{1,12}", fullmatch=True), st.integers(1, 65535))


@st.composite
def _shard_assignments(draw: st.DrawFn) -> ShardAssignment:
    """Structs whose fields constrain each other (checked in __post_init__) are drawn whole."""
    size = draw(st.integers(2, MAX_SHARDS))
    return ShardAssignment(
        group=draw(st.text(min_size=1, max_size=12)),
        rank=draw(st.integers(0, size - 1)),
        hosts=tuple(draw(st.lists(_ADDRESS, min_size=size, max_size=size))),
        sharding=draw(st.sampled_from(list(Sharding))),
        control=draw(_ADDRESS),
        split=draw(st.just(()) | st.lists(st.integers(1, 99), min_size=size, max_size=size).map(tuple)),
        memory_bytes=draw(st.integers(0, 2**63 - 1)),
    )


@st.composite
def _task_finished(draw: st.DrawFn) -> messages.TaskFinished:
    """A stop_sequence comes only with finish_reason stop (TaskFinished.__post_init__)."""
    fields = {f.name: f for f in msgspec.structs.fields(messages.TaskFinished)}
    stop = fields.pop("stop_sequence")
    finished = draw(st.builds(messages.TaskFinished, **{n: strategy_for(f.type) for n, f in fields.items()}))
    if finished.finish_reason is not messages.FinishReason.STOP:
        return finished
    return msgspec.structs.replace(finished, stop_sequence=draw(strategy_for(stop.type)))


_CROSS_FIELD: dict[type[msgspec.Struct], st.SearchStrategy[Any]] = {
    ShardAssignment: _shard_assignments(),
    messages.TaskFinished: _task_finished(),
    RingPorts: st.builds(
        lambda host, first, span: RingPorts(host=host, first=first, last=min(65535, first + span)),
        st.from_regex(r"[a-z0-9.]{1,12}", fullmatch=True),
        st.integers(1, 65535),
        st.integers(0, 100),
    ),
}


def envelopes(body: st.SearchStrategy[Any]) -> st.SearchStrategy[Envelope]:
    return st.builds(
        Envelope,
        origin=_TEXT,
        seq=st.integers(min_value=0, max_value=2**63 - 1),
        sent_at=st.floats(allow_nan=False),
        body=body,
        incarnation=_TEXT,
    )


ANY_MESSAGE = st.one_of([struct_strategy(cls) for cls in MESSAGE_TYPES])
ANY_ENVELOPE = envelopes(ANY_MESSAGE)
TOPICS = st.one_of(
    st.just(BROADCAST_TOPIC), _TEXT.map(lambda n: node_topic(NodeId(n))), st.binary(max_size=8)
)


def sample_envelope() -> Envelope:
    return Stamper("node0").stamp(MasterHeartbeat(session="s", interval=1.0), now=12.5)


# ---- round trips --------------------------------------------------------------------------------


def test_every_tagged_struct_in_the_protocol_is_a_message() -> None:
    tagged = {
        obj
        for obj in vars(messages).values()
        if isinstance(obj, type)
        and issubclass(obj, msgspec.Struct)
        and obj.__struct_config__.tag_field == "type"
    }
    assert tagged == set(MESSAGE_TYPES)
    assert set(PARAMS_TYPES) == {TextGenerationParams, ImageGenerationParams, ImageEditsParams}


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda c: c.__name__)
@settings(max_examples=40, derandomize=True)
@given(data=st.data())
def test_each_message_type_round_trips_in_an_envelope(cls: type[msgspec.Struct], data: st.DataObject) -> None:
    envelope = data.draw(envelopes(struct_strategy(cls)))
    topic = data.draw(TOPICS)
    assert decode(encode(envelope)) == envelope
    assert decode_frames(encode_frames(topic, envelope)) == (topic, envelope)


@pytest.mark.parametrize("params_cls", PARAMS_TYPES, ids=lambda c: c.__name__)
@settings(max_examples=40, derandomize=True)
@given(data=st.data())
def test_assign_task_round_trips_with_each_task_kind(
    params_cls: type[msgspec.Struct], data: st.DataObject
) -> None:
    params = data.draw(struct_strategy(params_cls))
    assign = data.draw(
        struct_strategy(messages.AssignTask).map(lambda a: msgspec.structs.replace(a, params=params))
    )
    envelope = data.draw(envelopes(st.just(assign)))
    decoded = decode(encode(envelope))
    assert decoded == envelope
    assert isinstance(decoded.body, messages.AssignTask)
    assert type(decoded.body.params) is params_cls
    assert decoded.body.kind is params_cls.KIND


@settings(max_examples=60, derandomize=True)
@given(envelope=ANY_ENVELOPE)
def test_unknown_extra_fields_are_ignored(envelope: Envelope) -> None:
    raw = msgspec.to_builtins(envelope)
    raw["added_by_a_newer_peer"] = [1, "two", {"three": 3.0}]
    raw["body"]["also_new"] = {"nested": True}
    assert decode(msgspec.msgpack.encode(raw)) == envelope


def test_text_generation_params_decode_with_only_the_required_fields() -> None:
    raw = {
        "origin": "w",
        "seq": 1,
        "sent_at": 0.0,
        "body": {
            "type": "AssignTask",
            "task_id": "t",
            "node_id": "n",
            "instance_id": "i",
            "params": {
                "kind": "TextGeneration",
                "model": "m",
                "messages": [{"role": "user", "content": "hi"}],
            },
        },
    }
    body = decode(msgspec.msgpack.encode(raw)).body
    assert body == messages.AssignTask(
        task_id="t",  # type: ignore[arg-type]
        node_id="n",  # type: ignore[arg-type]
        instance_id="i",  # type: ignore[arg-type]
        params=TextGenerationParams(model="m", messages=(ChatMessage(role="user", content="hi"),)),  # type: ignore[arg-type]
    )


# ---- everything else is a ProtocolError ---------------------------------------------------------


@settings(max_examples=300, derandomize=True)
@given(payload=st.binary(max_size=64))
def test_random_bytes_decode_or_raise_protocol_error(payload: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        assert isinstance(decode(payload), Envelope)


@settings(max_examples=100, derandomize=True)
@given(envelope=ANY_ENVELOPE, data=st.data())
def test_corrupted_frames_decode_or_raise_protocol_error(envelope: Envelope, data: st.DataObject) -> None:
    """Random bytes mostly fail on the first byte; corrupting a real frame reaches deeper."""
    payload = bytearray(encode(envelope))
    for _ in range(data.draw(st.integers(1, 4))):
        payload[data.draw(st.integers(0, len(payload) - 1))] = data.draw(st.integers(0, 255))
    with contextlib.suppress(ProtocolError):
        assert isinstance(decode(bytes(payload)), Envelope)


@settings(max_examples=100, derandomize=True)
@given(frames=st.lists(st.binary(max_size=32), max_size=4))
def test_random_frames_decode_or_raise_protocol_error(frames: list[bytes]) -> None:
    with contextlib.suppress(ProtocolError):
        decode_frames(frames)


@settings(max_examples=30, derandomize=True)
@given(envelope=ANY_ENVELOPE)
def test_every_truncation_of_a_valid_frame_is_a_protocol_error(envelope: Envelope) -> None:
    payload = encode(envelope)
    for end in range(len(payload)):
        with pytest.raises(ProtocolError):
            decode(payload[:end])
        with pytest.raises(ProtocolError):
            decode_frames([BROADCAST_TOPIC, payload[:end]])


def _raw_envelope() -> dict[str, Any]:
    raw = msgspec.to_builtins(sample_envelope())
    assert isinstance(raw, dict)
    return raw


def test_unknown_type_tag_is_a_protocol_error() -> None:
    raw = _raw_envelope()
    raw["body"]["type"] = "NoSuchMessage"
    with pytest.raises(ProtocolError, match="NoSuchMessage"):
        decode(msgspec.msgpack.encode(raw))


def test_missing_type_tag_is_a_protocol_error() -> None:
    raw = _raw_envelope()
    del raw["body"]["type"]
    with pytest.raises(ProtocolError):
        decode(msgspec.msgpack.encode(raw))


def test_unknown_task_kind_is_a_protocol_error() -> None:
    raw = {
        "origin": "m",
        "seq": 1,
        "sent_at": 0.0,
        "body": {
            "type": "AssignTask",
            "task_id": "t",
            "node_id": "n",
            "instance_id": "i",
            "params": {"kind": "AudioGeneration", "model": "m", "prompt": "p"},
        },
    }
    with pytest.raises(ProtocolError):
        decode(msgspec.msgpack.encode(raw))


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("seq",), "one"),
        (("sent_at",), "now"),
        (("origin",), 7),
        (("body",), "MasterHeartbeat"),
        (("body", "session"), 42),
        (("body", "interval"), [1.0]),
    ],
    ids=lambda v: repr(v),
)
def test_wrong_field_types_are_protocol_errors(path: tuple[str, ...], value: object) -> None:
    raw = _raw_envelope()
    target: Any = raw
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ProtocolError):
        decode(msgspec.msgpack.encode(raw))


def test_missing_required_field_is_a_protocol_error() -> None:
    raw = _raw_envelope()
    del raw["seq"]
    with pytest.raises(ProtocolError, match="seq"):
        decode(msgspec.msgpack.encode(raw))


@pytest.mark.parametrize("field", ["size_bytes", "hits", "misses", "reused_tokens"])
@pytest.mark.parametrize("value", [-1, 2**63])
def test_out_of_range_prompt_cache_stats_are_protocol_errors(field: str, value: int) -> None:
    report = {"instance_id": "i", "model": "m", "prompt_cache": {field: value}}
    body = {"type": "WorkerHeartbeat", "node_id": "n", "instances": [report]}
    raw = {"origin": "w", "seq": 1, "sent_at": 0.0, "body": body}
    with pytest.raises(ProtocolError):
        decode(msgspec.msgpack.encode(raw))


def test_an_instance_report_without_prompt_cache_stats_decodes_as_none() -> None:
    report = {"instance_id": "i", "model": "m"}
    body = {"type": "WorkerHeartbeat", "node_id": "n", "instances": [report]}
    envelope = decode(msgspec.msgpack.encode({"origin": "w", "seq": 1, "sent_at": 0.0, "body": body}))
    assert isinstance(envelope.body, messages.WorkerHeartbeat)
    assert envelope.body.instances[0].prompt_cache is None


def test_prompt_cache_stats_round_trip_in_a_heartbeat() -> None:
    stats = messages.PromptCacheStats(
        size_bytes=123, budget_bytes=2**40, entries=3, hits=5, misses=2, reused_tokens=2**62
    )
    report = messages.InstanceReport(instance_id="i", model="m", prompt_cache=stats)  # type: ignore[arg-type]
    heartbeat = messages.WorkerHeartbeat(node_id="n", instances=(report,))  # type: ignore[arg-type]
    envelope = decode(encode(Stamper("w").stamp(heartbeat, 1.0)))
    assert envelope.body == heartbeat


@pytest.mark.parametrize("capacity", [0.0, -1.0, float("nan")])
def test_non_positive_capacity_is_a_protocol_error(capacity: float) -> None:
    report = {"instance_id": "i", "model": "m", "capacity": capacity}
    body = {"type": "WorkerHeartbeat", "node_id": "n", "instances": [report]}
    raw = {"origin": "w", "seq": 1, "sent_at": 0.0, "body": body}
    with pytest.raises(ProtocolError, match="capacity"):
        decode(msgspec.msgpack.encode(raw))


def test_invalid_utf8_in_a_string_is_a_protocol_error() -> None:
    good = encode(Stamper("abc").stamp(MasterHeartbeat(session="s"), 0.0))
    bad = good.replace(b"\xa3abc", b"\xa3a\x80c")  # the origin, a 3-byte str, now not UTF-8
    assert bad != good
    with pytest.raises(ProtocolError):
        decode(bad)


def test_deeply_nested_unknown_field_is_a_protocol_error() -> None:
    raw = _raw_envelope()
    head = msgspec.msgpack.encode(raw)
    assert head[0] == 0x80 | len(raw)  # a fixmap: add one more entry by hand
    nested = b"\x91" * 5000 + b"\xc0"  # [[[[...nil...]]]], 5 KB
    payload = bytes([head[0] + 1]) + head[1:] + msgspec.msgpack.encode("x") + nested
    with pytest.raises(ProtocolError):
        decode(payload)


@pytest.mark.parametrize("count", [0, 1, 3, 4])
def test_wrong_frame_count_is_a_protocol_error(count: int) -> None:
    frames = encode_frames(BROADCAST_TOPIC, sample_envelope())
    frames = (frames * 2)[:count]
    with pytest.raises(ProtocolError, match="2 frames"):
        decode_frames(frames)


def test_topic_frames_of_different_nodes_are_not_prefixes_of_each_other() -> None:
    a, ab = node_topic(NodeId("a")), node_topic(NodeId("ab"))
    assert not ab.startswith(a) and not a.startswith(ab)


# ---- sequence numbers ---------------------------------------------------------------------------


def test_stamper_numbers_messages_from_one_upwards() -> None:
    stamper = Stamper("master")
    body = MasterHeartbeat(session="s")
    stamped = [stamper.stamp(body, now=float(i)) for i in range(5)]
    assert [e.seq for e in stamped] == [1, 2, 3, 4, 5]
    assert {e.origin for e in stamped} == {"master"}
    assert [e.sent_at for e in stamped] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert all(e.body is body for e in stamped)


def test_sequence_tracker_counts_no_gap_for_consecutive_messages() -> None:
    tracker = SequenceTracker()
    assert [tracker.observe("w", s) for s in range(1, 6)] == [0, 0, 0, 0, 0]
    assert tracker.gaps == {}


def test_sequence_tracker_counts_missed_messages_per_origin() -> None:
    tracker = SequenceTracker()
    assert tracker.observe("a", 1) == 0
    assert tracker.observe("a", 4) == 2
    assert tracker.observe("b", 10) == 0  # first message from b: a late joiner, not a gap
    assert tracker.observe("b", 11) == 0
    assert tracker.observe("a", 10) == 5
    assert tracker.observe("b", 13) == 1
    assert tracker.gaps == {"a": 7, "b": 1}


def test_sequence_tracker_treats_a_backwards_sequence_as_a_restart() -> None:
    tracker = SequenceTracker()
    for s in (1, 2, 3, 50):
        tracker.observe("w", s)
    assert tracker.gaps == {"w": 46}
    assert tracker.observe("w", 1) == 0  # restarted publisher
    assert tracker.observe("w", 2) == 0
    assert tracker.observe("w", 5) == 2  # gaps are counted again from the new sequence
    assert tracker.gaps == {"w": 48}


def test_sequence_tracker_forget_starts_an_origin_afresh() -> None:
    tracker = SequenceTracker()
    tracker.observe("w", 1)
    tracker.forget("w")
    assert tracker.observe("w", 9) == 0
    tracker.forget("never-seen")  # harmless


@settings(max_examples=100, derandomize=True)
@given(sent=st.integers(1, 200), lost=st.sets(st.integers(1, 200)))
def test_sequence_tracker_gap_total_equals_messages_lost_between_received_ones(
    sent: int, lost: set[int]
) -> None:
    stamper = Stamper("w")
    tracker = SequenceTracker()
    received = [
        e
        for e in (stamper.stamp(MasterHeartbeat(session="s"), 0.0) for _ in range(sent))
        if e.seq not in lost
    ]
    for e in received:
        tracker.observe(e.origin, e.seq)
    if received:
        first, last = received[0].seq, received[-1].seq
        expected = sum(1 for s in range(first, last + 1) if s in lost)
    else:
        expected = 0
    assert tracker.gaps.get("w", 0) == expected
