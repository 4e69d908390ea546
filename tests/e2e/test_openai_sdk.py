"""The README's OpenAI compatibility table, row by row, with the official openai SDK against a real
master and sim workers. Each test name says which row it checks."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from exo_master.devtools.launcher import ClusterSpec, LocalCluster

pytestmark = pytest.mark.e2e
MODEL = "sim-model"
MESSAGES = [{"role": "user", "content": "Say hello"}]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    log_dir: Path = tmp_path_factory.mktemp("sdk-cluster")
    with LocalCluster(ClusterSpec(workers=1, sim_tokens_per_s=500, log_dir=log_dir)) as started:
        started.start()
        yield started


@pytest.fixture
def client(cluster: LocalCluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.api_url}/v1", api_key="unused", max_retries=0, timeout=30)


def test_row_chat_completions_with_sdk_nulls(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,  # type: ignore[arg-type]
        max_completion_tokens=5,
        n=None,
        temperature=None,
        top_p=None,
        seed=3,
        stop=None,
        user="someone",
    )
    assert completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 5


def test_row_chat_stream_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 4
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


def test_row_harmless_values_accepted(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=2,
        presence_penalty=0,
        frequency_penalty=0,
        logit_bias={},
        logprobs=False,
        response_format={"type": "text"},
        tool_choice="none",
        tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
    )
    assert completion.choices[0].message.content


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"logprobs": True, "top_logprobs": 2}, "logprobs"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"tool_choice": "required"}, "tool_choice"),  # no tools to call
        ({"reasoning_effort": "high"}, "reasoning_effort"),
        ({"n": 2}, "n"),
    ],
)
def test_row_refused_parameters_name_the_param(
    client: openai.OpenAI, kwargs: dict[str, object], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, **kwargs)  # type: ignore[call-overload]
    assert caught.value.param == param


def test_row_legacy_completions(client: openai.OpenAI) -> None:
    completion = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=3, seed=1)
    assert completion.object == "text_completion"
    assert len(completion.choices[0].text.split()) == 3
    again = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=3, seed=1)
    assert again.choices[0].text == completion.choices[0].text  # the sim engine is deterministic
    pieces = list(
        client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=3, seed=1, stream=True)
    )
    assert "".join(p.choices[0].text for p in pieces if p.choices) == completion.choices[0].text
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt="x", echo=True)
    assert caught.value.param == "echo"


def test_row_models_list_and_retrieve(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_row_images_generate_and_edit(client: openai.OpenAI) -> None:
    generated = client.images.generate(model=MODEL, prompt="a cat", response_format="b64_json")
    assert generated.data and generated.data[0].b64_json
    edited = client.images.edit(
        model=MODEL, image=("cat.png", b"\x89PNG fake", "image/png"), prompt="add a hat"
    )
    assert edited.data and base64.b64decode(edited.data[0].b64_json or "")
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(
            model=MODEL,
            image=("cat.png", b"\x89PNG fake", "image/png"),
            mask=("mask.png", b"m", "image/png"),
            prompt="add a hat",
        )
    assert caught.value.param == "mask"


def test_row_bounds_through_the_sdk(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, seed=2**64)  # type: ignore[arg-type]
    assert caught.value.param == "seed"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2**64)  # type: ignore[arg-type]
    assert caught.value.param == "max_tokens"
