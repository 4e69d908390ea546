"""Every client a Mac owner already uses, against real processes: the anthropic SDK, the openai
SDK's Responses API and chat tool calls, and the ollama client. Each runs a chat, a stream and a
tool-call round trip against one sim cluster shared by the module (the sim engine writes its tool
calls in the json_tools format of Qwen and Hermes models; the worker parses them with mlx-lm)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import ollama
import openai
import pytest

from exo_master.devtools.launcher import ClusterSpec, LocalCluster

pytestmark = pytest.mark.e2e
MODEL = "sim-model"
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    log_dir: Path = tmp_path_factory.mktemp("surfaces-cluster")
    with LocalCluster(ClusterSpec(workers=1, sim_tokens_per_s=1000, log_dir=log_dir)) as started:
        started.start()
        yield started


# ---- Anthropic Messages ---------------------------------------------------------------------------


@pytest.fixture
def claude(cluster: LocalCluster) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=cluster.api_url, api_key="unused", max_retries=0, timeout=30)


def test_anthropic_chat(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(
        model=MODEL,
        max_tokens=5,
        system="You are terse.",
        messages=[{"role": "user", "content": "Say hello"}],
        stop_sequences=["zzz"],
        # This SDK no longer declares the sampling fields; the Messages API still takes them.
        extra_body={"temperature": 0.5, "top_p": 0.9, "top_k": 40},
    )
    assert message.type == "message" and message.role == "assistant"
    assert message.stop_reason == "max_tokens"
    assert len(message.content[0].text.split()) == 5  # type: ignore[union-attr]
    assert message.usage.output_tokens == 5 and message.usage.input_tokens > 0


def test_anthropic_stream_has_the_real_event_sequence(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(
        model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "Count"}]
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start"
    assert kinds[-2:] == ["message_delta", "message_stop"]
    for kind in ("content_block_start", "content_block_delta", "content_block_stop"):
        assert kind in kinds
    assert (
        final.stop_reason == "max_tokens" and final.stop_sequence is None and final.usage.output_tokens == 4
    )
    assert len(final.content[0].text.split()) == 4  # type: ignore[union-attr]


def _text(message: anthropic.types.Message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def test_anthropic_names_the_stop_sequence_that_ended_the_answer(claude: anthropic.Anthropic) -> None:
    ask: dict[str, Any] = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "List"}]}
    free = claude.messages.create(**ask, stop_sequences=["never written"])
    assert (free.stop_reason, free.stop_sequence) == ("max_tokens", None)  # no stop string hit
    text = _text(free)
    # A word of the answer whose first occurrence is not at its start (the cut leaves some text).
    stop = next(word for word in text.split()[2:] if text.find(word) > 0)
    expected = text[: text.find(stop)]
    message = claude.messages.create(**ask, stop_sequences=["never written", stop])
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", stop)
    assert _text(message) == expected
    with claude.messages.stream(**ask, stop_sequences=[stop]) as stream:
        deltas = [event.delta for event in stream if event.type == "message_delta"]
        final = stream.get_final_message()
    assert [(d.stop_reason, d.stop_sequence) for d in deltas] == [("stop_sequence", stop)]
    assert (final.stop_reason, final.stop_sequence, _text(final)) == ("stop_sequence", stop, expected)


def test_anthropic_tool_use_round_trip(claude: anthropic.Anthropic) -> None:
    tool = {
        "name": WEATHER["name"],
        "description": WEATHER["description"],
        "input_schema": WEATHER["parameters"],
    }
    first = claude.messages.create(
        model=MODEL, max_tokens=64, tools=[tool], messages=[{"role": "user", "content": "Weather in Oslo?"}]
    )
    assert first.stop_reason == "tool_use"
    (use,) = [b for b in first.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.input == {"city": "seven"}  # type: ignore[union-attr]
    second = claude.messages.create(
        model=MODEL,
        max_tokens=3,
        tools=[tool],
        messages=[
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": first.content},  # type: ignore[typeddict-item]
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]},  # type: ignore[union-attr]
        ],
    )
    assert second.stop_reason == "max_tokens" and second.content[0].type == "text"
    with claude.messages.stream(
        model=MODEL, max_tokens=64, tools=[tool], messages=[{"role": "user", "content": "Weather?"}]
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [b.input for b in final.content if b.type == "tool_use"] == [{"city": "seven"}]  # type: ignore[union-attr]


def test_anthropic_errors_in_anthropic_shape(claude: anthropic.Anthropic, cluster: LocalCluster) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        claude.messages.create(model="nope", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert "sim-model" in str(missing.value)
    raw = httpx.post(
        f"{cluster.api_url}/v1/messages",
        json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]},
        headers={"x-api-key": "unused"},
    )
    assert raw.status_code == 400
    assert raw.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": raw.json()["error"]["message"]},
    }
    assert "max_tokens" in raw.json()["error"]["message"]


# ---- OpenAI Responses and chat tool calls ------------------------------------------------------------


@pytest.fixture
def client(cluster: LocalCluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.api_url}/v1", api_key="unused", max_retries=0, timeout=30)


def test_responses_chat_and_previous_response_id(client: openai.OpenAI) -> None:
    first = client.responses.create(
        model=MODEL, input="Say hello", instructions="Be brief", max_output_tokens=4
    )
    assert first.status == "incomplete" and len(first.output_text.split()) == 4
    follow = client.responses.create(
        model=MODEL,
        input=[{"role": "user", "content": [{"type": "input_text", "text": "And again"}]}],
        previous_response_id=first.id,
        max_output_tokens=4,
        temperature=0.2,
        top_p=0.5,
    )
    assert follow.usage is not None and first.usage is not None
    assert follow.usage.input_tokens > first.usage.input_tokens  # the first exchange came along
    with pytest.raises(openai.BadRequestError) as gone:
        client.responses.create(model=MODEL, input="x", previous_response_id="resp_unknown")
    assert gone.value.param == "previous_response_id"


def test_responses_stream_events(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model=MODEL, input="Count", max_output_tokens=3, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert "response.output_text.delta" in kinds and "response.output_text.done" in kinds
    assert kinds[-1] == "response.incomplete"  # max_output_tokens reached
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")  # type: ignore[union-attr]
    assert len(deltas.split()) == 3


def test_responses_tool_call_round_trip(client: openai.OpenAI) -> None:
    tool = {"type": "function", **WEATHER}
    first = client.responses.create(model=MODEL, input="Weather in Oslo?", tools=[tool])  # type: ignore[list-item]
    (call,) = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "seven"}
    second = client.responses.create(
        model=MODEL,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
        tools=[tool],  # type: ignore[list-item]
        max_output_tokens=3,
    )
    assert not [i for i in second.output if i.type == "function_call"] and second.output_text
    streamed = list(client.responses.create(model=MODEL, input="Weather?", tools=[tool], stream=True))  # type: ignore[list-item]
    done = [e for e in streamed if e.type == "response.function_call_arguments.done"]
    assert [json.loads(e.arguments) for e in done] == [{"city": "seven"}]  # type: ignore[union-attr]


def test_chat_completions_tool_calls_whole_and_streamed(client: openai.OpenAI) -> None:
    tools = [{"type": "function", "function": WEATHER}]
    messages: list[dict[str, object]] = [{"role": "user", "content": "Weather in Oslo?"}]
    first = client.chat.completions.create(model=MODEL, messages=messages, tools=tools)  # type: ignore[arg-type]
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "seven"}  # type: ignore[union-attr]
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]
    second = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, max_tokens=3)  # type: ignore[arg-type]
    assert second.choices[0].finish_reason == "length" and not second.choices[0].message.tool_calls
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages[:1],
            tools=tools,
            tool_choice="required",
            stream=True,  # type: ignore[arg-type]
        )
    )
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    assert [d.function.name for d in deltas] == ["get_weather"]  # type: ignore[union-attr]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    none = client.chat.completions.create(
        model=MODEL,
        messages=messages[:1],
        tools=tools,
        tool_choice="none",
        max_tokens=2,  # type: ignore[arg-type]
    )
    assert none.choices[0].message.tool_calls is None  # "none": the model is not shown the tools


# ---- Ollama ------------------------------------------------------------------------------------


@pytest.fixture
def llama(cluster: LocalCluster) -> ollama.Client:
    return ollama.Client(host=cluster.api_url, timeout=30)


def test_ollama_chat_and_generate(llama: ollama.Client) -> None:
    answer = llama.chat(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hello"}],
        stream=False,
        options={"num_predict": 4, "temperature": 0.3, "top_p": 0.9, "seed": 7, "stop": ["zzz"]},
    )
    assert answer.done and answer.done_reason == "length" and answer.eval_count == 4
    assert len(answer.message.content.split()) == 4
    generated = llama.generate(model=MODEL, prompt="Once", options={"num_predict": 3}, stream=False)
    assert generated.done and len(generated.response.split()) == 3


def test_ollama_streams_ndjson_by_default(llama: ollama.Client, cluster: LocalCluster) -> None:
    parts = list(
        llama.chat(
            model=MODEL,
            messages=[{"role": "user", "content": "Count"}],
            stream=True,
            options={"num_predict": 3},
        )
    )
    assert [p.done for p in parts][-1] is True and not any(p.done for p in parts[:-1])
    assert len("".join(p.message.content for p in parts).split()) == 3
    raw = httpx.post(
        f"{cluster.api_url}/api/generate", json={"model": MODEL, "prompt": "x", "options": {"num_predict": 2}}
    )
    assert raw.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in raw.text.splitlines()]
    assert lines[-1]["done"] is True and len(lines) == 3


def test_ollama_tool_call_round_trip(llama: ollama.Client) -> None:
    tools = [{"type": "function", "function": WEATHER}]
    messages: list[dict[str, object]] = [{"role": "user", "content": "Weather in Oslo?"}]
    first = llama.chat(model=MODEL, messages=messages, tools=tools, stream=False)  # type: ignore[arg-type]
    (call,) = first.message.tool_calls or []
    assert call.function.name == "get_weather" and dict(call.function.arguments) == {"city": "seven"}
    messages += [
        first.message.model_dump(exclude_none=True),
        {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
    ]
    second = llama.chat(model=MODEL, messages=messages, tools=tools, stream=False, options={"num_predict": 3})  # type: ignore[arg-type]
    assert not second.message.tool_calls and len(second.message.content.split()) == 3
    streamed = list(llama.chat(model=MODEL, messages=messages[:1], tools=tools, stream=True))  # type: ignore[arg-type]
    assert [c.function.name for p in streamed for c in p.message.tool_calls or ()] == ["get_weather"]


def test_ollama_listings_and_errors(llama: ollama.Client) -> None:
    assert [m.model for m in llama.list().models] == [MODEL]
    assert [m.model for m in llama.ps().models] == [MODEL]
    assert "tools" in (llama.show(MODEL).capabilities or [])
    with pytest.raises(ollama.ResponseError) as missing:
        llama.chat(model="nope", messages=[{"role": "user", "content": "x"}], stream=False)
    assert missing.value.status_code == 404 and MODEL in missing.value.error
    with pytest.raises(ollama.ResponseError) as refused:
        llama.chat(
            model=MODEL,
            messages=[{"role": "user", "content": "x"}],
            stream=False,
            options={"repeat_penalty": 1.3},
        )
    assert refused.value.status_code == 400 and "repeat_penalty" in refused.value.error
