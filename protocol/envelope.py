"""The envelope every bus message travels in: who sent it, its place in the sender's sequence, when."""

from __future__ import annotations

from collections import OrderedDict
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


OTHER_ORIGINS = "other"  # the label past `max_labels` publishers: metric series stay bounded


class SequenceTracker:
    """Tells loss from reordering in each publisher's sequence. Pure: fed envelopes.

    A jump forward marks the skipped numbers missing and counts them as gaps; a missing number
    that arrives later was only reordered: it leaves the gap count and counts as reordered. A
    number far behind (more than `window`), or a restart at 1, means the publisher restarted.
    `gaps` is therefore the number of messages still missing, per publisher.

    Bounded, since origins are chosen by peers: at most `max_origins` sequences are followed (the
    one heard least recently is forgotten; if it speaks again it starts a new sequence, which
    costs at most one uncounted gap), and the per-publisher counts keep `max_labels` names, the
    rest adding up under `other` (a forgotten publisher's counts move there too).
    """

    def __init__(self, window: int = 4096, max_origins: int = 4096, max_labels: int = 64) -> None:
        self.window = window
        self.max_origins = max_origins
        self.max_labels = max_labels
        self._last: OrderedDict[str, int] = OrderedDict()  # least recently heard first
        self._missing: dict[str, set[int]] = {}
        self.gaps: dict[str, int] = {}
        self.reordered: dict[str, int] = {}
        self.duplicates: dict[str, int] = {}

    def observe(self, origin: str, seq: int) -> int:
        """Record seq from origin; return how many messages were newly found missing before it."""
        last = self._last.get(origin)
        if last is None:
            self._last[origin] = seq
            while len(self._last) > self.max_origins:
                self.forget(next(iter(self._last)))
            return 0
        self._last.move_to_end(origin)
        missing = self._missing.setdefault(origin, set())
        if seq > last:
            missed = seq - last - 1
            self._last[origin] = seq
            if missed:
                self._count(self.gaps, origin, missed)
                missing.update(range(max(last + 1, seq - self.window), seq))
                if len(missing) > self.window:  # older holes are lost for good: stop tracking them
                    missing.difference_update([n for n in missing if n < seq - self.window])
            return missed
        if seq in missing:
            missing.discard(seq)
            self._count(self.gaps, origin, -1)
            self._count(self.reordered, origin, 1)
            return 0
        if seq == 1 or last - seq > self.window:
            self._last[origin] = seq  # the publisher restarted
            missing.clear()
            return 0
        self._count(self.duplicates, origin, 1)
        return 0

    def _count(self, counts: dict[str, int], origin: str, delta: int) -> None:
        key = origin if origin in counts or len(counts) < self.max_labels else OTHER_ORIGINS
        counts[key] = counts.get(key, 0) + delta

    def forget(self, origin: str) -> None:
        """Stop following a publisher (gone for good, or the least recent past the bound)."""
        self._last.pop(origin, None)
        self._missing.pop(origin, None)
        if origin == OTHER_ORIGINS:
            return
        for counts in (self.gaps, self.reordered, self.duplicates):
            value = counts.pop(origin, None)
            if value:
                counts[OTHER_ORIGINS] = counts.get(OTHER_ORIGINS, 0) + value

    def __len__(self) -> int:
        return len(self._last)


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
