"""StopStringFilter: the one stop-string rule of every engine, applied to a stream of text pieces.

The rule (OpenAI's `stop`): the answer ends where the earliest occurrence of any stop string in the
generated text begins, and the stop string itself is never returned. The result depends only on the
text, never on how it was cut into pieces, nor on which stop string happened to complete first.
The filter also names the stop string that ended the text (`matched`): the one at that earliest
position, the shortest when several begin there (it completes first, whatever the pieces are).
"""

from __future__ import annotations

from collections.abc import Iterable


class StopStringFilter:
    """Cuts a text stream at the earliest stop string in it, even across pieces.

    `feed` returns the text that is safe to emit now, and whether the stream ends here. It holds back
    text from the earliest position where a stop string could still begin (the text from there is a
    proper prefix of one), so at most `len(longest stop) - 1` characters, usually none. When one stop
    string has completed but a longer one that would begin earlier is still possible, the decision
    waits for the next piece (the text cannot end before the earliest stop, wherever it turns out to
    be). `flush`, at the end of the stream, returns what is held (cut at a stop string if one is
    complete in it) and whether it was cut. Once a call has returned True, `matched` is the stop
    string that ended the stream (None until then).
    """

    def __init__(self, stops: Iterable[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._buffer = ""
        self.matched: str | None = None

    def feed(self, piece: str) -> tuple[str, bool]:
        self._buffer += piece
        return self._decide(ended=False)

    def flush(self) -> tuple[str, bool]:
        return self._decide(ended=True)

    def _decide(self, ended: bool) -> tuple[str, bool]:
        buffer = self._buffer
        found = min(
            ((at, len(stop), stop) for stop in self._stops if (at := buffer.find(stop)) >= 0), default=None
        )
        cut = None if found is None else found[0]
        undecided = None if ended else self._earliest_open(len(buffer) if cut is None else cut)
        if found is not None and undecided is None:
            self._buffer = ""
            self.matched = found[2]
            return buffer[: found[0]], True
        keep = len(buffer) if undecided is None else undecided
        out, self._buffer = buffer[:keep], buffer[keep:]
        return out, False

    def _earliest_open(self, before: int) -> int | None:
        """The first position before `before` where a stop string has begun but not completed yet."""
        buffer = self._buffer
        longest = max((len(stop) for stop in self._stops), default=0)
        for at in range(max(0, len(buffer) - longest + 1), min(before, len(buffer))):
            tail = buffer[at:]
            if any(len(tail) < len(stop) and stop.startswith(tail) for stop in self._stops):
                return at
        return None
