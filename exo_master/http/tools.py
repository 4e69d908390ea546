"""Tool definitions and tool choices, as every surface hands them to the one request path.

Surfaces spell tools differently (OpenAI nests them under `function`, Anthropic calls the schema
`input_schema`, Responses flattens them); each adapter turns its own spelling into ToolSpec and its
choice into one of auto / none / required / a tool's name. `select_tools` then decides what the
worker gets: "none" sends no tools at all (the model is not shown them), a named choice sends that
one tool as required. Tool-call ids are minted by the worker; arguments travel as JSON text.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal

from exo_master.http.errors import invalid
from protocol.messages import MAX_TOOLS, ToolSpec

ChoiceMode = Literal["auto", "none", "required"]


def select_tools(
    tools: Sequence[ToolSpec], mode: ChoiceMode, name: str | None = None, *, param: str = "tool_choice"
) -> tuple[tuple[ToolSpec, ...], Literal["auto", "required"]]:
    """What the worker is given for `tools` and a choice (mode, or a tool `name`)."""
    if len(tools) > MAX_TOOLS:
        raise invalid(f"tools must have at most {MAX_TOOLS} items", "tools")
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise invalid("every tool must have a distinct name", "tools")
    if name is not None:
        chosen = [t for t in tools if t.name == name]
        if not chosen:
            raise invalid(f"{param} names the tool {name!r}, which is not among the tools", param)
        return (chosen[0],), "required"
    if mode == "none":
        return (), "auto"
    if mode == "required" and not tools:
        raise invalid(f"{param} requires a tool call, but no tools were given", param)
    return tuple(tools), mode


def arguments_text(arguments: Any) -> str:
    """Tool-call arguments as JSON text (OpenAI sends text, Anthropic and Ollama an object)."""
    return arguments if isinstance(arguments, str) else json.dumps(arguments)


def arguments_object(text: str) -> Any:
    """Tool-call arguments as an object (for Anthropic's `input` and Ollama's `arguments`)."""
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
