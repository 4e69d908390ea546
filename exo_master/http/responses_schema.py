"""OpenAI Responses request bodies (`POST /v1/responses`), decoded with msgspec, into ChatMessages.

`input` is a string or a list of items: messages (text parts only), `function_call` items (a call
the model made, sent back) and `function_call_output` items (the tool's result). Fields that only
concern OpenAI's service are accepted; fields that would change the answer in a way the engines
cannot deliver are a 400 naming them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from exo_master.http.errors import invalid, unsupported
from exo_master.http.openai_schema import DEFAULT_MAX_TOKENS, MaxTokens, Temperature, TopP
from exo_master.http.tools import ChoiceMode, select_tools
from protocol.ids import ModelId
from protocol.messages import ChatMessage, TextGenerationParams, ToolCall, ToolSpec

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
_TEXT_PARTS = frozenset({"input_text", "output_text", "text"})


class Part(msgspec.Struct, frozen=True, kw_only=True):
    type: str
    text: str = ""


class MessageItem(msgspec.Struct, frozen=True, kw_only=True):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[Part]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        if any(p.type not in _TEXT_PARTS for p in self.content):
            raise unsupported("input", "only text content is supported (no images or files)")
        return "".join(p.text for p in self.content)


class FunctionCallItem(msgspec.Struct, frozen=True, kw_only=True):
    type: Literal["function_call"]
    call_id: Annotated[str, msgspec.Meta(max_length=256)]
    name: Name
    arguments: str = "{}"


class FunctionCallOutputItem(msgspec.Struct, frozen=True, kw_only=True):
    type: Literal["function_call_output"]
    call_id: Annotated[str, msgspec.Meta(max_length=256)]
    output: str | list[Part]

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text for p in self.output)


_ITEMS: dict[str, type[MessageItem | FunctionCallItem | FunctionCallOutputItem]] = {
    "message": MessageItem,
    "function_call": FunctionCallItem,
    "function_call_output": FunctionCallOutputItem,
}


def input_messages(items: str | list[dict[str, Any]]) -> list[ChatMessage]:
    if isinstance(items, str):
        return [ChatMessage(role="user", content=items)]
    out: list[ChatMessage] = []
    for raw in items:
        kind = raw.get("type", "message")
        item_type = _ITEMS.get(kind) if isinstance(kind, str) else None
        if item_type is None:
            raise unsupported("input", f"input items of type {kind!r} are not supported")
        try:
            item = msgspec.convert(raw, type=item_type)
        except msgspec.ValidationError as exc:
            raise invalid(f"invalid input item: {exc}", "input") from exc
        if isinstance(item, MessageItem):
            out.append(ChatMessage(role=item.role, content=item.text()))
        elif isinstance(item, FunctionCallOutputItem):
            out.append(ChatMessage(role="tool", content=item.text(), tool_call_id=item.call_id))
        else:
            call = ToolCall(id=item.call_id, name=item.name, arguments=item.arguments)
            if out and out[-1].role == "assistant":  # several calls of one turn: one message
                last = out[-1]
                out[-1] = msgspec.structs.replace(last, tool_calls=(*last.tool_calls, call))
            else:
                out.append(ChatMessage(role="assistant", content="", tool_calls=(call,)))
    return out


class FunctionTool(msgspec.Struct, frozen=True, kw_only=True):
    type: str
    name: Name | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedChoice(msgspec.Struct, frozen=True, kw_only=True):
    type: Literal["function"]
    name: Name


class TextFormat(msgspec.Struct, frozen=True, kw_only=True):
    type: str


class TextOptions(msgspec.Struct, frozen=True, kw_only=True):
    format: TextFormat | None = None
    verbosity: str | None = None


class Reasoning(msgspec.Struct, frozen=True, kw_only=True):
    effort: str | None = None
    summary: str | None = None


class ResponsesRequest(msgspec.Struct, frozen=True, kw_only=True):
    model: Annotated[str, msgspec.Meta(min_length=1)]
    input: str | Annotated[list[dict[str, Any]], msgspec.Meta(min_length=1)]
    instructions: str | None = None
    max_output_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stream: bool | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedChoice | None = None
    parallel_tool_calls: bool | None = None
    max_tool_calls: Annotated[int, msgspec.Meta(ge=1)] | None = None
    previous_response_id: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    store: bool | None = None
    text: TextOptions | None = None
    reasoning: Reasoning | None = None
    background: bool | None = None
    conversation: Any = None
    prompt: Any = None
    top_logprobs: int | None = None
    # Accepted as harmless: metadata, user, safety_identifier, prompt_cache_*, service_tier,
    # include, truncation, stream_options (not declared: msgspec ignores them).

    def refuse_unsupported(self) -> None:
        if self.reasoning is not None and self.reasoning.effort is not None:
            raise unsupported("reasoning", "the served models have no reasoning-effort setting")
        if self.text is not None and self.text.format is not None and self.text.format.type != "text":
            raise unsupported("text", 'only the "text" format is supported')
        if self.text is not None and self.text.verbosity not in (None, "medium"):
            raise unsupported("text", "answer length is set with max_output_tokens here")
        if self.background:
            raise unsupported("background", "responses run in the foreground here (false is accepted)")
        if self.conversation is not None:
            raise unsupported("conversation", "use previous_response_id to continue a conversation")
        if self.prompt is not None:
            raise unsupported("prompt", "stored prompt templates are not supported")
        if self.top_logprobs:
            raise unsupported("top_logprobs", "log probabilities are not returned (0 is accepted)")
        for tool in self.tools or ():
            if tool.type != "function" or tool.name is None:
                raise unsupported("tools", f"only function tools are supported, not {tool.type!r}")

    def tool_specs(self) -> list[ToolSpec]:
        return [
            ToolSpec(name=t.name or "", description=t.description or "", parameters=t.parameters or {})
            for t in self.tools or ()
        ]

    def to_params(self, history: tuple[ChatMessage, ...], current: list[ChatMessage]) -> TextGenerationParams:
        choice = self.tool_choice
        mode: ChoiceMode = choice if isinstance(choice, str) else "auto"
        named = choice.name if isinstance(choice, NamedChoice) else None
        tools, tool_choice = select_tools(self.tool_specs(), mode, named)
        system = [ChatMessage(role="system", content=self.instructions)] if self.instructions else []
        return TextGenerationParams(
            model=ModelId(self.model),
            messages=(*system, *history, *current),
            max_tokens=self.max_output_tokens or DEFAULT_MAX_TOKENS,
            temperature=self.temperature,
            top_p=self.top_p,
            tools=tools,
            tool_choice=tool_choice,
        )
