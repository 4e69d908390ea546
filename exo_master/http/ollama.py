"""The Ollama surface on the master's port: /api/chat, /api/generate and the model listings.

Point any Ollama client at the master (`OLLAMA_HOST=http://MASTER:52415`, or
`ollama.Client(host=...)`). Streams are NDJSON and on by default, as Ollama's are; `stream: false`
gives one object. Options that map are honoured (temperature, top_p, top_k, num_predict, stop,
seed); knobs of Ollama's own runtime (num_ctx, num_gpu, num_thread, keep_alive, ...) change nothing
here and are accepted; sampling options the engines cannot apply (penalties, mirostat, min_p ...)
are a 400 naming them unless at their neutral value. Errors are Ollama's `{"error": "..."}`.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from exo_master.http.api import Api
from exo_master.http.decoding import decode_json
from exo_master.http.errors import ApiError, ErrorStyle, error_payload, model_not_found, unsupported
from exo_master.http.openai_schema import MAX_TOKENS_LIMIT, Seed, StopSequences, Temperature, TopP
from exo_master.http.routes import ApiRoute
from exo_master.http.textpath import Ending
from exo_master.http.tools import arguments_object, arguments_text, select_tools
from protocol.ids import ModelId, TaskId
from protocol.messages import ChatMessage, TextGenerationParams, ToolCall, ToolSpec

_json = msgspec.json.Encoder()
# The Ollama API version this surface follows (clients show it; none refuses to talk to it).
OLLAMA_VERSION = "0.12.0"
# num_predict absent or negative (Ollama: "until the model stops"): at most this many tokens.
DEFAULT_NUM_PREDICT = 2048
NDJSON = "application/x-ndjson"
# Sampling options the engines cannot apply, and the value at which they change nothing.
_NEUTRAL = {
    "repeat_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "min_p": 0.0,
    "typical_p": 1.0,
    "mirostat": 0,
    "tfs_z": 1.0,
}


class Options(msgspec.Struct, frozen=True, kw_only=True):
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] | None = None
    num_predict: Annotated[int, msgspec.Meta(ge=-2, le=MAX_TOKENS_LIMIT)] | None = None
    stop: StopSequences | None = None
    seed: Seed | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    min_p: float | None = None
    typical_p: float | None = None
    mirostat: int | None = None
    tfs_z: float | None = None

    def check(self) -> None:
        for name, neutral in _NEUTRAL.items():
            value = getattr(self, name)
            if value is not None and value != neutral:
                raise unsupported(f"options.{name}", f"the engines do not apply it ({neutral:g} is accepted)")

    def max_tokens(self) -> int:
        n = self.num_predict
        return DEFAULT_NUM_PREDICT if n is None or n <= 0 else n


class FunctionIn(msgspec.Struct, frozen=True, kw_only=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    arguments: dict[str, Any] | str = msgspec.field(default_factory=dict)


class ToolCallIn(msgspec.Struct, frozen=True, kw_only=True):
    id: str | None = None
    function: FunctionIn


class MessageIn(msgspec.Struct, frozen=True, kw_only=True):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None
    thinking: str | None = None

    def to_message(self) -> ChatMessage:
        if self.images:
            raise unsupported("messages", "images are not supported (text only)")
        calls = tuple(
            ToolCall(
                id=c.id or f"call_{i}", name=c.function.name, arguments=arguments_text(c.function.arguments)
            )
            for i, c in enumerate(self.tool_calls or ())
        )
        return ChatMessage(
            role=self.role, content=self.content, tool_calls=calls, tool_call_id=self.tool_call_id
        )


class FunctionDef(msgspec.Struct, frozen=True, kw_only=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolIn(msgspec.Struct, frozen=True, kw_only=True):
    type: Literal["function"] = "function"
    function: FunctionDef


class _Common(msgspec.Struct, frozen=True, kw_only=True):
    model: Annotated[str, msgspec.Meta(min_length=1)]
    stream: bool = True
    options: Options | None = None
    format: Any = None
    think: Any = None
    keep_alive: Any = None  # Ollama's model unloading; instances here are managed by the cluster

    def check(self) -> Options:
        if self.format not in (None, ""):
            raise unsupported("format", "structured output (JSON mode) is not supported")
        if self.think not in (None, False):
            raise unsupported("think", "the served models have no thinking mode (false is accepted)")
        options = self.options or Options()
        options.check()
        return options

    def params(self, messages: tuple[ChatMessage, ...], prompt: str | None = None) -> TextGenerationParams:
        options = self.check()
        return TextGenerationParams(
            model=ModelId(self.model),
            messages=messages,
            prompt=prompt,
            max_tokens=options.max_tokens(),
            temperature=options.temperature,
            top_p=options.top_p,
            top_k=options.top_k or None,
            stop=tuple(s for s in options.stop or () if s),
            seed=options.seed,
        )


class ChatRequest(_Common, frozen=True, kw_only=True):
    messages: Annotated[list[MessageIn], msgspec.Meta(min_length=1)]
    tools: list[ToolIn] | None = None

    def to_params(self) -> TextGenerationParams:
        specs = [
            ToolSpec(
                name=t.function.name,
                description=t.function.description or "",
                parameters=t.function.parameters or {},
            )
            for t in self.tools or ()
        ]
        tools, choice = select_tools(specs, "auto")
        params = self.params(tuple(m.to_message() for m in self.messages))
        return msgspec.structs.replace(params, tools=tools, tool_choice=choice)


class GenerateRequest(_Common, frozen=True, kw_only=True):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    suffix: str | None = None
    images: list[str] | None = None
    template: str | None = None
    context: list[int] | None = None

    def to_params(self) -> TextGenerationParams:
        if self.suffix:
            raise unsupported("suffix", "insertion (suffix) is not supported")
        if self.images:
            raise unsupported("images", "images are not supported (text only)")
        if self.template:
            raise unsupported("template", "the model's own chat template is used")
        if self.context:
            raise unsupported("context", "send the conversation with /api/chat instead")
        if self.raw:
            return self.params((), prompt=self.prompt)
        system = [ChatMessage(role="system", content=self.system)] if self.system else []
        return self.params((*system, ChatMessage(role="user", content=self.prompt)))


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _tool_call(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "function": {"name": call.name, "arguments": arguments_object(call.arguments)}}


@dataclass
class OllamaReply:
    """An /api/chat or /api/generate answer, whole or as NDJSON lines (a TextReply)."""

    model: str
    chat: bool
    started: float
    stream_media_type: str = NDJSON

    def _line(self, text: str, end: Ending | None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "created_at": _now()}
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if end is not None and end.tool_calls:
                message["tool_calls"] = [_tool_call(c) for c in end.tool_calls]
            body["message"] = message
        else:
            body["response"] = text
        body["done"] = end is not None
        if end is not None:
            elapsed = int((time.perf_counter() - self.started) * 1e9)
            body.update(
                done_reason="length" if end.truncated else "stop",
                total_duration=elapsed,
                load_duration=0,
                prompt_eval_count=end.usage.prompt_tokens,
                prompt_eval_duration=0,
                eval_count=end.usage.completion_tokens,
                eval_duration=elapsed,
            )
        return body

    def whole(self, text: str, end: Ending) -> bytes:
        return _json.encode(self._line(text, end))

    def opening(self) -> bytes:
        return b""

    def piece(self, text: str) -> bytes:
        return _json.encode(self._line(text, None)) + b"\n"

    def ending(self, end: Ending) -> bytes:
        return _json.encode(self._line("", end)) + b"\n"

    def failure(self, error: ApiError) -> bytes:
        return _json.encode(error_payload(error, ErrorStyle.OLLAMA)) + b"\n"


_DETAILS = {
    "parent_model": "",
    "format": "mlx",
    "family": "",
    "families": None,
    "parameter_size": "",
    "quantization_level": "",
}


class OllamaRoutes:
    def __init__(self, api: Api) -> None:
        self.api = api

    async def chat(self, request: Request) -> Response:
        body = decode_json(await request.body(), ChatRequest)
        params = body.to_params()
        self.api.check_prompt(sum(len(m.content) for m in params.messages), "messages")
        reply = OllamaReply(body.model, True, time.perf_counter())
        task_id = TaskId(f"ollama-{uuid.uuid4().hex[:24]}")
        return await self.api.text(request, task_id, params, reply, stream=body.stream)

    async def generate(self, request: Request) -> Response:
        body = decode_json(await request.body(), GenerateRequest)
        params = body.to_params()
        if not body.prompt:  # Ollama loads the model and answers at once; here it is always loaded
            served = self.api.runtime.served_models()
            if body.model not in served:
                raise model_not_found(body.model, served)
            return JSONResponse({"model": body.model, "created_at": _now(), "response": "", "done": True})
        self.api.check_prompt(len(body.prompt) + len(body.system or ""), "prompt")
        reply = OllamaReply(body.model, False, time.perf_counter())
        task_id = TaskId(f"ollama-{uuid.uuid4().hex[:24]}")
        return await self.api.text(request, task_id, params, reply, stream=body.stream)

    def _model(self, name: str) -> dict[str, Any]:
        modified = datetime.fromtimestamp(self.api.started, UTC).isoformat().replace("+00:00", "Z")
        return {
            "name": name,
            "model": name,
            "modified_at": modified,
            "size": 0,
            "digest": "",
            "details": _DETAILS,
        }

    async def tags(self, request: Request) -> Response:
        return JSONResponse({"models": [self._model(m) for m in self.api.runtime.served_models()]})

    async def ps(self, request: Request) -> Response:
        models = [
            {**self._model(m), "expires_at": "2999-01-01T00:00:00Z", "size_vram": 0}
            for m in self.api.runtime.served_models()
        ]
        return JSONResponse({"models": models})

    async def show(self, request: Request) -> Response:
        body = decode_json(await request.body(), ShowRequest)
        name = body.model or body.name or ""
        served = self.api.runtime.served_models()
        if name not in served:
            raise model_not_found(name, served)
        return JSONResponse(
            {
                "modelfile": "",
                "parameters": "",
                "template": "",
                "details": _DETAILS,
                "model_info": {},
                "capabilities": ["completion", "tools"],
                "modified_at": self._model(name)["modified_at"],
            }
        )

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": OLLAMA_VERSION})


class ShowRequest(msgspec.Struct, frozen=True, kw_only=True):
    model: str | None = None
    name: str | None = None  # older clients


def routes(api: Api) -> list[ApiRoute]:
    ollama = OllamaRoutes(api)
    style = ErrorStyle.OLLAMA
    return [
        ApiRoute("POST", "/api/chat", ollama.chat, errors=style, hot=True),
        ApiRoute("POST", "/api/generate", ollama.generate, errors=style, hot=True),
        ApiRoute("GET", "/api/tags", ollama.tags, errors=style),
        ApiRoute("GET", "/api/ps", ollama.ps, errors=style),
        ApiRoute("POST", "/api/show", ollama.show, errors=style),
        ApiRoute("GET", "/api/version", ollama.version, errors=style),
    ]
