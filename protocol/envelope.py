"""The envelope every bus message travels in: who sent it, its place in the sender's sequence, when."""

from __future__ import annotations

from typing import Annotated

import msgspec

from protocol.messages import Message


class Envelope(msgspec.Struct, frozen=True, kw_only=True):
    origin: Annotated[str, msgspec.Meta(max_length=512)]
    # Per-publisher, starting at 1, +1 per message; a receiver that sees a jump counts a gap.
    seq: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
    sent_at: float
    body: Message
    # A fresh id per worker process: two live processes with one node id are told apart by it.
    incarnation: Annotated[str, msgspec.Meta(max_length=64)] = ""


class SequenceTracker:
    """Detects gaps in each publisher's sequence. Pure: fed envelopes, reports gap sizes.

    A sequence that goes backwards means the publisher restarted; it resets, and is not a gap.
    """

    def __init__(self) -> None:
        self._last: dict[str, int] = {}
        self.gaps: dict[str, int] = {}

    def observe(self, origin: str, seq: int) -> int:
        """Record seq from origin; return how many messages were missed just before it."""
        last = self._last.get(origin)
        self._last[origin] = seq
        if last is None or seq <= last:
            return 0
        missed = seq - last - 1
        if missed:
            self.gaps[origin] = self.gaps.get(origin, 0) + missed
        return missed

    def forget(self, origin: str) -> None:
        self._last.pop(origin, None)


class Stamper:
    """Wraps outgoing bodies in envelopes with this publisher's next sequence number."""

    def __init__(self, origin: str, incarnation: str = "") -> None:
        self.origin = origin
        self.incarnation = incarnation
        self._seq = 0

    def stamp(self, body: Message, now: float) -> Envelope:
        self._seq += 1
        return Envelope(
            origin=self.origin, seq=self._seq, sent_at=now, body=body, incarnation=self.incarnation
        )
