"""Real inference end to end: a master and two MLX workers serving the tiny offline llama."""

from __future__ import annotations

import asyncio
from pathlib import Path

import anthropic
import ollama
import openai
import pytest

from exo_master.devtools.launcher import LocalCluster
from tests.e2e.conftest import ClusterFactory
from tests.support.loadgen import burst, spread

pytestmark = [pytest.mark.e2e, pytest.mark.mlx]


@pytest.fixture
def mlx_cluster(start_cluster: ClusterFactory, tiny_model_dir: Path) -> LocalCluster:
    return start_cluster(workers=2, engine="mlx", model=str(tiny_model_dir), max_concurrency=4)


def test_mlx_workers_serve_the_openai_client_and_split_a_burst(
    mlx_cluster: LocalCluster, tiny_model_dir: Path
) -> None:
    model = tiny_model_dir.name  # a local model directory is served under its folder name
    client = openai.OpenAI(base_url=f"{mlx_cluster.api_url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "hello there"}]

    completion = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=8,
        temperature=0.0,  # type: ignore[arg-type]
    )
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.prompt_tokens > 0
    assert completion.choices[0].finish_reason in {"length", "stop"}

    stream = client.chat.completions.create(
        model=model,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=8,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == completion.choices[0].message.content  # greedy: same text either way
    assert chunks[-1].usage is not None

    # The same greedy answer through the other surfaces' own clients.
    claude = anthropic.Anthropic(base_url=mlx_cluster.api_url, api_key="unused", max_retries=0)
    message = claude.messages.create(
        model=model,
        max_tokens=8,
        messages=messages,
        extra_body={"temperature": 0.0},  # type: ignore[arg-type]
    )
    assert message.content[0].text == streamed  # type: ignore[union-attr]
    response = client.responses.create(model=model, input=messages, max_output_tokens=8, temperature=0.0)  # type: ignore[arg-type]
    assert response.output_text == streamed
    local = ollama.Client(host=mlx_cluster.api_url)
    answer = local.chat(
        model=model, messages=messages, stream=False, options={"num_predict": 8, "temperature": 0}
    )
    assert answer.message.content == streamed

    assert spread(asyncio.run(burst(mlx_cluster.api_url, 8, model=model, max_tokens=200))) == [4, 4]
