"""The JSON shapes of OpenAI replies: chat and legacy completions, whole and streamed (SSE)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from exo_master.http.errors import ApiError, error_body
from protocol.messages import FinishReason, Usage

_json = msgspec.json.Encoder()
DONE = b"data: [DONE]\n\n"


def usage_body(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def openai_finish_reason(reason: FinishReason) -> str:
    return "length" if reason is FinishReason.LENGTH else "stop"


def sse(payload: Any) -> bytes:
    return b"data: " + _json.encode(payload) + b"\n\n"


def error_event(error: ApiError) -> bytes:
    """A mid-stream failure: the headers (200) are gone, so the error travels as an event."""
    return sse(error_body(error.message, error.type, error.code, error.param))


@dataclass(frozen=True, slots=True)
class ReplyShape:
    """How one endpoint spells its replies: chat.completion or text_completion."""

    chat: bool
    task_id: str
    model: str
    created: int

    def _envelope(self, obj: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.task_id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    def whole(self, text: str, reason: FinishReason, usage: Usage) -> bytes:
        finish = openai_finish_reason(reason)
        if self.chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        return _json.encode(self._envelope(obj, [choice], usage=usage_body(usage)))

    def _chunk(self, piece: dict[str, Any], finish: str | None) -> bytes:
        if self.chat:
            choice = {"index": 0, "delta": piece, "logprobs": None, "finish_reason": finish}
            return sse(self._envelope("chat.completion.chunk", [choice]))
        choice = {"index": 0, "text": piece.get("content", ""), "logprobs": None, "finish_reason": finish}
        return sse(self._envelope("text_completion", [choice]))

    def opening(self) -> bytes | None:
        return self._chunk({"role": "assistant", "content": ""}, None) if self.chat else None

    def piece(self, text: str) -> bytes:
        return self._chunk({"content": text}, None)

    def ending(self, reason: FinishReason) -> bytes:
        return self._chunk({}, openai_finish_reason(reason))

    def usage(self, usage: Usage) -> bytes:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return sse(self._envelope(obj, [], usage=usage_body(usage)))
