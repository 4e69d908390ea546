"""The Anthropic Messages surface (`POST /v1/messages`): an adapter over the one request path.

In: `system`, `messages` of text, tool_use and tool_result blocks, `max_tokens` (required, as
Anthropic requires it), temperature, top_p, top_k, stop_sequences, tools and tool_choice. Out: a
`message` object, or the stream Anthropic's SDK reads (message_start, content_block_start / delta /
stop, message_delta with the stop reason and usage, message_stop), and errors in Anthropic's shape.
`stop_reason` is "max_tokens", "tool_use", "stop_sequence" (then `stop_sequence` names which of
the request's `stop_sequences` ended the answer: the worker's engine says so, and the master
reports it only if the request asked for it) or "end_turn" (the model's own end).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from exo_master.http.api import Api
from exo_master.http.decoding import decode_json
from exo_master.http.errors import ApiError, ErrorStyle, error_payload, invalid, unsupported
from exo_master.http.openai_schema import MaxTokens, Seed, StopSequences, TopP
from exo_master.http.routes import ApiRoute
from exo_master.http.textpath import Ending
from exo_master.http.tools import ChoiceMode, arguments_object, select_tools
from protocol.ids import ModelId, TaskId
from protocol.messages import ChatMessage, TextGenerationParams, ToolCall, ToolSpec

_json = msgspec.json.Encoder()
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class TextBlock(msgspec.Struct, frozen=True, kw_only=True, tag="text", tag_field="type"):
    text: str


class ToolUseBlock(msgspec.Struct, frozen=True, kw_only=True, tag="tool_use", tag_field="type"):
    id: Annotated[str, msgspec.Meta(max_length=256)]
    name: Name
    input: dict[str, Any] = msgspec.field(default_factory=dict)


class ToolResultBlock(msgspec.Struct, frozen=True, kw_only=True, tag="tool_result", tag_field="type"):
    tool_use_id: Annotated[str, msgspec.Meta(max_length=256)]
    content: str | list[TextBlock] = ""
    is_error: bool | None = None

    def text(self) -> str:
        body = self.content if isinstance(self.content, str) else "".join(b.text for b in self.content)
        return f"Error: {body}" if self.is_error else body


Block = TextBlock | ToolUseBlock | ToolResultBlock


class MessageIn(msgspec.Struct, frozen=True, kw_only=True):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class ToolIn(msgspec.Struct, frozen=True, kw_only=True):
    name: Name
    description: str | None = None
    input_schema: dict[str, Any] = msgspec.field(default_factory=dict)
    type: str | None = None  # "custom" or absent; server tools (web search...) are refused


class ToolChoiceIn(msgspec.Struct, frozen=True, kw_only=True):
    type: Literal["auto", "any", "tool", "none"]
    name: Name | None = None
    disable_parallel_tool_use: bool | None = None


class ThinkingIn(msgspec.Struct, frozen=True, kw_only=True):
    type: str


class MessagesRequest(msgspec.Struct, frozen=True, kw_only=True):
    model: Annotated[str, msgspec.Meta(min_length=1)]
    max_tokens: MaxTokens
    messages: Annotated[list[MessageIn], msgspec.Meta(min_length=1)]
    system: str | list[TextBlock] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None
    top_p: TopP | None = None
    top_k: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] | None = None
    stop_sequences: StopSequences | None = None
    stream: bool | None = None
    tools: list[ToolIn] | None = None
    tool_choice: ToolChoiceIn | None = None
    thinking: ThinkingIn | None = None
    # Accepted as harmless: they concern Anthropic's service, not the answer.
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    seed: Seed | None = None  # not Anthropic's, but harmless to honour

    def prompt_chars(self) -> int:
        return sum(len(m.content) for m in self.chat())

    def chat(self) -> list[ChatMessage]:
        out: list[ChatMessage] = []
        if self.system:
            system = self.system if isinstance(self.system, str) else "".join(b.text for b in self.system)
            out.append(ChatMessage(role="system", content=system))
        for message in self.messages:
            blocks = (
                [TextBlock(text=message.content)] if isinstance(message.content, str) else message.content
            )
            # Tool results first: Anthropic puts them at the start of the user turn that answers.
            out += [
                ChatMessage(role="tool", content=b.text(), tool_call_id=b.tool_use_id)
                for b in blocks
                if isinstance(b, ToolResultBlock)
            ]
            text = "".join(b.text for b in blocks if isinstance(b, TextBlock))
            calls = tuple(
                ToolCall(id=b.id, name=b.name, arguments=json.dumps(b.input))
                for b in blocks
                if isinstance(b, ToolUseBlock)
            )
            if text or calls or not any(isinstance(b, ToolResultBlock) for b in blocks):
                out.append(ChatMessage(role=message.role, content=text, tool_calls=calls))
        return out

    def to_params(self) -> TextGenerationParams:
        if self.thinking is not None and self.thinking.type != "disabled":
            raise unsupported(
                "thinking", 'the served models have no thinking budget ("disabled" is accepted)'
            )
        if any(t.type not in (None, "custom") for t in self.tools or ()):
            raise unsupported("tools", "only custom tools (name, description, input_schema) are supported")
        specs = [
            ToolSpec(name=t.name, description=t.description or "", parameters=t.input_schema)
            for t in self.tools or ()
        ]
        choice = self.tool_choice
        modes: dict[str, ChoiceMode] = {"auto": "auto", "any": "required", "tool": "required", "none": "none"}
        mode = modes[choice.type] if choice is not None else "auto"
        named = choice.name if choice is not None and choice.type == "tool" else None
        if choice is not None and choice.type == "tool" and named is None:
            raise invalid("tool_choice of type 'tool' needs a name", "tool_choice")
        tools, tool_choice = select_tools(specs, mode, named)
        return TextGenerationParams(
            model=ModelId(self.model),
            messages=tuple(self.chat()),
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            stop=tuple(s for s in self.stop_sequences or () if s),
            seed=self.seed,
            tools=tools,
            tool_choice=tool_choice,
        )


def stop_reason(end: Ending) -> str:
    if end.truncated:
        return "max_tokens"
    if end.tool_calls:  # the client must run them, whatever ended the text after them
        return "tool_use"
    return "stop_sequence" if end.stop_sequence is not None else "end_turn"


def stop_fields(end: Ending) -> dict[str, str | None]:
    """`stop_reason` and `stop_sequence`, as both the `message` and its `message_delta` carry them."""
    reason = stop_reason(end)
    return {"stop_reason": reason, "stop_sequence": end.stop_sequence if reason == "stop_sequence" else None}


def _event(name: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + _json.encode({"type": name, **payload}) + b"\n\n"


def _tool_use(call: ToolCall) -> dict[str, Any]:
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": arguments_object(call.arguments)}


@dataclass
class MessagesReply:
    """A `message` object, or its event stream (a TextReply)."""

    message_id: str
    model: str
    prompt_tokens_hint: int = 0
    one_tool: bool = False
    stream_media_type: str = "text/event-stream"
    _sent: int = field(default=0)

    def _calls(self, end: Ending) -> tuple[ToolCall, ...]:
        return end.tool_calls[:1] if self.one_tool else end.tool_calls

    def _message(
        self, content: list[dict[str, Any]], end: Ending | None, usage: tuple[int, int]
    ) -> dict[str, Any]:
        stop = stop_fields(end) if end is not None else {"stop_reason": None, "stop_sequence": None}
        return {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            **stop,
            "usage": {"input_tokens": usage[0], "output_tokens": usage[1]},
        }

    def whole(self, text: str, end: Ending) -> bytes:
        content = [{"type": "text", "text": text}] if text else []
        content += [_tool_use(c) for c in self._calls(end)]
        usage = (end.usage.prompt_tokens, end.usage.completion_tokens)
        return _json.encode(self._message(content, end, usage))

    def opening(self) -> bytes:
        start = _event("message_start", {"message": self._message([], None, (self.prompt_tokens_hint, 0))})
        block = _event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
        return start + block + _event("ping", {})

    def piece(self, text: str) -> bytes:
        return _event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": text}})

    def ending(self, end: Ending) -> bytes:
        out = _event("content_block_stop", {"index": 0})
        for index, call in enumerate(self._calls(end), start=1):
            block = {"type": "tool_use", "id": call.id, "name": call.name, "input": {}}
            out += _event("content_block_start", {"index": index, "content_block": block})
            json_delta = {"type": "input_json_delta", "partial_json": call.arguments}
            out += _event("content_block_delta", {"index": index, "delta": json_delta})
            out += _event("content_block_stop", {"index": index})
        delta = stop_fields(end)
        usage = {"input_tokens": end.usage.prompt_tokens, "output_tokens": end.usage.completion_tokens}
        out += _event("message_delta", {"delta": delta, "usage": usage})
        return out + _event("message_stop", {})

    def failure(self, error: ApiError) -> bytes:
        payload = error_payload(error, ErrorStyle.ANTHROPIC)
        return b"event: error\ndata: " + _json.encode(payload) + b"\n\n"


class AnthropicRoutes:
    def __init__(self, api: Api) -> None:
        self.api = api

    async def messages(self, request: Request) -> Response:
        body = decode_json(await request.body(), MessagesRequest)
        self.api.check_prompt(body.prompt_chars(), "messages")
        params = body.to_params()
        message_id = f"msg_{uuid.uuid4().hex[:24]}"
        one_tool = bool(body.tool_choice and body.tool_choice.disable_parallel_tool_use)
        reply = MessagesReply(message_id, body.model, one_tool=one_tool)
        return await self.api.text(request, TaskId(message_id), params, reply, stream=bool(body.stream))


def routes(api: Api) -> list[ApiRoute]:
    anthropic = AnthropicRoutes(api)
    return [ApiRoute("POST", "/v1/messages", anthropic.messages, errors=ErrorStyle.ANTHROPIC, hot=True)]
