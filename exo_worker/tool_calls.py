"""Tool calls on the worker: tools into the chat template, tool calls out of the model's text.

Each model family writes its tool calls its own way (`<tool_call>{json}</tool_call>` for Qwen and
Hermes, `[TOOL_CALLS]` for Mistral, ...); mlx-lm ships a parser per family (`mlx_lm.tool_parsers`)
and its tokenizer wrapper picks the one that matches the chat template. `ToolCallStream` sits between
an engine and its text sink: text outside the markers passes through as it streams (a possible
start of a marker is held back), text between them is parsed into ToolCall values when the call
ends. A call that cannot be parsed is passed through as text: the client sees what the model wrote.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from exo_worker.engine import EngineError, RunOutcome, TextSink
from protocol.messages import (
    MAX_TEXT_CHARS,
    MAX_TOOL_CALLS,
    ChatMessage,
    TaskParams,
    TextGenerationParams,
    ToolCall,
    ToolSpec,
)

Parser = Callable[[str, Any], Any]


@dataclass(frozen=True)
class ToolFormat:
    """How one model family marks and writes a tool call."""

    name: str
    start: str
    end: str  # "" (Mistral): the call runs to the end of the output
    parse: Parser


def load_format(name: str) -> ToolFormat:
    """mlx-lm's parser `name` (a module of mlx_lm.tool_parsers, e.g. "json_tools")."""
    try:
        module = importlib.import_module(f"mlx_lm.tool_parsers.{name}")
    except ImportError as exc:
        raise EngineError(f"tool calls need mlx-lm's tool parser {name!r}: {exc}") from exc
    return ToolFormat(name, module.tool_call_start, module.tool_call_end, module.parse_tool_call)


def format_of(tokenizer: Any) -> ToolFormat | None:
    """The format mlx-lm's tokenizer wrapper chose for this model; None if it has none."""
    if not getattr(tokenizer, "has_tool_calling", False):
        return None
    name = getattr(tokenizer, "tool_parser_type", None) or "model"
    return ToolFormat(name, tokenizer.tool_call_start, tokenizer.tool_call_end or "", tokenizer.tool_parser)


def template_tools(tools: tuple[ToolSpec, ...]) -> list[dict[str, Any]] | None:
    """Tools as chat templates expect them (OpenAI's spelling); None for a plain chat."""
    if not tools:
        return None
    return [
        {
            "type": "function",
            "function": {"name": t.name, "description": t.description, "parameters": t.parameters},
        }
        for t in tools
    ]


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def template_messages(messages: tuple[ChatMessage, ...]) -> list[dict[str, Any]]:
    """Messages as chat templates expect them: tool calls with their arguments as objects."""
    out: list[dict[str, Any]] = []
    for m in messages:
        message: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            message["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": _arguments(c.arguments)},
                }
                for c in m.tool_calls
            ]
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        out.append(message)
    return out


def _tool_call(parsed: Any) -> ToolCall:
    if not isinstance(parsed, dict) or not isinstance(parsed.get("name"), str):
        raise ValueError(f"not a tool call: {parsed!r}")
    arguments = parsed.get("arguments", {})
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    given = parsed.get("id")
    call_id = given if isinstance(given, str) and given else f"call_{uuid.uuid4().hex[:24]}"
    return ToolCall(id=call_id[:256], name=parsed["name"][:256], arguments=text[:MAX_TEXT_CHARS])


class ToolCallStream:
    """Splits streamed model output into visible text (to `sink`) and tool calls (`finish()`).

    `opened`: the prompt already ends with the start marker (a required tool call), so the output
    begins inside a call.
    """

    def __init__(
        self, fmt: ToolFormat, tools: tuple[ToolSpec, ...], sink: TextSink, *, opened: bool = False
    ) -> None:
        self._fmt = fmt
        self._tools = template_tools(tools)
        self._sink = sink
        self._inside = opened
        self._buffer = ""
        self.calls: list[ToolCall] = []

    def feed(self, piece: str) -> None:
        self._buffer += piece
        while True:
            if self._inside:
                end = self._buffer.find(self._fmt.end) if self._fmt.end else -1
                if end < 0:
                    if len(self._buffer) > MAX_TEXT_CHARS:  # a runaway "call": give it back as text
                        self._give_back()
                    return
                self._close(self._buffer[:end])
                self._buffer = self._buffer[end + len(self._fmt.end) :]
                continue
            start = self._buffer.find(self._fmt.start)
            if start < 0:
                hold = _partial(self._buffer, self._fmt.start)
                self._emit(self._buffer[: len(self._buffer) - hold])
                self._buffer = self._buffer[len(self._buffer) - hold :]
                return
            self._emit(self._buffer[:start])
            self._buffer = self._buffer[start + len(self._fmt.start) :]
            self._inside = True

    def finish(self) -> tuple[ToolCall, ...]:
        """The end of the output: flush what is held back; the tool calls made."""
        if self._inside:
            if self._fmt.end:  # a call cut short (max_tokens): not a call
                self._give_back()
            else:
                self._close(self._buffer)
        else:
            self._emit(self._buffer)
        self._buffer = ""
        return tuple(self.calls[:MAX_TOOL_CALLS])

    def _close(self, text: str) -> None:
        self._inside = False
        try:
            parsed = self._fmt.parse(text, self._tools)
            calls = [_tool_call(p) for p in (parsed if isinstance(parsed, list) else [parsed])]
        except (ValueError, KeyError, TypeError, SyntaxError, AttributeError):
            self._emit(self._fmt.start + text + self._fmt.end)
            return
        self.calls.extend(calls)

    def _give_back(self) -> None:
        self._inside = False
        text, self._buffer = self._buffer, ""
        self._emit(self._fmt.start + text)

    def _emit(self, text: str) -> None:
        if text:
            self._sink(text)


def _partial(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper prefix of `marker`."""
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:length]):
            return length
    return 0


async def run_with_tools(
    fmt: ToolFormat | None,
    params: TaskParams,
    on_text: TextSink,
    run: Callable[[TextSink], Awaitable[RunOutcome]],
    *,
    opened: bool = False,
) -> RunOutcome:
    """Run an engine's task; with tools (and a format to read them), split out its tool calls."""
    if fmt is None or not isinstance(params, TextGenerationParams) or not params.tools:
        return await run(on_text)
    stream = ToolCallStream(fmt, params.tools, on_text, opened=opened)
    outcome = await run(stream.feed)
    return dataclasses.replace(outcome, tool_calls=stream.finish())
