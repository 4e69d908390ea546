"""The conversations behind `previous_response_id`: bounded in count and in age.

A stored response keeps the whole conversation that produced it (input and output, as
ChatMessages), so the next request names it instead of resending it. At most `limit` entries, each
for `ttl_s` seconds; the oldest goes first. Kept in the master's memory only: a restart forgets
them, and a later request naming one gets a clear 400.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from protocol.messages import ChatMessage


class ResponseStore:
    def __init__(self, limit: int = 1024, ttl_s: float = 3600.0, clock: Callable[[], float] = time.monotonic):
        assert limit > 0 and ttl_s > 0
        self.limit = limit
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, tuple[ChatMessage, ...]]] = OrderedDict()

    def put(self, response_id: str, conversation: tuple[ChatMessage, ...]) -> None:
        self._expire()
        self._entries[response_id] = (self._clock() + self.ttl_s, conversation)
        while len(self._entries) > self.limit:
            self._entries.popitem(last=False)

    def get(self, response_id: str) -> tuple[ChatMessage, ...] | None:
        self._expire()
        entry = self._entries.get(response_id)
        return None if entry is None else entry[1]

    def __len__(self) -> int:
        return len(self._entries)

    def _expire(self) -> None:
        now = self._clock()
        while self._entries:
            oldest = next(iter(self._entries.values()))
            if oldest[0] > now:
                return
            self._entries.popitem(last=False)
