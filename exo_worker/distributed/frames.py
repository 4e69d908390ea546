"""The frames between the worker and its rank-0 child process (process_engine <-> rank0_process).

Each frame is a 4-byte big-endian length and a msgpack body, one tagged struct. The worker writes
to the child's stdin and reads its stdout; the child logs to stderr. A frame longer than
MAX_FRAME, or one that does not decode, is a broken link: the reader ends it (the other side
then sees the pipe close), it never guesses.
"""

from __future__ import annotations

import struct
from typing import IO

import msgspec

from exo_worker.distributed.topology import ShardSpec
from exo_worker.engine import RunOutcome
from protocol.messages import FinishReason, InstanceWork, PromptCacheStats, TaskParams, ToolCall, Usage

MAX_FRAME = 64 << 20  # a prompt is bounded well below this by the protocol's own limits
_HEADER = struct.Struct(">I")


class FrameError(RuntimeError):
    """The link is broken: a frame too long, cut short or not one of ours."""


# ---- worker -> child -----------------------------------------------------------------------------


class Init(msgspec.Struct, frozen=True, tag="init"):
    model: str
    spec: ShardSpec
    label: str
    max_batch: int
    prompt_cache_bytes: int | None
    prefill_chunk: int = 0


class Run(msgspec.Struct, frozen=True, tag="run"):
    run: int
    params: TaskParams


class Cancel(msgspec.Struct, frozen=True, tag="cancel"):
    run: int


class Close(msgspec.Struct, frozen=True, tag="close"):
    pass


# ---- child -> worker -----------------------------------------------------------------------------


class Progress(msgspec.Struct, frozen=True, tag="progress"):
    what: str
    fraction: float


class Loaded(msgspec.Struct, frozen=True, tag="loaded"):
    pass


class LoadFailed(msgspec.Struct, frozen=True, tag="load_failed"):
    error: str


class Text(msgspec.Struct, frozen=True, tag="text"):
    run: int
    text: str


class Done(msgspec.Struct, frozen=True, tag="done"):
    """A run's RunOutcome, field for field (`of` and `outcome` convert, so none is forgotten)."""

    run: int
    finish_reason: FinishReason
    usage: Usage
    tool_calls: tuple[ToolCall, ...] = ()
    stop_sequence: str | None = None

    @classmethod
    def of(cls, run: int, outcome: RunOutcome) -> Done:
        return cls(run, outcome.finish_reason, outcome.usage, outcome.tool_calls, outcome.stop_sequence)

    def outcome(self) -> RunOutcome:
        return RunOutcome(self.finish_reason, self.usage, self.tool_calls, self.stop_sequence)


class RunFailed(msgspec.Struct, frozen=True, tag="run_failed"):
    run: int
    error: str
    code: str | None = None


class Snapshot(msgspec.Struct, frozen=True, tag="snapshot"):
    """The engine's counters, sent periodically: the worker's heartbeats read the latest."""

    work: InstanceWork
    prompt_cache: PromptCacheStats
    context_length: int


class Lost(msgspec.Struct, frozen=True, tag="lost"):
    reason: str


ToChild = Init | Run | Cancel | Close
FromChild = Progress | Loaded | LoadFailed | Text | Done | RunFailed | Snapshot | Lost

_encoder = msgspec.msgpack.Encoder()
to_child = msgspec.msgpack.Decoder(ToChild)
from_child = msgspec.msgpack.Decoder(FromChild)


def encode(frame: ToChild | FromChild) -> bytes:
    body = _encoder.encode(frame)
    if len(body) > MAX_FRAME:
        raise FrameError(f"a {type(frame).__name__} frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _HEADER.pack(len(body)) + body


def read_body(stream: IO[bytes]) -> bytes | None:
    """The next frame's body (blocking); None at a clean end of stream. FrameError when broken."""
    header = _read_exactly(stream, _HEADER.size)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    if size > MAX_FRAME:
        raise FrameError(f"a frame of {size} bytes exceeds {MAX_FRAME}")
    body = _read_exactly(stream, size)
    if body is None:
        raise FrameError("the stream ended inside a frame")
    return body


def _read_exactly(stream: IO[bytes], size: int) -> bytes | None:
    parts: list[bytes] = []
    got = 0
    while got < size:
        part = stream.read(size - got)
        if not part:
            if got:
                raise FrameError("the stream ended inside a frame")
            return None
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def decode(decoder: msgspec.msgpack.Decoder, body: bytes) -> object:
    try:
        return decoder.decode(body)
    except msgspec.DecodeError as exc:  # ValidationError is one
        raise FrameError(f"a frame that is not ours: {exc}") from exc
