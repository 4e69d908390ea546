"""The OpenAI surface: chat and legacy completions, images, models; an adapter over Api."""

from __future__ import annotations

import dataclasses
import time
import uuid

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from exo_master.http.api import Api, client_gone
from exo_master.http.decoding import decode_json
from exo_master.http.errors import model_not_found
from exo_master.http.image_edits import read_image_edits
from exo_master.http.openai_compat import (
    refuse_empty_prompt,
    refuse_unsupported_chat,
    refuse_unsupported_completion,
)
from exo_master.http.openai_format import ReplyShape
from exo_master.http.openai_schema import ChatCompletionRequest, CompletionRequest, ImageGenerationRequest
from exo_master.http.routes import ApiRoute
from exo_master.http.textpath import Ending
from protocol.ids import TaskId
from protocol.messages import TaskParams


@dataclasses.dataclass(frozen=True, slots=True)
class _OneToolCall(ReplyShape):
    """`parallel_tool_calls: false`: at most one tool call in the answer."""

    def whole(self, text: str, end: Ending) -> bytes:
        return ReplyShape.whole(self, text, dataclasses.replace(end, tool_calls=end.tool_calls[:1]))

    def ending(self, end: Ending) -> bytes:
        return ReplyShape.ending(self, dataclasses.replace(end, tool_calls=end.tool_calls[:1]))


class OpenAiRoutes:
    def __init__(self, api: Api) -> None:
        self.api = api

    async def chat_completions(self, request: Request) -> Response:
        body = decode_json(await request.body(), ChatCompletionRequest)
        refuse_unsupported_chat(body)
        self.api.check_prompt(body.prompt_chars(), "messages")
        params = body.to_params()
        task_id = TaskId(f"chatcmpl-{uuid.uuid4().hex[:24]}")
        shape_type = _OneToolCall if body.parallel_tool_calls is False else ReplyShape
        shape = shape_type(True, task_id, body.model, int(time.time()), body.include_usage)
        return await self.api.text(request, task_id, params, shape, stream=body.streaming)

    async def completions(self, request: Request) -> Response:
        body = decode_json(await request.body(), CompletionRequest)
        refuse_unsupported_completion(body)
        refuse_empty_prompt(body.prompt_text(), "prompt")
        self.api.check_prompt(body.prompt_chars(), "prompt")
        task_id = TaskId(f"cmpl-{uuid.uuid4().hex[:24]}")
        shape = ReplyShape(False, task_id, body.model, int(time.time()), body.include_usage)
        return await self.api.text(request, task_id, body.to_params(), shape, stream=body.streaming)

    # ---- images ------------------------------------------------------------------------------------

    async def image_generations(self, request: Request) -> Response:
        body = decode_json(await request.body(), ImageGenerationRequest)
        self.api.check_prompt(body.prompt_chars(), "prompt")
        task_id = TaskId(f"img-{uuid.uuid4().hex[:24]}")
        return await self._image(request, task_id, body.to_params(), body.model)

    async def image_edits(self, request: Request) -> Response:
        form, params = await read_image_edits(request)
        self.api.check_prompt(len(form.prompt), "prompt")
        task_id = TaskId(f"imgedit-{uuid.uuid4().hex[:24]}")
        return await self._image(request, task_id, params, form.model)

    async def _image(self, request: Request, task_id: TaskId, params: TaskParams, model: str) -> Response:
        done = await self.api.whole(request, task_id, params, model)
        if done is None:
            return client_gone()
        relay, image_b64, _ = done
        payload = {"created": int(time.time()), "data": [{"b64_json": image_b64}]}
        return JSONResponse(payload, headers=relay.headers())

    # ---- models ------------------------------------------------------------------------------------

    def _model_object(self, model: str) -> dict[str, object]:
        return {"id": model, "object": "model", "created": int(self.api.started), "owned_by": "exo"}

    async def models(self, request: Request) -> Response:
        data = [self._model_object(m) for m in self.api.runtime.served_models()]
        return JSONResponse({"object": "list", "data": data})

    async def model(self, request: Request) -> Response:
        model = request.path_params["model_id"]
        served = self.api.runtime.served_models()
        if model not in served:
            raise model_not_found(model, served)
        return JSONResponse(self._model_object(model))


def routes(api: Api) -> list[ApiRoute]:
    openai = OpenAiRoutes(api)
    return [
        ApiRoute("POST", "/v1/chat/completions", openai.chat_completions, hot=True),
        ApiRoute("POST", "/v1/completions", openai.completions, hot=True),
        ApiRoute("POST", "/v1/images/generations", openai.image_generations),
        ApiRoute("POST", "/v1/images/edits", openai.image_edits),
        ApiRoute("GET", "/v1/models", openai.models),
        # Model ids may contain "/" (hub names such as mlx-community/SmolLM2-135M-Instruct).
        ApiRoute("GET", "/v1/models/{model_id:path}", openai.model),
    ]
