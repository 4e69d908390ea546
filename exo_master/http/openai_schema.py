"""OpenAI-compatible request bodies, decoded with msgspec, and their translation to task params.

Unknown fields are ignored (clients send many we do not use, e.g. `user`, `store`, `metadata`).
Every field OpenAI documents as nullable accepts null here too (the SDK sends `n=None`). Fields
this server does not implement are decoded so that `openai_compat.refuse_unsupported` can answer a
400 naming them, never a silent 200. Numeric bounds live in the types, so a bad value is a 400
naming the field, and nothing that reaches the bus can fail to encode (msgpack ints are 64-bit).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from protocol.ids import ModelId
from protocol.messages import ChatMessage, ImageGenerationParams, TextGenerationParams

DEFAULT_MAX_TOKENS = 256
# OpenAI's legacy completions default to 16 tokens; kept, so old clients get what they expect.
DEFAULT_COMPLETION_MAX_TOKENS = 16
# The largest max_tokens accepted: far beyond what the small models served here can use, and small
# enough that every engine and the bus handle it. Documented in the README ("Bounds").
MAX_TOKENS_LIMIT = 32768
MAX_SEED = 2**63 - 1
MAX_STOP_SEQUENCES = 4

Seed = Annotated[int, msgspec.Meta(ge=0, le=MAX_SEED)]
MaxTokens = Annotated[int, msgspec.Meta(ge=1, le=MAX_TOKENS_LIMIT)]
OnlyOne = Annotated[int, msgspec.Meta(ge=1, le=1)]
Temperature = Annotated[float, msgspec.Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]
Penalty = Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)]
Stop = str | Annotated[list[str], msgspec.Meta(max_length=MAX_STOP_SEQUENCES)] | None


class ContentPart(msgspec.Struct, frozen=True, kw_only=True):
    type: str
    text: str = ""


class ChatMessageIn(msgspec.Struct, frozen=True, kw_only=True):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(msgspec.Struct, frozen=True, kw_only=True):
    include_usage: bool | None = None


class ResponseFormat(msgspec.Struct, frozen=True, kw_only=True):
    type: str


class SamplingFields(msgspec.Struct, frozen=True, kw_only=True):
    """Fields shared by chat and legacy completions."""

    model: Annotated[str, msgspec.Meta(min_length=1)]
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stop: Stop = None
    seed: Seed | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: OnlyOne | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, float] | None = None

    @property
    def streaming(self) -> bool:
        return bool(self.stream)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def stops(self) -> tuple[str, ...]:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return tuple(s for s in stop if s)


class ChatCompletionRequest(SamplingFields, frozen=True, kw_only=True):
    messages: Annotated[list[ChatMessageIn], msgspec.Meta(min_length=1)]
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def prompt_chars(self) -> int:
        return sum(len(m.text()) for m in self.messages)

    def to_params(self) -> TextGenerationParams:
        return TextGenerationParams(
            model=ModelId(self.model),
            messages=tuple(ChatMessage(role=m.role, content=m.text()) for m in self.messages),
            max_tokens=self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS,
            # Without one, the default is capped by what the model's context leaves (the worker).
            max_tokens_given=bool(self.max_completion_tokens or self.max_tokens),
            temperature=self.temperature,  # None: the model's default (exo_worker.sampling_defaults)
            top_p=self.top_p,
            stop=self.stops(),
            seed=self.seed,
        )


class CompletionRequest(SamplingFields, frozen=True, kw_only=True):
    """Legacy `/v1/completions`: raw prompt text, no chat template."""

    # One prompt; a batch of prompts or token ids is refused (a 400 naming `prompt`).
    prompt: str | Annotated[list[str], msgspec.Meta(min_length=1, max_length=1)]
    echo: bool | None = None
    suffix: str | None = None
    logprobs: Annotated[int, msgspec.Meta(ge=0, le=5)] | None = None
    best_of: Annotated[int, msgspec.Meta(ge=1, le=20)] | None = None

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def prompt_chars(self) -> int:
        return len(self.prompt_text())

    def to_params(self) -> TextGenerationParams:
        return TextGenerationParams(
            model=ModelId(self.model),
            messages=(),
            prompt=self.prompt_text(),
            max_tokens=self.max_tokens or DEFAULT_COMPLETION_MAX_TOKENS,
            max_tokens_given=bool(self.max_tokens),
            temperature=self.temperature,  # None: the model's default (exo_worker.sampling_defaults)
            top_p=self.top_p,
            stop=self.stops(),
            seed=self.seed,
        )


ImageSize = Annotated[str, msgspec.Meta(pattern=r"^\d{2,4}x\d{2,4}$")]


class ImageGenerationRequest(msgspec.Struct, frozen=True, kw_only=True):
    model: Annotated[str, msgspec.Meta(min_length=1)]
    prompt: Annotated[str, msgspec.Meta(min_length=1)]
    size: ImageSize | None = None
    n: OnlyOne | None = None
    seed: Seed | None = None
    response_format: Literal["b64_json"] | None = None

    def prompt_chars(self) -> int:
        return len(self.prompt)

    def to_params(self) -> ImageGenerationParams:
        return ImageGenerationParams(
            model=ModelId(self.model), prompt=self.prompt, size=self.size or "512x512", seed=self.seed
        )
