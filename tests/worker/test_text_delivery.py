"""Delivery: the MLX thread's wait for a piece ends when the loop has taken it, or at once when the
request is abandoned (no polling), and nothing is posted once the request's stop signal is set."""

from __future__ import annotations

import asyncio
import threading
import time

from exo_worker.text_delivery import Delivery, deliver_all

DEADLINE = 5.0


def test_a_wait_ends_when_the_loop_has_run_on_text() -> None:
    async def main() -> list[str]:
        got: list[str] = []
        delivery = Delivery(asyncio.get_running_loop(), got.append, threading.Event())
        # The MLX side runs in a thread; the loop keeps serving while it waits.
        await asyncio.wait_for(asyncio.to_thread(deliver_all, [(delivery, "a"), (delivery, "b")]), DEADLINE)
        return got

    assert asyncio.run(main()) == ["a", "b"]


def test_abandon_wakes_a_wait_the_loop_will_never_answer() -> None:
    loop = asyncio.new_event_loop()  # never run: a posted piece is never taken
    try:
        stop = threading.Event()
        delivery = Delivery(loop, lambda _: None, stop)
        done = delivery.post("a")
        assert done is not None
        waiter = threading.Thread(target=delivery.wait, args=(done,))
        started = time.monotonic()
        waiter.start()
        delivery.abandon()
        waiter.join(DEADLINE)
        assert not waiter.is_alive() and time.monotonic() - started < 1.0  # far below any poll period
        assert stop.is_set() and delivery.post("b") is None  # nothing more once stopped
    finally:
        loop.close()


def test_a_closed_loop_abandons_the_request() -> None:
    loop = asyncio.new_event_loop()
    loop.close()
    stop = threading.Event()
    delivery = Delivery(loop, lambda _: None, stop)
    assert delivery.post("a") is None and stop.is_set()
