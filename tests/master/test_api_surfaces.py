"""The one route table, the one error mapper, and the decisions every surface makes, in process."""

from __future__ import annotations

from typing import Any

import pytest
from openai.types.chat import completion_create_params
from starlette.testclient import TestClient

from exo_master.core import CoreConfig, MasterCore
from exo_master.http.api import Api, api_routes, build_app
from exo_master.http.auth import secure_app
from exo_master.http.bounds import ApiLimits
from exo_master.http.inference_metrics import InferenceMetrics
from exo_master.http.openai_compat import CHAT_FIELDS
from exo_master.http.openai_schema import ChatCompletionRequest
from exo_master.http.response_store import ResponseStore
from exo_master.http.routes import ApiRoute, hot_routes, starlette_routes
from exo_master.runtime import MasterRuntime
from protocol.messages import ChatMessage
from tests.master.api_harness import InProcess, in_process

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def harness() -> InProcess:
    return in_process()


def _table() -> list[ApiRoute]:
    runtime = MasterRuntime(MasterCore(CoreConfig()), bus=None)
    return api_routes(Api(runtime, ApiLimits(), InferenceMetrics()))


def test_each_route_is_declared_once_and_the_fast_path_is_derived_from_the_table() -> None:
    table = _table()
    keys = [(r.method, r.path) for r in table]
    assert keys.count(("POST", "/v1/chat/completions")) == 1
    assert len(keys) == len(set(keys))
    hot = hot_routes(table)
    assert {("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/messages")} <= set(
        hot
    )
    with pytest.raises(AssertionError, match="declared twice"):
        starlette_routes([*table, table[0]])


def test_every_chat_field_of_the_openai_sdk_is_decided() -> None:
    sdk = set(completion_create_params.CompletionCreateParamsBase.__annotations__) | {"stream"}
    assert sdk <= set(CHAT_FIELDS), f"undecided: {sorted(sdk - set(CHAT_FIELDS))}"
    declared = set(ChatCompletionRequest.__struct_fields__)
    # Whatever is not merely harmless is read, so it is honoured or refused, never dropped unread.
    assert {name for name, decision in CHAT_FIELDS.items() if decision != "harmless"} <= declared


REFUSED_VALUES: dict[str, Any] = {
    "presence_penalty": 0.5,
    "frequency_penalty": 0.5,
    "logit_bias": {"1": 3},
    "logprobs": True,
    "top_logprobs": 2,
    "functions": [{"name": "f"}],
    "function_call": "auto",
    "reasoning_effort": "low",
    "verbosity": "high",
    "modalities": ["text", "audio"],
    "audio": {"voice": "alloy", "format": "wav"},
    "web_search_options": {},
    "moderation": {"mode": "strict"},
}


@pytest.mark.parametrize("name", sorted(n for n, d in CHAT_FIELDS.items() if d == "refused"))
def test_every_refused_chat_field_is_a_400_naming_it(harness: InProcess, name: str) -> None:
    response = harness.client().post("/v1/chat/completions", json={**CHAT, name: REFUSED_VALUES[name]})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == name


def test_harmless_fields_are_accepted(harness: InProcess) -> None:
    extra = {
        "metadata": {"a": "b"},
        "store": True,
        "user": "u",
        "safety_identifier": "s",
        "prompt_cache_key": "k",
        "service_tier": "auto",
        "prediction": {"type": "content", "content": "x"},
    }
    assert harness.client().post("/v1/chat/completions", json={**CHAT, **extra}).status_code == 200


@pytest.mark.parametrize(
    ("extra", "sentence"),
    [
        ({"temperature": 3}, "temperature must be between 0 and 2"),
        ({"top_p": 0}, "top_p must be greater than 0 and at most 1"),
        ({"max_tokens": 0}, "max_tokens must be between 1 and 32768"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop must have at most 4 items"),
        ({"presence_penalty": -3}, "presence_penalty must be between -2 and 2"),
    ],
)
def test_bound_errors_are_sentences_naming_the_param(
    harness: InProcess, extra: dict[str, Any], sentence: str
) -> None:
    error = harness.client().post("/v1/chat/completions", json={**CHAT, **extra}).json()["error"]
    assert error["message"] == sentence
    assert error["param"] == next(iter(extra))


def test_unknown_model_is_model_not_found_everywhere_listing_the_served_models(harness: InProcess) -> None:
    client = harness.client()
    chat = client.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
    retrieve = client.get("/v1/models/nope")
    for response in (chat, retrieve):
        error = response.json()["error"]
        assert (
            response.status_code == 404 and error["code"] == "model_not_found" and error["param"] == "model"
        )
        assert "served models: m" in error["message"]
    messages = client.post("/v1/messages", json={**CHAT, "model": "nope", "max_tokens": 3})
    assert messages.status_code == 404 and messages.json()["error"]["type"] == "not_found_error"
    ollama = client.post("/api/chat", json={**CHAT, "model": "nope"})
    assert ollama.status_code == 404 and "served models: m" in ollama.json()["error"]
    assert client.post("/api/generate", json={"model": "nope"}).status_code == 404  # the "load" call
    assert client.post("/api/generate", json={"model": "m"}).json()["done"] is True


def test_each_surface_answers_errors_in_its_own_shape(harness: InProcess) -> None:
    client = harness.client()
    anthropic = client.post("/v1/messages", json={**CHAT, "max_tokens": 0}).json()
    assert anthropic == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "max_tokens must be between 1 and 32768"},
    }
    assert client.post("/api/chat", json={"model": "m"}).json() == {
        "error": "invalid request: Object missing required field `messages`"
    }
    responses = client.post(
        "/v1/responses", json={"model": "m", "input": "x", "reasoning": {"effort": "high"}}
    )
    assert responses.json()["error"]["param"] == "reasoning"


def test_tool_choice_mistakes_are_400s_naming_tool_choice(harness: InProcess) -> None:
    client = harness.client()
    tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
    for body in (
        {**CHAT, "tool_choice": "required"},
        {**CHAT, "tools": [tool], "tool_choice": {"type": "function", "function": {"name": "g"}}},
    ):
        error = client.post("/v1/chat/completions", json=body).json()["error"]
        assert error["param"] == "tool_choice", error


def test_the_surfaces_run_through_the_one_text_path(harness: InProcess) -> None:
    client = harness.client()
    anthropic = client.post("/v1/messages", json={**CHAT, "max_tokens": 4}).json()
    assert anthropic["content"] == [{"type": "text", "text": "alpha beta gamma delta"}]
    assert anthropic["stop_reason"] == "max_tokens"
    response = client.post("/v1/responses", json={"model": "m", "input": "hi", "max_output_tokens": 4}).json()
    assert response["output"][0]["content"][0]["text"] == "alpha beta gamma delta"
    lines = client.post("/api/chat", json={**CHAT, "options": {"num_predict": 2}}).text.splitlines()
    assert len(lines) == 3 and '"done":true' in lines[-1]


def test_x_api_key_is_an_api_key_and_401s_take_the_surface_shape() -> None:
    runtime = MasterRuntime(MasterCore(CoreConfig()), bus=None)
    client = TestClient(secure_app(build_app(runtime), ["sk-1"], []))
    assert client.get("/v1/models", headers={"x-api-key": "sk-1"}).status_code == 200
    assert client.get("/v1/models", headers={"x-api-key": "sk-2"}).status_code == 401
    denied = client.post("/v1/messages", json={}, headers={"x-api-key": "sk-2"})
    assert denied.status_code == 401 and denied.json()["error"]["type"] == "authentication_error"
    assert "error" in client.get("/api/tags").json() and client.get("/api/tags").status_code == 401


def test_the_response_store_is_bounded_in_count_and_age() -> None:
    now = [0.0]
    store = ResponseStore(limit=2, ttl_s=10, clock=lambda: now[0])
    turn = (ChatMessage(role="user", content="hi"),)
    for name in ("a", "b", "c"):
        store.put(name, turn)
    assert store.get("a") is None and store.get("b") == turn and len(store) == 2
    now[0] = 10.5
    assert store.get("c") is None and len(store) == 0
