"""The JSON shapes of OpenAI replies: chat and legacy completions, whole and streamed (SSE)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from exo_master.http.errors import ApiError, ErrorStyle, error_payload
from exo_master.http.textpath import Ending
from protocol.messages import ToolCall, Usage

_json = msgspec.json.Encoder()
DONE = b"data: [DONE]\n\n"
SSE = "text/event-stream"


def usage_body(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def openai_finish_reason(end: Ending) -> str:
    if end.truncated:
        return "length"
    return "tool_calls" if end.tool_calls else "stop"


def tool_call_body(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def sse(payload: Any) -> bytes:
    return b"data: " + _json.encode(payload) + b"\n\n"


def error_event(error: ApiError) -> bytes:
    """A mid-stream failure: the headers (200) are gone, so the error travels as an event."""
    return sse(error_payload(error, ErrorStyle.OPENAI))


@dataclass(frozen=True, slots=True)
class ReplyShape:
    """How one endpoint spells its replies: chat.completion or text_completion (a TextReply)."""

    chat: bool
    task_id: str
    model: str
    created: int
    include_usage: bool = False
    stream_media_type: str = SSE

    def _envelope(self, obj: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.task_id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    def whole(self, text: str, end: Ending) -> bytes:
        finish = openai_finish_reason(end)
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if end.tool_calls:
                message["content"] = text or None
                message["tool_calls"] = [tool_call_body(c) for c in end.tool_calls]
            choice: dict[str, Any] = {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": finish,
            }
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        return _json.encode(self._envelope(obj, [choice], usage=usage_body(end.usage)))

    def _chunk(self, piece: dict[str, Any], finish: str | None) -> bytes:
        if self.chat:
            choice = {"index": 0, "delta": piece, "logprobs": None, "finish_reason": finish}
            return sse(self._envelope("chat.completion.chunk", [choice]))
        choice = {"index": 0, "text": piece.get("content", ""), "logprobs": None, "finish_reason": finish}
        return sse(self._envelope("text_completion", [choice]))

    def opening(self) -> bytes:
        return self._chunk({"role": "assistant", "content": ""}, None) if self.chat else b""

    def piece(self, text: str) -> bytes:
        return self._chunk({"content": text}, None)

    def ending(self, end: Ending) -> bytes:
        out = b""
        if self.chat and end.tool_calls:
            calls = [{"index": i, **tool_call_body(c)} for i, c in enumerate(end.tool_calls)]
            out += self._chunk({"tool_calls": calls}, None)
        out += self._chunk({}, openai_finish_reason(end))
        if self.include_usage:
            obj = "chat.completion.chunk" if self.chat else "text_completion"
            out += sse(self._envelope(obj, [], usage=usage_body(end.usage)))
        return out + DONE

    def failure(self, error: ApiError) -> bytes:
        return error_event(error) + DONE
