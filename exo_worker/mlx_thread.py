"""MlxThread: the one thread that runs all of an engine's MLX work, and drives its batch.

Why one thread per engine:
- one MLX model instance is not safe for concurrent use from several threads (mlx_lm gives no such
  guarantee), so everything touching it (load, warm-up, every batch step) runs here, in order;
- MLX 0.32 on Linux may abort the whole process at exit ("terminate called without an active
  exception") when a thread that ran compiled MLX code ends without `mx.clear_streams()`. The
  default executor's threads (`asyncio.to_thread`) end at interpreter exit where nothing can run
  that call; this thread runs it before it ends.

The loop: run queued jobs (load), settle waiting requests that were cancelled, admit waiting
requests into free batch slots, then run one batch step; sleep only when there is nothing to do.
Waiting requests are looked at once per step, so their cancel is honoured within one step too.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import sys
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from exo_worker.batch_scheduler import CANCELLED, BatchScheduler, GenRequest
from exo_worker.engine import EngineError

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class _Job:
    fn: Callable[[], Any]
    future: concurrent.futures.Future[Any]


class MlxThread:
    """One daemon thread per engine; it clears its MLX streams before it ends."""

    def __init__(self, name: str) -> None:
        self._jobs: deque[_Job] = deque()
        self._waiting: deque[GenRequest] = deque()
        self._scheduler: BatchScheduler | None = None
        self._wake = threading.Condition()
        self._closed = False
        # A daemon thread, stopped by an atexit hook: atexit runs after the interpreter has joined
        # non-daemon threads, so a non-daemon thread idling here would block exit.
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        """Run `fn` on this thread between batch steps."""
        job = _Job(fn, concurrent.futures.Future())
        with self._wake:
            if self._closed:
                raise EngineError("the engine is closed")
            self._jobs.append(job)
            self._wake.notify()
        return job.future

    def attach(self, scheduler: BatchScheduler) -> None:
        """Called on this thread (by the load job): from now on generation requests are served."""
        assert threading.current_thread() is self._thread
        self._scheduler = scheduler

    def enqueue(self, request: GenRequest) -> None:
        with self._wake:
            if self._closed:
                raise EngineError("the engine is closed")
            self._waiting.append(request)
            self._wake.notify()

    @property
    def waiting(self) -> int:
        """Requests waiting for a batch slot (read from any thread: one len() of a deque)."""
        return len(self._waiting)

    def close(self, timeout: float = 10.0) -> None:
        """Finish what is queued and running, then end the thread (clearing its MLX streams)."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        atexit.unregister(self.close)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _has_work(self) -> bool:
        scheduler = self._scheduler
        return bool(self._jobs) or (scheduler is not None and (bool(self._waiting) or scheduler.busy))

    def _main(self) -> None:
        while True:
            with self._wake:
                while not self._has_work() and not self._closed:
                    self._wake.wait()
                if not self._has_work():
                    break
                jobs, self._jobs = list(self._jobs), deque()
                gave_up = [r for r in self._waiting if r.stopped()]
                for request in gave_up:
                    self._waiting.remove(request)
                admitted: list[GenRequest] = []
                if self._scheduler is not None:
                    while self._waiting and len(admitted) < self._scheduler.free_slots:
                        admitted.append(self._waiting.popleft())
            for job in jobs:
                if job.future.set_running_or_notify_cancel():  # False: the awaiting task gave up first
                    try:
                        job.future.set_result(job.fn())
                    except BaseException as exc:
                        job.future.set_exception(exc)
            for request in gave_up:
                if request.start():
                    request.settle(CANCELLED)
            if self._scheduler is not None:
                self._serve(self._scheduler, admitted)
        if self._scheduler is not None:
            self._scheduler.close()
        if "mlx.core" in sys.modules:
            import mlx.core as mx

            mx.clear_streams()

    @staticmethod
    def _serve(scheduler: BatchScheduler, admitted: list[GenRequest]) -> None:
        try:
            for request in admitted:
                scheduler.admit(request)
            scheduler.step()
        except Exception as exc:
            # A bug outside the model call (which the scheduler handles itself). The thread must
            # go on, or every request of this engine would wait forever: fail the batch, not the thread.
            log.exception("batch scheduling failed")
            error = EngineError(f"engine error: {type(exc).__name__}: {exc}")
            scheduler.fail_all(error)
            for request in admitted:  # those that never made it into the batch
                if not request.future.done() and (request.future.running() or request.start()):
                    request.settle(error)
