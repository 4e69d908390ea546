"""Hands generated text from the MLX thread to each request's `on_text`, on that request's event loop.

A batch step produces one piece per request. Every piece of a step is posted to its loop with
`loop.call_soon_threadsafe` first, and only then does the MLX thread wait for all of them: one loop
wake-up per step, however many requests share it. Waiting before the next step gives back-pressure
and keeps "cancel within one token" true as the consumer sees it: a cancel set from `on_text` is
visible to the check that follows the step. The MLX thread sleeps on the piece's event; it wakes
when the loop has run `on_text`, or when the request is abandoned (`Delivery.abandon`).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable

from exo_worker.engine import EngineError, TextSink

# A deadline, not a poll: the wait normally ends when the loop has run `on_text`, or at once when the
# request is abandoned. Only a loop closed without cancelling its tasks (then nobody can set either)
# is noticed this late.
_LOOP_GONE_S = 5.0


class Delivery:
    """One request's text channel: the loop it lives on, its `on_text`, and its stop signal.

    `stop` is the request's one stop signal (the engine's `cancel` event): once set, no more text is
    posted, and `abandon` (the awaiting task went away) also wakes a wait in progress.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, on_text: TextSink, stop: threading.Event):
        self._loop = loop
        self._on_text = on_text
        self.stop = stop
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._waiting: set[threading.Event] = set()  # posted pieces not yet taken

    def post(self, piece: str) -> threading.Event | None:
        """Schedule `on_text(piece)` on the loop; the returned event is set once it has run."""
        done = threading.Event()
        with self._lock:
            if not piece or self.stop.is_set():
                return None
            self._waiting.add(done)

        def deliver() -> None:
            try:
                self._on_text(piece)
            except BaseException as exc:
                self.error = exc
            finally:
                done.set()

        try:
            self._loop.call_soon_threadsafe(deliver)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.abandon()
            return None
        return done

    def wait(self, done: threading.Event) -> None:
        """Wait until a posted piece was taken, or the request was abandoned."""
        while not done.wait(_LOOP_GONE_S):
            if self._loop.is_closed():
                self.abandon()
        with self._lock:
            self._waiting.discard(done)

    def abandon(self) -> None:
        """The awaiting task went away: stop the request and wake whoever waits for its text."""
        with self._lock:
            self.stop.set()
            waiting, self._waiting = self._waiting, set()
        for done in waiting:
            done.set()

    def failure(self) -> EngineError | None:
        """The error `on_text` raised, as the EngineError that fails this request."""
        if self.error is None:
            return None
        failure = EngineError(f"on_text failed: {type(self.error).__name__}: {self.error}")
        failure.__cause__ = self.error
        return failure


def deliver_all(pieces: Iterable[tuple[Delivery, str]]) -> None:
    """Post every piece of a step, then wait for all of them."""
    posted = [(delivery, done) for delivery, piece in pieces if (done := delivery.post(piece)) is not None]
    for delivery, done in posted:
        delivery.wait(done)
