"""Hands generated text from the MLX thread to each request's `on_text`, on that request's event loop.

A batch step produces one piece per request. Every piece of a step is posted to its loop with
`loop.call_soon_threadsafe` first, and only then does the MLX thread wait for all of them: one loop
wake-up per step, however many requests share it. Waiting before the next step gives back-pressure
and keeps "cancel within one token" true as the consumer sees it: a cancel set from `on_text` is
visible to the check that follows the step.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable

from exo_worker.engine import EngineError, TextSink

# How often the MLX thread, waiting for a loop to take its pieces, checks that the loop is still
# there. The wait is normally far shorter.
_POLL_S = 0.05


class Delivery:
    """One request's text channel: the loop it lives on, its `on_text`, and whether it was abandoned."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_text: TextSink, abandoned: threading.Event):
        self._loop = loop
        self._on_text = on_text
        self.abandoned = abandoned
        self.error: BaseException | None = None

    def post(self, piece: str) -> threading.Event | None:
        """Schedule `on_text(piece)` on the loop; the returned event is set once it has run."""
        if not piece or self.abandoned.is_set():
            return None
        done = threading.Event()

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
            self.abandoned.set()
            return None
        return done

    def wait(self, done: threading.Event) -> None:
        """Wait until a posted piece was taken (or the listener went away)."""
        while not done.wait(_POLL_S):
            if self.abandoned.is_set():
                return
            if self._loop.is_closed():
                self.abandoned.set()
                return

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
