"""The OpenAI-compatible HTTP API (Starlette), a thin shell over MasterRuntime.

Every completion waits until the core has placed its task, so the response headers can name the
instance (`x-exo-task`, `x-exo-instance`, `x-exo-node`); a request queued behind busy instances
simply waits there. A client that goes away, at any point, cancels its task and frees its slot.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

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
from exo_master.core.lifecycle import TaskStatus
from exo_master.openai_schema import ChatCompletionRequest, ImageGenerationRequest
from exo_master.runtime import MasterRuntime, TaskWaiter
from protocol.ids import TaskId
from protocol.messages import FinishReason, InstanceStatus, Usage

T = TypeVar("T")
_json = msgspec.json.Encoder()


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, type_: str, code: str | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def response(self) -> JSONResponse:
        return JSONResponse(
            error_body(self.message, self.type, self.code, self.param), status_code=self.status
        )


class ClientGone(Exception):
    """The HTTP client disconnected."""


def client_gone() -> Response:
    # Nobody reads it; nginx's "client closed request" keeps access logs honest.
    return Response(status_code=499)


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


_REJECTIONS: dict[RejectReason, tuple[int, str]] = {
    RejectReason.UNKNOWN_MODEL: (404, "invalid_request_error"),
    RejectReason.UNSUPPORTED_KIND: (400, "invalid_request_error"),
    RejectReason.NO_LIVE_INSTANCE: (503, "service_unavailable"),
    RejectReason.QUEUE_FULL: (429, "rate_limit_error"),
    RejectReason.DUPLICATE_TASK: (409, "invalid_request_error"),
}


def rejection_error(rejected: TaskRejected) -> ApiError:
    status, type_ = _REJECTIONS[rejected.reason]
    param = "model" if rejected.reason is RejectReason.UNKNOWN_MODEL else None
    return ApiError(status, rejected.message, type_, code=str(rejected.reason), param=param)


def task_error(errored: TaskErrored) -> ApiError:
    if errored.cancelled:
        return ApiError(
            409, f"the task was cancelled: {errored.message}", "invalid_request_error", code="cancelled"
        )
    if errored.unavailable:
        return ApiError(503, errored.message, "service_unavailable", code="instance_lost")
    return ApiError(500, errored.message, "server_error", code="worker_failed")


async def decode_body(request: Request, body_type: type[T]) -> T:
    raw = await request.body()
    try:
        return msgspec.json.decode(raw, type=body_type)
    except msgspec.ValidationError as exc:
        text = str(exc)
        param = text.rsplit("at `$.", 1)[1].rstrip("`").split("[")[0] if "at `$." in text else None
        raise ApiError(
            400, f"invalid request: {text}", "invalid_request_error", "invalid_value", param
        ) from exc
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"malformed JSON body: {exc}", "invalid_request_error", "invalid_json") from exc


async def watch_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def next_or_gone(waiter: TaskWaiter, gone: asyncio.Task[None]) -> ClientEffect:
    return await first_of(waiter.next(), gone)


async def first_of(awaitable: Awaitable[T], gone: asyncio.Task[None]) -> T:
    future = asyncio.ensure_future(awaitable)
    await asyncio.wait({future, gone}, return_when=asyncio.FIRST_COMPLETED)
    if future.done():
        return future.result()
    future.cancel()
    raise ClientGone


async def wait_until_placed(waiter: TaskWaiter, gone: asyncio.Task[None]) -> TaskPlaced:
    while True:
        effect = await next_or_gone(waiter, gone)
        match effect:
            case TaskPlaced():
                return effect
            case TaskQueued():
                continue
            case TaskRejected():
                raise rejection_error(effect)
            case TaskErrored():
                raise task_error(effect)
            case _:
                raise AssertionError(f"{type(effect).__name__} before the task was placed")


def exo_headers(placed: TaskPlaced) -> dict[str, str]:
    return {"x-exo-task": placed.task_id, "x-exo-instance": placed.instance_id, "x-exo-node": placed.node_id}


def usage_body(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def openai_finish_reason(reason: FinishReason) -> str:
    return "length" if reason is FinishReason.LENGTH else "stop"


class Api:
    def __init__(self, runtime: MasterRuntime) -> None:
        self.runtime = runtime
        self.started = time.time()

    async def start_task(
        self, request: Request, task_id: TaskId, params: Any
    ) -> tuple[TaskWaiter, TaskPlaced, asyncio.Task[None]]:
        gone = asyncio.create_task(watch_disconnect(request))
        waiter = self.runtime.submit(task_id, params)
        try:
            placed = await wait_until_placed(waiter, gone)
        except BaseException:
            gone.cancel()
            self.runtime.release(waiter)
            raise
        return waiter, placed, gone

    async def collect(self, waiter: TaskWaiter, gone: asyncio.Task[None]) -> tuple[str, TaskCompleted]:
        """Gather a placed task's output until it ends; the task is handed back either way."""
        try:
            texts: list[str] = []
            while True:
                effect = await next_or_gone(waiter, gone)
                if isinstance(effect, TaskOutput):
                    texts.append(effect.text)
                elif isinstance(effect, TaskCompleted):
                    return "".join(texts), effect
                elif isinstance(effect, TaskErrored):
                    raise task_error(effect)
        finally:
            gone.cancel()
            self.runtime.release(waiter)

    async def chat_completions(self, request: Request) -> Response:
        body = await decode_body(request, ChatCompletionRequest)
        params = body.to_params()
        task_id = TaskId(f"chatcmpl-{uuid.uuid4().hex[:24]}")
        try:
            waiter, placed, gone = await self.start_task(request, task_id, params)
        except ClientGone:
            return client_gone()
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = self._stream_chat(waiter, gone, body.model, created, include_usage)
            return StreamingResponse(stream, media_type="text/event-stream", headers=exo_headers(placed))
        try:
            text, effect = await self.collect(waiter, gone)
        except ClientGone:
            return client_gone()
        payload = {
            "id": task_id,
            "object": "chat.completion",
            "created": created,
            "model": body.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": openai_finish_reason(effect.finish_reason),
                }
            ],
            "usage": usage_body(effect.usage),
        }
        return Response(_json.encode(payload), media_type="application/json", headers=exo_headers(placed))

    async def _stream_chat(
        self, waiter: TaskWaiter, gone: asyncio.Task[None], model: str, created: int, include_usage: bool
    ) -> AsyncIterator[bytes]:
        def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            chunk = {
                "id": waiter.task_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": choices,
                **extra,
            }
            return b"data: " + _json.encode(chunk) + b"\n\n"

        try:
            yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            while True:
                effect = await next_or_gone(waiter, gone)
                if isinstance(effect, TaskOutput):
                    yield event([{"index": 0, "delta": {"content": effect.text}, "finish_reason": None}])
                elif isinstance(effect, TaskCompleted):
                    reason = openai_finish_reason(effect.finish_reason)
                    yield event([{"index": 0, "delta": {}, "finish_reason": reason}])
                    if include_usage:
                        yield event([], usage=usage_body(effect.usage))
                    break
                elif isinstance(effect, TaskErrored):
                    error = task_error(effect)
                    yield (
                        b"data: " + _json.encode(error_body(error.message, error.type, error.code)) + b"\n\n"
                    )
                    break
            yield b"data: [DONE]\n\n"
        except ClientGone:
            return
        finally:
            gone.cancel()
            self.runtime.release(waiter)

    async def image_generations(self, request: Request) -> Response:
        body = await decode_body(request, ImageGenerationRequest)
        task_id = TaskId(f"img-{uuid.uuid4().hex[:24]}")
        try:
            waiter, placed, gone = await self.start_task(request, task_id, body.to_params())
        except ClientGone:
            return client_gone()
        try:
            image_b64, _ = await self.collect(waiter, gone)
        except ClientGone:
            return client_gone()
        payload = {"created": int(time.time()), "data": [{"b64_json": image_b64}]}
        return Response(_json.encode(payload), media_type="application/json", headers=exo_headers(placed))

    async def models(self, request: Request) -> Response:
        view = self.runtime.core.view(self.runtime.clock(), task_limit=0)
        live = {
            row.model
            for row in view.instances
            if row.status in (InstanceStatus.READY, InstanceStatus.LOADING)
        }
        data = [
            {"id": m, "object": "model", "created": int(self.started), "owned_by": "exo"}
            for m in sorted(live)
        ]
        return JSONResponse({"object": "list", "data": data})

    async def health(self, request: Request) -> Response:
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

    async def cluster_state(self, request: Request) -> Response:
        try:
            limit = int(request.query_params.get("tasks", "500"))
        except ValueError as exc:
            raise ApiError(
                400, "query parameter 'tasks' must be an integer", "invalid_request_error", param="tasks"
            ) from exc
        raw_status = request.query_params.get("status")
        try:
            status = TaskStatus(raw_status) if raw_status is not None else None
        except ValueError as exc:
            raise ApiError(
                400,
                f"query parameter 'status' must be one of {', '.join(TaskStatus)}",
                "invalid_request_error",
                param="status",
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


def build_app(runtime: MasterRuntime, extra_routes: list[Route] | None = None) -> Starlette:
    api = Api(runtime)
    routes = [
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route("/v1/images/generations", api.image_generations, methods=["POST"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/health", api.health, methods=["GET"]),
        Route("/v1/cluster/state", api.cluster_state, methods=["GET"]),
        Route("/v1/tasks/{task_id}/cancel", api.cancel_task, methods=["POST"]),
        *(extra_routes or []),
    ]
    return Starlette(
        routes=routes,
        exception_handlers={ApiError: _api_error, HTTPException: _http_error},
    )
