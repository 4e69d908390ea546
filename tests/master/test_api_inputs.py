"""Bad HTTP input is a clear OpenAI-style 4xx naming the field, never a 500; the app keeps serving.

Everything runs in-process (tests/master/api_harness.py): the real app, runtime and core, no bus.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exo_master.http.bounds import ApiLimits
from exo_master.http.openai_schema import MAX_SEED, MAX_TOKENS_LIMIT
from tests.master.api_harness import InProcess, in_process

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
IMAGE = {"model": "m", "prompt": "a cat"}


@pytest.fixture(scope="module")
def harness() -> InProcess:
    return in_process()


def error_of(response: Any) -> dict[str, Any]:
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return dict(body["error"])


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {**CHAT, "seed": 2**64}, "seed"),
        ("/v1/chat/completions", {**CHAT, "seed": -(2**63) - 1}, "seed"),
        ("/v1/chat/completions", {**CHAT, "seed": -1}, "seed"),
        ("/v1/chat/completions", {**CHAT, "seed": MAX_SEED + 1}, "seed"),
        ("/v1/chat/completions", {**CHAT, "max_tokens": 2**64}, "max_tokens"),
        ("/v1/chat/completions", {**CHAT, "max_tokens": MAX_TOKENS_LIMIT + 1}, "max_tokens"),
        ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 2**70}, "max_completion_tokens"),
        ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, "max_tokens"),
        ("/v1/chat/completions", {**CHAT, "n": 2}, "n"),
        ("/v1/completions", {"model": "m", "prompt": "x", "seed": 2**64}, "seed"),
        ("/v1/completions", {"model": "m", "prompt": "x", "max_tokens": 2**64}, "max_tokens"),
        ("/v1/completions", {"model": "m", "prompt": [1, 2, 3]}, "prompt"),
        ("/v1/completions", {"model": "m", "prompt": ""}, "prompt"),
        ("/v1/images/generations", {**IMAGE, "seed": 2**64}, "seed"),
        ("/v1/images/generations", {**IMAGE, "seed": -(2**63) - 1}, "seed"),
        ("/v1/images/generations", {**IMAGE, "size": "huge"}, "size"),
    ],
)
def test_out_of_range_values_are_a_400_naming_the_field(
    harness: InProcess, path: str, body: dict[str, Any], param: str
) -> None:
    response = harness.client().post(path, json=body)
    assert response.status_code == 400, response.text
    assert error_of(response)["param"] == param


def test_largest_allowed_values_are_served(harness: InProcess) -> None:
    client = harness.client()
    response = client.post(
        "/v1/chat/completions", json={**CHAT, "seed": MAX_SEED, "max_tokens": MAX_TOKENS_LIMIT}
    )
    assert response.status_code == 200, response.text
    assert client.post("/v1/images/generations", json={**IMAGE, "seed": MAX_SEED}).status_code == 200


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model":' + b"[" * 10_000 + b"]" * 10_000 + b"}",
        b'{"model": "m", "messages": [], "x": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
        b'{"model":"m","messages":[{"role":"user","content":"\xff\xfe"}]}',
        b"not json",
        b"",
        b"[]",
        b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]',
    ],
)
def test_malformed_bodies_are_a_400(harness: InProcess, raw: bytes) -> None:
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/images/generations"):
        response = harness.client().post(path, content=raw, headers={"content-type": "application/json"})
        assert response.status_code == 400, (path, response.text)
        error_of(response)


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("tasks=99999999999999999999", "tasks"),
        ("tasks=-1", "tasks"),
        ("tasks=abc", "tasks"),
        ("tasks=1e3", "tasks"),
        ("tasks=10001", "tasks"),
        ("status=bogus", "status"),
    ],
)
def test_bad_query_values_are_a_400(harness: InProcess, query: str, param: str) -> None:
    response = harness.client().get(f"/v1/cluster/state?{query}")
    assert response.status_code == 400, response.text
    assert error_of(response)["param"] == param


def test_body_over_the_limit_is_a_413_before_anything_runs() -> None:
    harness = in_process(limits=ApiLimits(max_body_bytes=1000))
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 2000}]}
    response = harness.client().post("/v1/chat/completions", json=big)
    assert response.status_code == 413
    assert error_of(response)["code"] == "body_too_large"
    assert harness.worker.assigned == []
    assert harness.client().post("/v1/chat/completions", json=CHAT).status_code == 200


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/images/generations"])
def test_prompt_over_the_limit_is_a_413_and_never_reaches_a_worker(path: str) -> None:
    harness = in_process(limits=ApiLimits(max_prompt_chars=100))
    long = "word " * 50
    body = {
        "/v1/chat/completions": {**CHAT, "messages": [{"role": "user", "content": long}]},
        "/v1/completions": {"model": "m", "prompt": long},
        "/v1/images/generations": {**IMAGE, "prompt": long},
    }[path]
    response = harness.client().post(path, json=body)
    assert response.status_code == 413, response.text
    assert error_of(response)["code"] == "prompt_too_large"
    assert harness.worker.assigned == []


# ---- hypothesis: arbitrary JSON where fields are expected --------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)
CHAT_FIELDS = [
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed",
    "stream", "stream_options", "n", "logprobs", "top_logprobs", "presence_penalty",
    "frequency_penalty", "logit_bias", "response_format", "tools", "tool_choice", "prompt", "size",
    "echo", "suffix", "best_of",
]  # fmt: skip
bodies = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["m", "unknown"]) | json_values,
        "messages": st.just(CHAT["messages"]) | json_values,
        "prompt": st.just("tell me") | json_values,
        **{name: json_values for name in CHAT_FIELDS if name not in ("model", "messages", "prompt")},
    },
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=bodies, path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/images/generations"])
)
def test_no_request_body_gets_a_500(harness: InProcess, body: dict[str, Any], path: str) -> None:
    with harness.client() as client:
        response = client.post(path, content=json.dumps(body).encode())
        assert response.status_code < 500, (body, response.text)
        if response.status_code != 200:
            error_of(response)
        assert client.get("/health").status_code == 200


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    raw=st.binary(max_size=300),
    boundary=st.sampled_from(["", "; boundary=xx", "; boundary="]),
    fields=st.dictionaries(
        st.sampled_from(["model", "prompt", "n", "size", "seed", "mask"]), st.text(max_size=30)
    ),
)
def test_no_multipart_body_gets_a_500(
    harness: InProcess, raw: bytes, boundary: str, fields: dict[str, str]
) -> None:
    with harness.client() as client:
        response = client.post(
            "/v1/images/edits", content=raw, headers={"content-type": f"multipart/form-data{boundary}"}
        )
        assert response.status_code < 500, response.text
        formed = client.post(
            "/v1/images/edits", data=fields, files={"image": ("a.png", raw or b"x", "image/png")}
        )
        assert formed.status_code < 500, (fields, formed.text)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tasks=st.text(max_size=25), status=st.text(max_size=12))
def test_no_query_value_gets_a_500(harness: InProcess, tasks: str, status: str) -> None:
    response = harness.client().get("/v1/cluster/state", params={"tasks": tasks, "status": status})
    assert response.status_code in (200, 400), response.text


def test_a_body_that_trickles_in_forever_is_cut_at_the_deadline() -> None:
    """The body deadline is absolute: bytes arriving now and then never extend it."""

    async def scenario() -> tuple[list[dict[str, Any]], int]:
        sent: list[dict[str, Any]] = []
        reads = 0

        async def receive() -> dict[str, Any]:
            nonlocal reads
            reads += 1
            await asyncio.sleep(0.02)  # wait-ok: the client's pace, one byte every 20 ms
            return {"type": "http.request", "body": b" ", "more_body": True}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        app = in_process(limits=ApiLimits(body_timeout_s=0.2)).app
        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
        async with asyncio.timeout(10):  # an idle-time deadline would never fire: this would
            await app(scope, receive, send)  # type: ignore[arg-type]
        return sent, reads

    sent, reads = asyncio.run(scenario())
    assert sent[0]["status"] == 408
    assert b'"code":"body_timeout"' in sent[1]["body"]
    assert reads > 1  # bytes did arrive before the cut
