"""OpenAI-compatible request bodies, decoded with msgspec, and their translation to task params.

Every field of the SDK's chat request is declared here and decided in openai_compat (honoured,
accepted as harmless, or a 400 naming it); a test enumerates the installed SDK's keys against that
table. Every field OpenAI documents as nullable accepts null here too (the SDK sends `n=None`).
Numeric bounds live in the types, so a bad value is a 400 naming the field, and nothing that
reaches the bus can fail to encode (msgpack ints are 64-bit).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from exo_master.http.tools import ChoiceMode, arguments_text, select_tools
from protocol.ids import ModelId
from protocol.messages import (
    MAX_STOPS,
    ChatMessage,
    ImageGenerationParams,
    StopString,
    TextGenerationParams,
    ToolCall,
    ToolSpec,
)

DEFAULT_MAX_TOKENS = 256
# OpenAI's legacy completions default to 16 tokens; kept, so old clients get what they expect.
DEFAULT_COMPLETION_MAX_TOKENS = 16
# The largest max_tokens accepted: far beyond what the small models served here can use, and small
# enough that every engine and the bus handle it. Documented in the README ("Bounds").
MAX_TOKENS_LIMIT = 32768
MAX_SEED = 2**63 - 1
MAX_STOP_SEQUENCES = 4  # OpenAI's; each string at most MAX_STOP_CHARS (the protocol's bound)
assert MAX_STOP_SEQUENCES <= MAX_STOPS

Seed = Annotated[int, msgspec.Meta(ge=0, le=MAX_SEED)]
MaxTokens = Annotated[int, msgspec.Meta(ge=1, le=MAX_TOKENS_LIMIT)]
OnlyOne = Annotated[int, msgspec.Meta(ge=1, le=1)]
Temperature = Annotated[float, msgspec.Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]
Penalty = Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)]
StopSequences = Annotated[list[StopString], msgspec.Meta(max_length=MAX_STOP_SEQUENCES)]
Stop = StopString | StopSequences | None


class ContentPart(msgspec.Struct, frozen=True, kw_only=True):
    type: str
    text: str = ""


ToolName = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class FunctionCallIn(msgspec.Struct, frozen=True, kw_only=True):
    name: ToolName
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(msgspec.Struct, frozen=True, kw_only=True):
    id: Annotated[str, msgspec.Meta(max_length=256)] = ""
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessageIn(msgspec.Struct, frozen=True, kw_only=True):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def to_message(self) -> ChatMessage:
        calls = tuple(
            ToolCall(id=c.id, name=c.function.name, arguments=arguments_text(c.function.arguments))
            for c in self.tool_calls or ()
        )
        return ChatMessage(
            role=self.role, content=self.text(), tool_calls=calls, tool_call_id=self.tool_call_id
        )


class FunctionDef(msgspec.Struct, frozen=True, kw_only=True):
    name: ToolName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(msgspec.Struct, frozen=True, kw_only=True):
    type: Literal["function"]
    function: FunctionDef

    def spec(self) -> ToolSpec:
        f = self.function
        return ToolSpec(name=f.name, description=f.description or "", parameters=f.parameters or {})


class NamedFunction(msgspec.Struct, frozen=True, kw_only=True):
    name: ToolName


class NamedToolChoice(msgspec.Struct, frozen=True, kw_only=True):
    type: Literal["function"]
    function: NamedFunction


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
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # Decided in openai_compat: refused unless absent or harmless.
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    service_tier: str | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    moderation: Any = None

    def prompt_chars(self) -> int:
        return sum(
            len(m.text()) + sum(len(c.function.name) for c in m.tool_calls or ()) for m in self.messages
        )

    def to_params(self) -> TextGenerationParams:
        choice = self.tool_choice
        mode: ChoiceMode = choice if isinstance(choice, str) else "auto"
        named = choice.function.name if isinstance(choice, NamedToolChoice) else None
        tools, tool_choice = select_tools([t.spec() for t in self.tools or ()], mode, named)
        return TextGenerationParams(
            model=ModelId(self.model),
            messages=tuple(m.to_message() for m in self.messages),
            max_tokens=self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS,
            # Without one, the default is capped by what the model's context leaves (the worker).
            max_tokens_given=bool(self.max_completion_tokens or self.max_tokens),
            temperature=self.temperature,  # None: the model's default (exo_worker.sampling_defaults)
            top_p=self.top_p,
            stop=self.stops(),
            seed=self.seed,
            tools=tools,
            tool_choice=tool_choice,
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
