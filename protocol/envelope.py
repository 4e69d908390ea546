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
    """Tells loss from reordering in each publisher's sequence. Pure: fed envelopes.

    A jump forward marks the skipped numbers missing and counts them as gaps; a missing number
    that arrives later was only reordered: it leaves the gap count and counts as reordered. A
    number far behind (more than `window`), or a restart at 1, means the publisher restarted.
    `gaps` is therefore the number of messages still missing, per publisher.
    """

    def __init__(self, window: int = 4096) -> None:
        self.window = window
        self._last: dict[str, int] = {}
        self._missing: dict[str, set[int]] = {}
        self.gaps: dict[str, int] = {}
        self.reordered: dict[str, int] = {}
        self.duplicates: dict[str, int] = {}

    def observe(self, origin: str, seq: int) -> int:
        """Record seq from origin; return how many messages were newly found missing before it."""
        last = self._last.get(origin)
        if last is None:
            self._last[origin] = seq
            return 0
        missing = self._missing.setdefault(origin, set())
        if seq > last:
            missed = seq - last - 1
            self._last[origin] = seq
            if missed:
                self.gaps[origin] = self.gaps.get(origin, 0) + missed
                missing.update(range(max(last + 1, seq - self.window), seq))
                if len(missing) > self.window:  # older holes are lost for good: stop tracking them
                    missing.difference_update([n for n in missing if n < seq - self.window])
            return missed
        if seq in missing:
            missing.discard(seq)
            self.gaps[origin] -= 1
            self.reordered[origin] = self.reordered.get(origin, 0) + 1
            return 0
        if seq == 1 or last - seq > self.window:
            self._last[origin] = seq  # the publisher restarted
            missing.clear()
            return 0
        self.duplicates[origin] = self.duplicates.get(origin, 0) + 1
        return 0

    def forget(self, origin: str) -> None:
        self._last.pop(origin, None)
        self._missing.pop(origin, None)


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
