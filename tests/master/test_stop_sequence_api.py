"""Which stop sequence ended an answer, through the master's one text path: Anthropic's surface
reports it (`stop_reason: "stop_sequence"`, whole and streamed), the others keep their shapes, and a
stop sequence the request never asked for is logged and ignored."""

from __future__ import annotations

import json
from typing import Any

import pytest
from structlog.testing import capture_logs

from exo_master.http.anthropic import stop_fields
from exo_master.http.textpath import Ending
from protocol.messages import MAX_STOP_CHARS, FinishReason, ToolCall, Usage
from tests.master.api_harness import InProcess, in_process

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def harness() -> InProcess:
    return in_process()


def _events(body: str) -> list[tuple[str, dict[str, Any]]]:
    """The (event, data) pairs of an SSE body."""
    out = []
    for block in body.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def _messages(harness: InProcess, **extra: Any) -> dict[str, Any]:
    response = harness.client().post("/v1/messages", json={**CHAT, "max_tokens": 4, **extra})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _streamed(harness: InProcess, **extra: Any) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """The streamed text, the final message_delta's delta, and the message_start message."""
    body = {**CHAT, "max_tokens": 4, "stream": True, **extra}
    response = harness.client().post("/v1/messages", json=body)
    assert response.status_code == 200, response.text
    events = _events(response.text)
    assert [name for name, _ in events[-2:]] == ["message_delta", "message_stop"]
    text = "".join(d["delta"]["text"] for name, d in events if name == "content_block_delta")
    return text, events[-2][1]["delta"], events[0][1]["message"]


def test_anthropic_names_the_stop_sequence_that_ended_the_message(harness: InProcess) -> None:
    message = _messages(harness, stop_sequences=["zzz", " gamma"])
    assert message["content"] == [{"type": "text", "text": "alpha beta"}]
    assert (message["stop_reason"], message["stop_sequence"]) == ("stop_sequence", " gamma")


def test_anthropic_names_it_in_the_streamed_message_delta(harness: InProcess) -> None:
    text, delta, start = _streamed(harness, stop_sequences=[" gamma", "zzz"])
    assert text == "alpha beta"
    assert delta == {"stop_reason": "stop_sequence", "stop_sequence": " gamma"}
    assert (start["stop_reason"], start["stop_sequence"]) == (None, None)  # not known yet


@pytest.mark.parametrize(
    ("max_tokens", "reason"), [(4, "max_tokens"), (9, "end_turn")], ids=["max_tokens", "end_turn"]
)
def test_an_answer_no_stop_sequence_ended_reports_as_before(
    harness: InProcess, max_tokens: int, reason: str
) -> None:
    message = _messages(harness, max_tokens=max_tokens, stop_sequences=["zzz"])
    assert message["content"] == [{"type": "text", "text": "alpha beta gamma delta"}]
    assert (message["stop_reason"], message["stop_sequence"]) == (reason, None)
    _, delta, _ = _streamed(harness, max_tokens=max_tokens, stop_sequences=["zzz"])
    assert delta == {"stop_reason": reason, "stop_sequence": None}


def test_a_stop_sequence_the_request_did_not_ask_for_is_logged_and_ignored() -> None:
    harness = in_process(forged_stop="Human:")
    with capture_logs() as logs:
        message = _messages(harness, max_tokens=9, stop_sequences=["zzz"])
        _, delta, _ = _streamed(harness, max_tokens=9)
    assert (message["stop_reason"], message["stop_sequence"]) == ("end_turn", None)
    assert delta == {"stop_reason": "end_turn", "stop_sequence": None}
    ignored = [e for e in logs if e["event"] == "task.stop_sequence_ignored"]
    assert (
        len(ignored) == 2 and ignored[0]["stop_sequence"] == "Human:" and ignored[0]["log_level"] == "warning"
    )


def test_the_other_surfaces_keep_their_shapes_when_a_stop_sequence_ends_the_answer(
    harness: InProcess,
) -> None:
    client = harness.client()
    chat = client.post("/v1/chat/completions", json={**CHAT, "stop": " gamma"}).json()
    choice = chat["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["content"] == "alpha beta"
    assert "stop_sequence" not in json.dumps(chat)
    ollama = client.post("/api/chat", json={**CHAT, "stream": False, "options": {"stop": [" gamma"]}}).json()
    assert ollama["done_reason"] == "stop" and ollama["message"]["content"] == "alpha beta"
    assert "stop_sequence" not in json.dumps(ollama)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {**CHAT, "stop": ["x" * (MAX_STOP_CHARS + 1)]}),
        ("/v1/chat/completions", {**CHAT, "stop": "x" * (MAX_STOP_CHARS + 1)}),
        ("/v1/messages", {**CHAT, "max_tokens": 4, "stop_sequences": ["x" * (MAX_STOP_CHARS + 1)]}),
        ("/api/chat", {**CHAT, "options": {"stop": ["x" * (MAX_STOP_CHARS + 1)]}}),
    ],
    ids=["chat-list", "chat-string", "anthropic", "ollama"],
)
def test_a_stop_string_longer_than_the_bound_is_a_400(
    harness: InProcess, path: str, body: dict[str, Any]
) -> None:
    response = harness.client().post(path, json=body)
    assert response.status_code == 400, response.text
    assert str(MAX_STOP_CHARS) in response.text
    assert not harness.worker.assigned  # nothing reached a worker


def _ending(reason: FinishReason, stop: str | None = None, calls: int = 0) -> Ending:
    tool_calls = tuple(ToolCall(id=f"c{i}", name="f") for i in range(calls))
    return Ending(reason, Usage(), tool_calls, stop)


@pytest.mark.parametrize(
    ("end", "fields"),
    [
        (_ending(FinishReason.STOP, "###"), ("stop_sequence", "###")),
        (_ending(FinishReason.STOP), ("end_turn", None)),
        (_ending(FinishReason.LENGTH), ("max_tokens", None)),
        (_ending(FinishReason.STOP, "###", calls=1), ("tool_use", None)),  # the client must run it
        (_ending(FinishReason.STOP, calls=2), ("tool_use", None)),
    ],
    ids=["stop-sequence", "end-turn", "max-tokens", "tool-use-and-stop", "tool-use"],
)
def test_stop_reason_and_stop_sequence_go_together(end: Ending, fields: tuple[str, str | None]) -> None:
    assert stop_fields(end) == {"stop_reason": fields[0], "stop_sequence": fields[1]}
