"""Tool calls on the worker: parsing a model's output however it is streamed, the sim engine's
calls, and an MLX model whose chat template takes tools (the tiny model with a tool template)."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exo_worker.mlx_engine import MlxEngine
from exo_worker.sim_engine import SimEngine
from exo_worker.tool_calls import ToolCallStream, format_of, load_format, template_messages
from protocol.ids import ModelId
from protocol.messages import ChatMessage, FinishReason, TextGenerationParams, ToolCall, ToolSpec

JSON_TOOLS = load_format("json_tools")
WEATHER = ToolSpec(
    name="get_weather",
    description="The weather in a city",
    parameters={"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}},
)
OUTPUT = (
    'Let me look. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call> Done.'
)


def _split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts})
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]


def _stream(pieces: list[str], fmt=JSON_TOOLS, opened: bool = False) -> tuple[str, tuple[ToolCall, ...]]:  # type: ignore[no-untyped-def]
    shown: list[str] = []
    stream = ToolCallStream(fmt, (WEATHER,), shown.append, opened=opened)
    for piece in pieces:
        stream.feed(piece)
    calls = stream.finish()
    return "".join(shown), calls


@given(st.lists(st.integers(min_value=0, max_value=500), max_size=12))
def test_a_tool_call_is_parsed_however_the_output_is_cut(cuts: list[int]) -> None:
    text, calls = _stream(_split(OUTPUT, cuts))
    assert text == "Let me look.  Done."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Oslo"})]
    assert calls[0].id.startswith("call_")


def test_text_that_only_looks_like_a_marker_is_shown() -> None:
    assert _stream(["a <tool", "_ca", "ll not really"]) == ("a <tool_ca" + "ll not really", ())
    assert _stream(["ends with <tool_c"]) == ("ends with <tool_c", ())


def test_an_unparsable_or_unfinished_call_is_given_back_as_text() -> None:
    broken = "<tool_call>\n{not json}\n</tool_call>"
    assert _stream([broken]) == (broken, ())
    cut = '<tool_call>\n{"name": "get_weather", "argu'  # max_tokens hit inside the call
    assert _stream([cut]) == (cut, ())


def test_a_required_call_starts_inside_the_marker() -> None:
    text, calls = _stream(['\n{"name": "get_weather", "arguments": {}}\n</tool_call>'], opened=True)
    assert text == "" and [c.name for c in calls] == ["get_weather"]


def test_a_format_without_an_end_marker_runs_to_the_end() -> None:
    text, calls = _stream(['[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}'], fmt=load_format("mistral"))
    assert text == "" and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Oslo"})
    ]


def test_template_messages_carry_tool_calls_and_results() -> None:
    call = ToolCall(id="call_1", name="get_weather", arguments='{"city": "Oslo"}')
    messages = (
        ChatMessage(role="assistant", content="", tool_calls=(call,)),
        ChatMessage(role="tool", content="sunny", tool_call_id="call_1"),
    )
    assert template_messages(messages) == [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Oslo"}},
                }
            ],
        },
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
    ]


def _params(messages: tuple[ChatMessage, ...], **kwargs: object) -> TextGenerationParams:
    return TextGenerationParams(model=ModelId("m"), messages=messages, **kwargs)  # type: ignore[arg-type]


def _run(engine: object, params: TextGenerationParams) -> tuple[str, object]:
    pieces: list[str] = []
    outcome = asyncio.run(engine.run(params, pieces.append, threading.Event()))  # type: ignore[attr-defined]
    return "".join(pieces), outcome


def test_the_sim_engine_calls_the_tool_then_answers_its_result() -> None:
    engine = SimEngine(math.inf)
    ask = (ChatMessage(role="user", content="Weather in Oslo?"),)
    text, outcome = _run(engine, _params(ask, tools=(WEATHER,)))
    assert text == "" and outcome.finish_reason is FinishReason.STOP  # type: ignore[attr-defined]
    (call,) = outcome.tool_calls  # type: ignore[attr-defined]
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "seven", "days": 7})
    answered = (*ask, ChatMessage(role="assistant", content="", tool_calls=(call,)))
    answered += (ChatMessage(role="tool", content="sunny", tool_call_id=call.id),)
    text, outcome = _run(engine, _params(answered, tools=(WEATHER,), max_tokens=3))
    assert len(text.split()) == 3 and outcome.tool_calls == ()  # type: ignore[attr-defined]
    text, outcome = _run(engine, _params(ask, max_tokens=3))  # no tools: words
    assert len(text.split()) == 3 and outcome.tool_calls == ()  # type: ignore[attr-defined]


TOOL_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\\nTools:' }}{% for tool in tools %}{{ ' ' + tool.function.name }}"
    "{% endfor %}"
    "{{ '\\nCall one as <tool_call>{\"name\": tool_call.name}</tool_call><|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.mark.mlx
def test_mlx_shows_the_tools_to_the_template_and_reads_calls_in_its_family_format(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "tool-model"))
    config_path = model / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "chat_template": TOOL_TEMPLATE}))
    engine = MlxEngine(model, label="tool-model")
    asyncio.run(engine.load())
    try:
        fmt = format_of(engine._tokenizer)
        assert fmt is not None and (fmt.start, fmt.end) == ("<tool_call>", "</tool_call>")
        ask = (ChatMessage(role="user", content="Weather?"),)
        _, plain = _run(engine, _params(ask, max_tokens=2, temperature=0.0))
        _, shown = _run(engine, _params(ask, max_tokens=2, temperature=0.0, tools=(WEATHER,)))
        assert shown.usage.prompt_tokens > plain.usage.prompt_tokens  # type: ignore[attr-defined]
        # Required: the answer starts inside a call; the random model never closes it, so what it
        # wrote comes back as text after the marker, not as a call.
        text, forced = _run(
            engine, _params(ask, max_tokens=3, temperature=0.0, tools=(WEATHER,), tool_choice="required")
        )
        assert text.startswith("<tool_call>") and forced.tool_calls == ()  # type: ignore[attr-defined]
    finally:
        engine.close()
