"""The OpenAI-compatible HTTP API (Starlette), a thin shell over MasterRuntime.

Every completion waits until the core has placed its task; a stream also waits for its first output
(or its end) before the response starts, so the headers (`x-exo-task`, `x-exo-instance`,
`x-exo-node`) name the instance that actually serves it, after any re-placement. A request queued
behind busy instances simply waits there. A client that goes away, at any point, cancels its task
and frees its slot. Validation (http_errors, openai_schema, openai_compat), size and time bounds
(http_bounds) and the reply shapes (openai_format) live in their own modules.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from exo_master.core.events import TaskCompleted, TaskOutput
from exo_master.http.bounds import ApiLimits, BodyReads, BoundedBody
from exo_master.http.errors import ApiError, decode_json, error_body, invalid
from exo_master.http.fastpath import FastPath
from exo_master.http.image_edits import read_image_edits
from exo_master.http.inference_metrics import InferenceMetrics
from exo_master.http.openai_compat import (
    check_prompt_size,
    refuse_empty_prompt,
    refuse_unsupported_chat,
    refuse_unsupported_completion,
)
from exo_master.http.openai_format import DONE, ReplyShape, error_event
from exo_master.http.openai_schema import (
    ChatCompletionRequest,
    CompletionRequest,
    ImageGenerationRequest,
    SamplingFields,
)
from exo_master.http.relay import Relay
from exo_master.runtime import ClientGone, MasterRuntime
from protocol.cluster_view import TaskStatus
from protocol.ids import TaskId
from protocol.messages import InstanceStatus, TaskParams

__all__ = ["Api", "ApiError", "build_app", "error_body"]

T = TypeVar("T")
_json = msgspec.json.Encoder()
# Task rows /v1/cluster/state returns at most (the view is built on the event loop).
MAX_TASK_ROWS = 10_000


def client_gone() -> Response:
    # Nobody reads it; nginx's "client closed request" keeps access logs honest.
    return Response(status_code=499)


async def decode_body(request: Request, body_type: type[T]) -> T:
    return decode_json(await request.body(), body_type)


class RelayStream(StreamingResponse):
    """A stream whose task is handed back when the response ends, however it ends (even unsent)."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None], headers: dict[str, str]):
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


class Api:
    def __init__(self, runtime: MasterRuntime, limits: ApiLimits, inference: InferenceMetrics) -> None:
        self.runtime = runtime
        self.limits = limits
        self.inference = inference
        self.body_reads = BodyReads()
        self.started = time.time()
        self._open: dict[TaskId, Relay] = {}
        self.stopping: str | None = None

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

    async def _whole(
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

    # ---- text ------------------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        body = await decode_body(request, ChatCompletionRequest)
        refuse_unsupported_chat(body)
        check_prompt_size(body.prompt_chars(), self.limits.max_prompt_chars, "messages")
        task_id = TaskId(f"chatcmpl-{uuid.uuid4().hex[:24]}")
        return await self._text(
            request, body, body.to_params(), ReplyShape(True, task_id, body.model, int(time.time()))
        )

    async def completions(self, request: Request) -> Response:
        body = await decode_body(request, CompletionRequest)
        refuse_unsupported_completion(body)
        refuse_empty_prompt(body.prompt_text(), "prompt")
        check_prompt_size(body.prompt_chars(), self.limits.max_prompt_chars, "prompt")
        task_id = TaskId(f"cmpl-{uuid.uuid4().hex[:24]}")
        return await self._text(
            request, body, body.to_params(), ReplyShape(False, task_id, body.model, int(time.time()))
        )

    async def _text(
        self, request: Request, body: SamplingFields, params: TaskParams, shape: ReplyShape
    ) -> Response:
        task_id = TaskId(shape.task_id)
        if not body.streaming:
            done = await self._whole(request, task_id, params, body.model)
            if done is None:
                return client_gone()
            relay, text, end = done
            return Response(
                shape.whole(text, end.finish_reason, end.usage),
                media_type="application/json",
                headers=relay.headers(),
            )
        try:
            relay = await self.start(request, task_id, params, body.model)
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
        events = self._events(relay, shape, first, body.include_usage)
        return RelayStream(events, on_close=lambda: self._close(relay), headers=relay.headers())

    async def _events(
        self, relay: Relay, shape: ReplyShape, first: TaskOutput | TaskCompleted, include_usage: bool
    ) -> AsyncIterator[bytes]:
        opening = shape.opening()
        if opening is not None:
            yield opening
        event = first
        try:
            while isinstance(event, TaskOutput):
                yield shape.piece(event.text)
                event = await relay.next_event()
            yield shape.ending(event.finish_reason)
            if include_usage:
                yield shape.usage(event.usage)
        except ApiError as error:
            yield error_event(error)
        except ClientGone:
            return
        yield DONE

    # ---- images ------------------------------------------------------------------------------------

    async def image_generations(self, request: Request) -> Response:
        body = await decode_body(request, ImageGenerationRequest)
        check_prompt_size(body.prompt_chars(), self.limits.max_prompt_chars, "prompt")
        task_id = TaskId(f"img-{uuid.uuid4().hex[:24]}")
        return await self._image(request, task_id, body.to_params(), body.model)

    async def image_edits(self, request: Request) -> Response:
        form, params = await read_image_edits(request)
        check_prompt_size(len(form.prompt), self.limits.max_prompt_chars, "prompt")
        task_id = TaskId(f"imgedit-{uuid.uuid4().hex[:24]}")
        return await self._image(request, task_id, params, form.model)

    async def _image(self, request: Request, task_id: TaskId, params: TaskParams, model: str) -> Response:
        done = await self._whole(request, task_id, params, model)
        if done is None:
            return client_gone()
        relay, image_b64, _ = done
        payload = {"created": int(time.time()), "data": [{"b64_json": image_b64}]}
        return JSONResponse(payload, headers=relay.headers())

    # ---- cluster -----------------------------------------------------------------------------------

    def _live_models(self) -> set[str]:
        view = self.runtime.core.view(self.runtime.clock(), task_limit=0)
        served = {
            row.model
            for row in view.instances
            if row.status in (InstanceStatus.READY, InstanceStatus.LOADING)
        }
        # Placed models are listed too, while their replicas load (exo_master.core.instances).
        return served | {spec.model for spec in self.runtime.core.instances.specs()}

    def _model_object(self, model: str) -> dict[str, object]:
        return {"id": model, "object": "model", "created": int(self.started), "owned_by": "exo"}

    async def models(self, request: Request) -> Response:
        data = [self._model_object(m) for m in sorted(self._live_models())]
        return JSONResponse({"object": "list", "data": data})

    async def model(self, request: Request) -> Response:
        model = request.path_params["model_id"]
        if model not in self._live_models():
            raise ApiError(
                404,
                f"the model {model!r} is not served by any live instance",
                "invalid_request_error",
                code="model_not_found",
                param="model",
            )
        return JSONResponse(self._model_object(model))

    async def health(self, request: Request) -> Response:
        """Liveness: the master answers. Whether it can serve is /ready."""
        view = self.runtime.core.view(self.runtime.clock(), task_limit=0)
        return JSONResponse(
            {
                "status": "ok",
                "session": view.session,
                "policy": view.policy,
                "nodes_alive": sum(1 for n in view.nodes if n.alive),
                "instances_ready": sum(1 for i in view.instances if i.status == InstanceStatus.READY),
            }
        )

    async def ready(self, request: Request) -> Response:
        """Readiness: 200 while at least one instance is ready, else 503 with the reason."""
        view = self.runtime.core.view(self.runtime.clock(), task_limit=0)
        ready = sum(1 for i in view.instances if i.status == InstanceStatus.READY)
        alive = sum(1 for n in view.nodes if n.alive)
        if self.stopping is not None:
            reason = self.stopping
        elif ready:
            return JSONResponse({"status": "ready", "instances_ready": ready, "nodes_alive": alive})
        elif not alive:
            reason = "no worker node is alive"
        else:
            counts = {str(s): sum(1 for i in view.instances if i.status == s) for s in InstanceStatus}
            reason = (
                f"no instance is ready ({alive} nodes alive; instances: {counts['loading']} loading, "
                f"{counts['failed']} failed)"
            )
        body = error_body(reason, "service_unavailable", code="not_ready")
        return JSONResponse({**body, "status": "not_ready", "instances_ready": 0, "nodes_alive": alive}, 503)

    async def cluster_state(self, request: Request) -> Response:
        raw_limit = request.query_params.get("tasks", "500")
        limit = int(raw_limit) if raw_limit.isascii() and raw_limit.isdigit() and len(raw_limit) <= 6 else -1
        if not 0 <= limit <= MAX_TASK_ROWS:
            raise invalid(f"query parameter 'tasks' must be an integer from 0 to {MAX_TASK_ROWS}", "tasks")
        raw_status = request.query_params.get("status")
        try:
            status = TaskStatus(raw_status) if raw_status is not None else None
        except ValueError as exc:
            raise invalid(
                f"query parameter 'status' must be one of {', '.join(TaskStatus)}", "status"
            ) from exc
        gaps = self.runtime.bus.sequences.gaps if self.runtime.bus else {}
        view = self.runtime.core.view(self.runtime.clock(), task_limit=limit, gaps=gaps, status=status)
        if self.runtime.bus is not None and self.runtime.bus.insecure:
            view = msgspec.structs.replace(view, insecure=True)
        return Response(_json.encode(view), media_type="application/json")

    async def cancel_task(self, request: Request) -> Response:
        task_id = TaskId(request.path_params["task_id"])
        if not self.runtime.cancel(task_id, "cancelled by operator"):
            raise ApiError(404, f"no live task {task_id}", "invalid_request_error", code="task_not_found")
        return JSONResponse({"task_id": task_id, "cancelled": True})


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return exc.response()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse(
        error_body(str(exc.detail), "invalid_request_error", code=f"http_{exc.status_code}"),
        status_code=exc.status_code,
    )


def _expected_error(exc: Exception) -> Response | None:
    return exc.response() if isinstance(exc, ApiError) else None


def build_app(
    runtime: MasterRuntime, extra_routes: list[Route] | None = None, *, api: Api | None = None
) -> ASGIApp:
    """The HTTP app. Pass `api` to keep a handle on it (the daemon calls `api.shutdown` on SIGTERM).

    The body bounds wrap the whole app from the outside (pure ASGI), so they hold for every route,
    however the routes inside are dispatched (the hot completions route skips Starlette's
    middleware through FastPath).
    """
    if api is None:
        api = Api(runtime, ApiLimits(), InferenceMetrics())
    routes = [
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/images/generations", api.image_generations, methods=["POST"]),
        Route("/v1/images/edits", api.image_edits, methods=["POST"]),
        Route("/v1/models", api.models, methods=["GET"]),
        # Model ids may contain "/" (hub names such as mlx-community/SmolLM2-135M-Instruct).
        Route("/v1/models/{model_id:path}", api.model, methods=["GET"]),
        Route("/health", api.health, methods=["GET"]),
        Route("/ready", api.ready, methods=["GET"]),
        Route("/v1/cluster/state", api.cluster_state, methods=["GET"]),
        Route("/v1/tasks/{task_id}/cancel", api.cancel_task, methods=["POST"]),
        *(extra_routes or []),
    ]
    app = Starlette(routes=routes, exception_handlers={ApiError: _api_error, HTTPException: _http_error})
    fast = FastPath(app, {("POST", "/v1/chat/completions"): api.chat_completions}, _expected_error)
    return BoundedBody(fast, api.limits, api.body_reads)
