"""The HTTP app: one request path (Api) under every API surface, and one route table.

Every task waits until the core has placed it; a stream also waits for its first output (or its
end) before the response starts, so the headers (`x-exo-task`, `x-exo-instance`, `x-exo-node`) name
the instance that actually serves it, after any re-placement. A request queued behind busy
instances simply waits there. A client that goes away, at any point, cancels its task and frees its
slot. That path is written once, here; each surface (openai_routes, anthropic, responses, ollama)
is an adapter that translates its request in and its output and errors out (textpath.TextReply).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence

import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp

from exo_master.core.events import TaskCompleted, TaskOutput
from exo_master.http.bounds import ApiLimits, BodyReads, BoundedBody
from exo_master.http.errors import ApiError, error_body
from exo_master.http.fastpath import FastPath
from exo_master.http.inference_metrics import InferenceMetrics
from exo_master.http.openai_compat import check_prompt_size
from exo_master.http.relay import Relay
from exo_master.http.routes import ApiRoute, hot_routes, starlette_routes
from exo_master.http.textpath import Ending, RelayStream, TextReply
from exo_master.runtime import ClientGone, MasterRuntime
from protocol.ids import TaskId
from protocol.messages import TaskParams, TextGenerationParams

__all__ = ["Api", "ApiError", "build_app", "client_gone", "error_body"]

log = structlog.get_logger("exo_master.http")


def client_gone() -> Response:
    # Nobody reads it; nginx's "client closed request" keeps access logs honest.
    return Response(status_code=499)


def ending(end: TaskCompleted, params: TaskParams) -> Ending:
    """How the task ended, as every surface sees it. A stop sequence is reported only when it is
    one of the request's own stop strings: a worker naming another (a bug, an odd frame) is logged
    and ignored, so its claim never becomes a wrong answer with a success status."""
    stop = end.stop_sequence
    asked = params.stop if isinstance(params, TextGenerationParams) else ()
    if stop is not None and stop not in asked:
        log.warning(
            "task.stop_sequence_ignored",
            task_id=end.task_id,
            stop_sequence=stop[:64],  # bounded: a log line is no place for a worker's long string
            asked=len(asked),
        )
        stop = None
    return Ending(end.finish_reason, end.usage, end.tool_calls, stop)


class Api:
    """The one request path: run a task for an HTTP request and relay its output, whatever the surface."""

    def __init__(self, runtime: MasterRuntime, limits: ApiLimits, inference: InferenceMetrics) -> None:
        self.runtime = runtime
        self.limits = limits
        self.inference = inference
        self.body_reads = BodyReads()
        self.started = time.time()
        self._open: dict[TaskId, Relay] = {}
        self.stopping: str | None = None

    def check_prompt(self, chars: int, param: str) -> None:
        check_prompt_size(chars, self.limits.max_prompt_chars, param)

    # ---- task plumbing --------------------------------------------------------------------------

    async def start(self, request: Request, task_id: TaskId, params: TaskParams, model: str) -> Relay:
        if self.stopping is not None:
            raise ApiError(503, self.stopping, "service_unavailable", code="shutting_down")
        waiter = self.runtime.submit(task_id, params)
        relay = Relay(self.runtime, waiter, request, model, self.inference)
        self._open[task_id] = relay
        try:
            await relay.until_placed()
        except BaseException:
            self._close(relay)
            raise
        return relay

    def _close(self, relay: Relay) -> None:
        self._open.pop(relay.waiter.task_id, None)
        relay.close()

    def shutdown(self, reason: str) -> int:
        """Fail every open request with a 503 (or an error event mid-stream); refuse new ones."""
        self.stopping = reason
        self.body_reads.stop(reason)
        for relay in list(self._open.values()):
            relay.interrupt(reason)
        return len(self._open)

    async def whole(
        self, request: Request, task_id: TaskId, params: TaskParams, model: str
    ) -> tuple[Relay, str, TaskCompleted] | None:
        """Run a task to its end; None when the client went away."""
        try:
            relay = await self.start(request, task_id, params, model)
        except ClientGone:
            return None
        try:
            text, end = await relay.collect()
        except ClientGone:
            return None
        finally:
            self._close(relay)
        return relay, text, end

    # ---- text, for every surface ---------------------------------------------------------------

    async def text(
        self, request: Request, task_id: TaskId, params: TaskParams, reply: TextReply, *, stream: bool
    ) -> Response:
        model = params.model
        if not stream:
            done = await self.whole(request, task_id, params, model)
            if done is None:
                return client_gone()
            relay, text, end = done
            body = reply.whole(text, ending(end, params))
            return Response(body, media_type="application/json", headers=relay.headers())
        try:
            relay = await self.start(request, task_id, params, model)
        except ClientGone:
            return client_gone()
        try:
            # The headers wait for the first output (or the end): by then the serving instance is known.
            first = await relay.next_event()
        except ClientGone:
            self._close(relay)
            return client_gone()
        except BaseException:
            self._close(relay)
            raise
        events = self._events(relay, reply, first, params)
        return RelayStream(
            events,
            on_close=lambda: self._close(relay),
            headers=relay.headers(),
            media_type=reply.stream_media_type,
        )

    async def _events(
        self, relay: Relay, reply: TextReply, first: TaskOutput | TaskCompleted, params: TaskParams
    ) -> AsyncIterator[bytes]:
        opening = reply.opening()
        if opening:
            yield opening
        event = first
        try:
            while isinstance(event, TaskOutput):
                yield reply.piece(event.text)
                event = await relay.next_event()
            yield reply.ending(ending(event, params))
        except ApiError as error:
            yield reply.failure(error)
        except ClientGone:
            return


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse(
        error_body(str(exc.detail), "invalid_request_error", code=f"http_{exc.status_code}"),
        status_code=exc.status_code,
    )


def api_routes(api: Api) -> list[ApiRoute]:
    """Every surface's routes; a new surface adds its module's `routes(api)` here."""
    from exo_master.http import anthropic, cluster_routes, instances, ollama, openai_routes, responses

    return [
        *openai_routes.routes(api),
        *responses.routes(api),
        *anthropic.routes(api),
        *ollama.routes(api),
        *cluster_routes.routes(api),
        *instances.routes(api),
    ]


def build_app(
    runtime: MasterRuntime,
    extra_routes: Sequence[ApiRoute | BaseRoute] | None = None,
    *,
    api: Api | None = None,
) -> ASGIApp:
    """The HTTP app. Pass `api` to keep a handle on it (the daemon calls `api.shutdown` on SIGTERM).

    The body bounds wrap the whole app from the outside (pure ASGI), so they hold for every route,
    however the routes inside are dispatched (the hot routes skip Starlette's middleware through
    FastPath; both are derived from the same table).
    """
    if api is None:
        api = Api(runtime, ApiLimits(), InferenceMetrics())
    table = [*api_routes(api), *(extra_routes or [])]
    app = Starlette(routes=starlette_routes(table), exception_handlers={HTTPException: _http_error})
    return BoundedBody(FastPath(app, hot_routes(table)), api.limits, api.body_reads)
