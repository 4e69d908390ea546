"""One HTTP request's view of its task: placement, output, end, timing, and who served it.

A Relay reads the task's client effects from its TaskWaiter and turns them into what the HTTP side
needs: output pieces, the end, or an ApiError. It follows re-placements, so the `x-exo-*` headers
name the instance that actually produced the reply (the last placement), not the first one. It also
times the reply for the inference metrics. `close()` hands the task back to the runtime (which
cancels it if it is still running); it runs exactly once, whatever way the request ends.
"""

from __future__ import annotations

import asyncio
import time
from typing import TypeVar

from starlette.requests import Request

from exo_master.core.events import (
    ClientEffect,
    RejectReason,
    TaskCompleted,
    TaskErrored,
    TaskOutput,
    TaskPlaced,
    TaskQueued,
    TaskRejected,
)
from exo_master.http.errors import ApiError, model_not_found
from exo_master.http.inference_metrics import InferenceMetrics
from exo_master.runtime import MasterRuntime, TaskWaiter

T = TypeVar("T")


_REJECTIONS: dict[RejectReason, tuple[int, str]] = {
    RejectReason.UNKNOWN_MODEL: (404, "invalid_request_error"),
    RejectReason.UNSUPPORTED_KIND: (400, "invalid_request_error"),
    RejectReason.NO_LIVE_INSTANCE: (503, "service_unavailable"),
    RejectReason.QUEUE_FULL: (429, "rate_limit_error"),
    RejectReason.DUPLICATE_TASK: (409, "invalid_request_error"),
}


def rejection_error(rejected: TaskRejected, model: str, runtime: MasterRuntime) -> ApiError:
    if rejected.reason is RejectReason.UNKNOWN_MODEL:
        return model_not_found(model, runtime.served_models())
    status, type_ = _REJECTIONS[rejected.reason]
    return ApiError(status, rejected.message, type_, code=str(rejected.reason))


def task_error(errored: TaskErrored) -> ApiError:
    if errored.cancelled:
        return ApiError(
            409, f"the task was cancelled: {errored.message}", "invalid_request_error", code="cancelled"
        )
    if errored.unavailable:
        return ApiError(503, errored.message, "service_unavailable", code="instance_lost")
    if errored.code == "context_length_exceeded":  # the request's fault: OpenAI answers 400
        return ApiError(400, errored.message, "invalid_request_error", code=errored.code, param="messages")
    return ApiError(500, errored.message, "server_error", code="worker_failed")


async def watch_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class Relay:
    def __init__(
        self,
        runtime: MasterRuntime,
        waiter: TaskWaiter,
        request: Request,
        model: str,
        metrics: InferenceMetrics,
    ) -> None:
        self.runtime = runtime
        self.waiter = waiter
        self.model = model
        self.metrics = metrics
        self.placed: TaskPlaced | None = None
        self._gone = asyncio.create_task(watch_disconnect(request))
        # The waiter raises ClientGone once the client left and no effect is waiting.
        self._gone.add_done_callback(lambda _: waiter.abandon())
        self._submitted = time.perf_counter()
        self._first_output: float | None = None
        self._closed = False
        self._interrupted: str | None = None

    @property
    def task_id(self) -> str:
        return self.waiter.task_id

    def headers(self) -> dict[str, str]:
        assert self.placed is not None, "headers before the task was placed"
        return {
            "x-exo-task": self.placed.task_id,
            "x-exo-instance": self.placed.instance_id,
            "x-exo-node": self.placed.node_id,
        }

    async def _effect(self) -> ClientEffect:
        effect = await self.waiter.next()
        if isinstance(effect, TaskPlaced):
            self.placed = effect  # a re-placement replaces the first: headers name the last
        return effect

    async def until_placed(self) -> None:
        while self.placed is None:
            effect = await self._effect()
            match effect:
                case TaskPlaced() | TaskQueued():
                    continue
                case TaskRejected():
                    raise rejection_error(effect, self.model, self.runtime)
                case TaskErrored():
                    raise self._failed(effect)
                case _:
                    raise AssertionError(f"{type(effect).__name__} before the task was placed")

    async def next_event(self) -> TaskOutput | TaskCompleted:
        """The next output piece or the end; a failure raises its ApiError."""
        while True:
            effect = await self._effect()
            if isinstance(effect, TaskOutput):
                if self._first_output is None:
                    self._first_output = time.perf_counter()
                    self.metrics.first_output(self.model, self._first_output - self._submitted)
                return effect
            if isinstance(effect, TaskCompleted):
                end = time.perf_counter()
                after_first = None if self._first_output is None else end - self._first_output
                self.metrics.completed(self.model, end - self._submitted, after_first, effect.usage)
                return effect
            if isinstance(effect, TaskErrored):
                raise self._failed(effect)
            if isinstance(effect, TaskRejected):
                raise rejection_error(effect, self.model, self.runtime)

    async def collect(self) -> tuple[str, TaskCompleted]:
        texts: list[str] = []
        while True:
            event = await self.next_event()
            if isinstance(event, TaskCompleted):
                return "".join(texts), event
            texts.append(event.text)

    def _failed(self, errored: TaskErrored) -> ApiError:
        self.metrics.failed(self.model, time.perf_counter() - self._submitted)
        if self._interrupted is not None:
            return ApiError(503, self._interrupted, "service_unavailable", code="shutting_down")
        return task_error(errored)

    def interrupt(self, reason: str) -> None:
        """End this request now (the master is stopping): it fails with a 503 or an error event."""
        self._interrupted = reason
        self.waiter.put(TaskErrored(task_id=self.waiter.task_id, message=reason, unavailable=True))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._gone.cancel()
        self.runtime.release(self.waiter)
