"""StopStringFilter: cuts a streamed text at the first stop string, however the text is cut into pieces."""

from __future__ import annotations

from collections.abc import Iterable


class StopStringFilter:
    """Cuts a text stream at the first stop string, even when a stop string spans several pieces.

    `feed` returns the text that is safe to emit now, and whether a stop string was found. It holds
    back the longest tail that could still grow into a stop string: a tail that is a proper prefix
    of one (so at most `len(longest stop) - 1` characters, usually none). On a hit, the text from
    the stop string on is dropped. "First" means the stop string completed first (the one ending
    earliest, the longest one on a tie): that is where a streaming generator has to stop, and it
    makes the result independent of how the text was cut into pieces. `flush` returns the held-back
    tail once the stream has ended without a hit.
    """

    def __init__(self, stops: Iterable[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._buffer = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        self._buffer += piece
        best: tuple[int, int] | None = None  # (end, start) of the first completed stop string
        for stop in self._stops:
            start = self._buffer.find(stop)
            if start >= 0 and (best is None or (start + len(stop), start) < best):
                best = (start + len(stop), start)
        if best is not None:
            out, self._buffer = self._buffer[: best[1]], ""
            return out, True
        hold = max((self._partial_match(stop) for stop in self._stops), default=0)
        cut = len(self._buffer) - hold
        out, self._buffer = self._buffer[:cut], self._buffer[cut:]
        return out, False

    def _partial_match(self, stop: str) -> int:
        """Length of the longest end of the buffer that is a proper prefix of `stop`."""
        for length in range(min(len(stop) - 1, len(self._buffer)), 0, -1):
            if self._buffer.endswith(stop[:length]):
                return length
        return 0

    def flush(self) -> str:
        out, self._buffer = self._buffer, ""
        return out
