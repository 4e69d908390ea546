"""Long prompts end to end, with sim workers that model prefill (cheap and deterministic): a prompt
over the context is a 400 context_length_exceeded through the openai SDK, within a second and not
re-placed; a missing max_tokens is capped by the context; a cancelled prefill keeps its slot
counted (`unowned`) until the engine lets go, then frees it within a chunk and a heartbeat."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from exo_master.devtools.launcher import ClusterSpec, LocalCluster, wait_for

pytestmark = pytest.mark.e2e
MODEL = "sim-model"
CONTEXT = 2000  # words: the sim engine's tokens
PREFILL_RATE = 400  # words per second, in chunks of 100 (0.25 s)


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    log_dir: Path = tmp_path_factory.mktemp("long-prompts")
    spec = ClusterSpec(
        workers=1,
        sim_tokens_per_s=200,
        heartbeat_interval=0.25,
        log_dir=log_dir,
        worker_args=[
            "--sim-context-length", str(CONTEXT),
            "--sim-prefill-tokens-per-s", str(PREFILL_RATE),
            "--prefill-chunk", "100",
        ],
    )  # fmt: skip
    with LocalCluster(spec) as started:
        started.start()
        yield started


@pytest.fixture
def client(cluster: LocalCluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.api_url}/v1", api_key="unused", max_retries=0, timeout=30)


def instance_row(cluster: LocalCluster) -> dict[str, Any]:
    state = cluster.state()
    assert state is not None
    (row,) = state["instances"]
    return row  # type: ignore[no-any-return]


def test_a_prompt_over_the_context_is_a_400_context_length_exceeded(
    client: openai.OpenAI, cluster: LocalCluster
) -> None:
    t0 = time.monotonic()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": words(1990)}], max_tokens=100
        )
    assert time.monotonic() - t0 < 1.0
    error = caught.value
    assert error.code == "context_length_exceeded"
    assert "maximum context length is 2000 tokens" in error.message
    assert "you requested 2090 tokens (1990 in the messages, 100 in the completion)" in error.message
    row = instance_row(cluster)
    assert row["context_length"] == CONTEXT and row["failed"] >= 1


def test_without_max_tokens_the_completion_is_capped_by_the_context(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": words(1990)}]
    )
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 10


def test_a_cancelled_prefill_keeps_its_slot_until_the_engine_lets_go(cluster: LocalCluster) -> None:
    # The master answers the status line with the first token, so the request is sent on a raw
    # socket that the client closes while the prompt is still being prefilled (4.5 s of it).
    body = json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": words(1800)}], "max_tokens": 5}
    ).encode()
    url = httpx.URL(cluster.api_url)
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: {url.host}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection((url.host, url.port or 80), timeout=10) as conn:
        conn.sendall(head + body)
        wait_for(lambda: instance_row(cluster)["prefill_tokens"] > 0, 10, "the prompt to be prefilling")
    # The client went away: the master cancels the task, the engine stops at the next chunk.
    t0 = time.monotonic()
    wait_for(lambda: instance_row(cluster)["in_flight"] == 0, 10, "the task to end at the master")
    wait_for(
        lambda: (r := instance_row(cluster))["unowned"] == 0 and r["prefill_tokens"] == 0,
        10,
        "the engine to let go",
    )
    assert time.monotonic() - t0 < 2.0  # one chunk (0.25 s) and a heartbeat (0.25 s), not 4.5 s
    short = httpx.post(
        f"{cluster.api_url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
        timeout=10,
    )
    assert short.status_code == 200
