"""OpenAI-compatible request bodies, decoded with msgspec, and their translation to task params.

Unknown fields are ignored (clients send many we do not use). Constraints live in the types, so a
bad value is a 400 naming the field, never a 500.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from protocol.ids import ModelId
from protocol.messages import ChatMessage, ImageGenerationParams, TextGenerationParams

DEFAULT_MAX_TOKENS = 256
MAX_STOP_SEQUENCES = 4


class TextPart(msgspec.Struct, frozen=True, kw_only=True):
    type: str
    text: str = ""


class ChatMessageIn(msgspec.Struct, frozen=True, kw_only=True):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if part.type == "text")


class StreamOptions(msgspec.Struct, frozen=True, kw_only=True):
    include_usage: bool = False


PositiveInt = Annotated[int, msgspec.Meta(ge=1)]


class ChatCompletionRequest(msgspec.Struct, frozen=True, kw_only=True):
    model: Annotated[str, msgspec.Meta(min_length=1)]
    messages: Annotated[list[ChatMessageIn], msgspec.Meta(min_length=1)]
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] | None = None
    stop: str | Annotated[list[str], msgspec.Meta(max_length=MAX_STOP_SEQUENCES)] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=1)] = 1

    def to_params(self) -> TextGenerationParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return TextGenerationParams(
            model=ModelId(self.model),
            messages=tuple(ChatMessage(role=m.role, content=m.text()) for m in self.messages),
            max_tokens=self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            stop=tuple(s for s in stop if s),
            seed=self.seed,
        )


class ImageGenerationRequest(msgspec.Struct, frozen=True, kw_only=True):
    model: Annotated[str, msgspec.Meta(min_length=1)]
    prompt: Annotated[str, msgspec.Meta(min_length=1)]
    size: Annotated[str, msgspec.Meta(pattern=r"^\d{2,4}x\d{2,4}$")] = "512x512"
    n: Annotated[int, msgspec.Meta(ge=1, le=1)] = 1
    seed: int | None = None
    response_format: Literal["b64_json"] = "b64_json"

    def to_params(self) -> ImageGenerationParams:
        return ImageGenerationParams(
            model=ModelId(self.model), prompt=self.prompt, size=self.size, n=self.n, seed=self.seed
        )
