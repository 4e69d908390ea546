"""OpenAI compatibility decided per field, readiness, served-by headers, inference metrics and
clean shutdown, against the app in-process (tests/master/api_harness.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from exo_master.core.events import NodeSubscribed
from exo_master.runtime import MasterRuntime
from protocol.ids import TaskId
from protocol.messages import AssignTask, ChatMessage, InstanceStatus, TextGenerationParams
from tests.master.api_harness import InProcess, in_process
from tests.master.cluster import MODEL, heartbeat, node_of, report

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "m", "prompt": "once upon a time"}


@pytest.fixture(scope="module")
def harness() -> InProcess:
    return in_process()


@pytest.mark.parametrize(
    "extra",
    [
        {"n": None, "stream": None, "stream_options": None, "temperature": None, "top_p": None},
        {"max_tokens": None, "max_completion_tokens": None, "seed": None, "stop": None, "user": "u"},
        {"presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "logprobs": False},
        {"top_logprobs": 0, "response_format": {"type": "text"}, "tool_choice": "none"},
        {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none"},
        {"parallel_tool_calls": None, "logprobs": None, "top_logprobs": None, "response_format": None},
    ],
)
def test_nulls_and_harmless_values_are_accepted(harness: InProcess, extra: dict[str, Any]) -> None:
    response = harness.client().post("/v1/chat/completions", json={**CHAT, **extra})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": -1}, "frequency_penalty"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
        ({"reasoning_effort": "low"}, "reasoning_effort"),
        ({"service_tier": "priority"}, "service_tier"),
        ({"verbosity": "low"}, "verbosity"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages"),
    ],
)
def test_unsupported_chat_parameters_are_a_400_naming_them(
    harness: InProcess, extra: dict[str, Any], param: str
) -> None:
    response = harness.client().post("/v1/chat/completions", json={**CHAT, **extra})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["code"] == "unsupported_parameter"
    assert param in error["message"]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"echo": True}, "echo"),
        ({"suffix": "end"}, "suffix"),
        ({"logprobs": 2}, "logprobs"),
        ({"best_of": 3}, "best_of"),
        ({"presence_penalty": 1}, "presence_penalty"),
    ],
)
def test_unsupported_completion_parameters_are_a_400_naming_them(
    harness: InProcess, extra: dict[str, Any], param: str
) -> None:
    response = harness.client().post("/v1/completions", json={**COMPLETION, **extra})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_legacy_completion_sends_the_raw_prompt_without_chat_messages() -> None:
    harness = in_process()
    response = harness.client().post("/v1/completions", json={**COMPLETION, "max_tokens": 3, "echo": False})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "alpha beta gamma"
    assert body["choices"][0]["finish_reason"] == "length"
    params = harness.worker.assigned[-1].params
    assert isinstance(params, TextGenerationParams)
    assert params.prompt == "once upon a time" and params.messages == ()


def test_legacy_completion_streams_text_completion_chunks(harness: InProcess) -> None:
    response = harness.client().post("/v1/completions", json={**COMPLETION, "stream": True})
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert '"object":"text_completion"' in events[0]
    assert "alpha" in events[0]


def test_models_retrieve_and_404(harness: InProcess) -> None:
    client = harness.client()
    assert client.get("/v1/models/m").json()["id"] == "m"
    missing = client.get("/v1/models/org/none")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


def test_image_edits_multipart() -> None:
    harness = in_process()
    client = harness.client()
    form = {"model": "m", "prompt": "add a hat", "seed": "3", "size": "256x256"}
    ok = client.post("/v1/images/edits", data=form, files={"image": ("cat.png", b"\x89PNG....", "image/png")})
    assert ok.status_code == 200, ok.text
    assert ok.json()["data"][0]["b64_json"]
    sent = harness.worker.assigned[-1].params
    assert sent.KIND == "ImageEdits" and getattr(sent, "seed", None) == 3
    files = {"image": ("cat.png", b"x", "image/png"), "mask": ("m.png", b"y", "image/png")}
    masked = client.post("/v1/images/edits", data=form, files=files)
    assert masked.status_code == 400 and masked.json()["error"]["param"] == "mask"
    no_image = client.post("/v1/images/edits", data=form, files={"other": ("a", b"x", "image/png")})
    assert no_image.status_code == 400 and no_image.json()["error"]["param"] == "image"
    bad_n = client.post(
        "/v1/images/edits", data={**form, "n": "2"}, files={"image": ("a", b"x", "image/png")}
    )
    assert bad_n.status_code == 400 and bad_n.json()["error"]["param"] == "n"
    no_model = client.post(
        "/v1/images/edits", data={"prompt": "p"}, files={"image": ("a", b"x", "image/png")}
    )
    assert no_model.status_code == 400 and no_model.json()["error"]["param"] == "model"


def test_ready_is_503_with_a_reason_until_an_instance_is_ready() -> None:
    harness = in_process(nodes=0)
    client = harness.client()
    assert client.get("/health").status_code == 200
    response = client.get("/ready")
    assert response.status_code == 503
    assert "no worker node is alive" in response.json()["error"]["message"]
    runtime = harness.runtime
    runtime.core.handle(NodeSubscribed(node_id=node_of(0)), runtime.clock())
    runtime.core.handle(heartbeat(0, report(0, status=InstanceStatus.LOADING)), runtime.clock())
    response = client.get("/ready")
    assert response.status_code == 503
    assert "1 loading" in response.json()["error"]["message"]
    runtime.core.handle(heartbeat(0, report(0)), runtime.clock())
    assert client.get("/ready").status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_headers_name_the_instance_that_served_after_a_replacement(stream: bool) -> None:
    # The least-loaded policy picks node0 first (ties break by id); node0 refuses, node1 serves.
    harness = in_process(refuse_nodes={"node0"})
    response = harness.client().post("/v1/chat/completions", json={**CHAT, "stream": stream})
    assert response.status_code == 200, response.text
    assert [a.node_id for a in harness.worker.assigned] == ["node0", "node1"]
    assert response.headers["x-exo-node"] == "node1"
    assert response.headers["x-exo-instance"] == "node1/0"


def samples(harness: InProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = harness.client().get("/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_inference_metrics_per_model() -> None:
    harness = in_process()
    client = harness.client()
    client.post("/v1/chat/completions", json=CHAT)
    client.post("/v1/chat/completions", json={**CHAT, "stream": True, "max_tokens": 2})
    client.post("/v1/chat/completions", json={**CHAT, "model": "unknown"})  # rejected: no label
    s = samples(harness)
    model = (("model", "m"),)
    assert s[("exo_time_to_first_token_seconds_count", model)] == 2
    assert s[("exo_time_per_output_token_seconds_count", model)] == 2
    assert s[("exo_request_duration_seconds_count", (("model", "m"), ("outcome", "ok")))] == 2
    assert s[("exo_prompt_tokens_total", model)] == 6
    assert s[("exo_generation_tokens_total", model)] == 4 + 2
    assert ("exo_time_to_first_token_seconds_count", (("model", "unknown"),)) not in s
    assert s[("exo_queue_wait_seconds_count", ())] == 2


def test_shutdown_ends_streams_with_an_error_event_and_done_and_waiters_with_503() -> None:
    async def scenario() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        harness = in_process(hold_after_first=True)
        first_chunks = asyncio.Event()
        harness.worker.first_chunk_sent = first_chunks
        transport = httpx.ASGITransport(app=harness.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            stream = asyncio.create_task(client.post("/v1/chat/completions", json={**CHAT, "stream": True}))
            whole = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
            async with asyncio.timeout(10):  # both requests open, the stream past its first chunk
                while len(harness.api._open) < 2 or not first_chunks.is_set():
                    await asyncio.sleep(0.01)  # wait-ok: polls a condition inside asyncio.timeout
            assert harness.api.shutdown("the master is shutting down") == 2
            after = await client.post("/v1/chat/completions", json=CHAT)
            return await stream, await whole, after

    stream, whole, after = asyncio.run(scenario())
    events = [line[6:] for line in stream.text.splitlines() if line.startswith("data: ")]
    assert "alpha" in events[1]
    assert '"code":"shutting_down"' in events[-2]
    assert events[-1] == "[DONE]"
    assert whole.status_code == 503 and whole.json()["error"]["code"] == "shutting_down"
    assert after.status_code == 503


def test_an_unencodable_assignment_fails_its_request_and_the_sender_goes_on() -> None:
    class Bus:
        def __init__(self) -> None:
            self.sent: list[object] = []

        def send_now(self, topic: bytes, message: object) -> None:
            if isinstance(message, AssignTask) and message.params.seed == 2**64:  # type: ignore[union-attr]
                raise OverflowError("can't serialize ints > 2**64 - 1")
            self.sent.append(message)

    async def scenario() -> tuple[list[object], list[object]]:
        harness = in_process()
        runtime: MasterRuntime = harness.runtime
        runtime.effect_observers.clear()
        runtime.bus = Bus()  # type: ignore[assignment]
        sender = asyncio.create_task(runtime.run_sender())
        messages = (ChatMessage(role="user", content="hi"),)
        bad = runtime.submit(TaskId("bad"), TextGenerationParams(model=MODEL, messages=messages, seed=2**64))
        good = runtime.submit(TaskId("good"), TextGenerationParams(model=MODEL, messages=messages, seed=1))
        bad_effects = [await bad.next() for _ in range(2)]
        async with asyncio.timeout(10):
            while not any(isinstance(m, AssignTask) and m.task_id == "good" for m in runtime.bus.sent):  # type: ignore[union-attr]
                await asyncio.sleep(0.01)  # wait-ok: polls a condition inside asyncio.timeout
        assert not sender.done()
        sender.cancel()
        return bad_effects, [good.task_id]

    bad_effects, _ = asyncio.run(scenario())
    assert type(bad_effects[1]).__name__ == "TaskErrored"
    assert "cannot be sent" in bad_effects[1].message  # type: ignore[attr-defined]
