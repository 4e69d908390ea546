"""The OpenAI-compatible API against a real master and sim workers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import openai
import pytest

from exo_master.devtools.launcher import ClusterSpec, LocalCluster, wait_for
from tests.e2e.conftest import ClusterFactory

pytestmark = pytest.mark.e2e
MODEL = "sim-model"
MESSAGES = [{"role": "user", "content": "Say hello"}]


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    spec = ClusterSpec(
        workers=2,
        sim_tokens_per_s=200,
        max_concurrency=2,
        master_args=["--queue-limit", "2"],
        log_dir=tmp_path_factory.mktemp("api-cluster"),
    )
    with LocalCluster(spec) as started:
        started.start()
        yield started


@pytest.fixture
def cluster(shared_cluster: LocalCluster) -> LocalCluster:
    """One cluster for the module (a start costs 3 s); each test begins on it idle."""
    wait_for(lambda: _instance_loads(shared_cluster) == 0, 15, "the shared cluster to be idle")
    return shared_cluster


def client_for(cluster: LocalCluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.api_url}/v1", api_key="unused", max_retries=0)


def test_non_streaming_completion_through_the_openai_client(cluster: LocalCluster) -> None:
    raw = client_for(cluster).chat.completions.with_raw_response.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=12,
        seed=7,  # type: ignore[arg-type]
    )
    completion = raw.parse()
    assert raw.headers["x-exo-instance"] in {"node1/0", "node2/0"}
    assert raw.headers["x-exo-node"] in {"node1", "node2"}
    assert raw.headers["x-exo-task"] == completion.id
    assert completion.choices[0].finish_reason == "length"
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.completion_tokens == 12


def test_streaming_completion_through_the_openai_client(cluster: LocalCluster) -> None:
    stream = client_for(cluster).chat.completions.create(
        model=MODEL,
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces).strip()
    assert finish == "length"
    assert usage is not None and usage.completion_tokens == 10


def test_same_seed_gives_the_same_text(cluster: LocalCluster) -> None:
    client = client_for(cluster)
    texts = {
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, seed=3)
        .choices[0]
        .message.content  # type: ignore[arg-type]
        for _ in range(2)
    }
    assert len(texts) == 1


def _instance_loads(cluster: LocalCluster) -> int:
    state = cluster.state()
    assert state is not None
    return sum(i["in_flight"] + i["pending"] for i in state["instances"])


def test_client_disconnect_mid_stream_cancels_and_frees_the_slot(start_cluster: ClusterFactory) -> None:
    cluster = start_cluster(workers=1, sim_tokens_per_s=5, max_concurrency=1)
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 500, "stream": True}
    with httpx.Client(base_url=cluster.api_url, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            task_id = response.headers["x-exo-task"]
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            assert _instance_loads(cluster) == 1
        # The stream is closed mid-generation: the task must be cancelled and its slot freed.
        wait_for(lambda: _instance_loads(cluster) == 0, 15, "the slot to be freed")

        def worker_dropped_it() -> bool:
            state = cluster.state(tasks=50)
            assert state is not None
            return any(t["task_id"] == task_id and t["status"] == "cancelled" for t in state["tasks"])

        wait_for(worker_dropped_it, 15, "the task to show as cancelled")
        # The freed slot serves the next request at once (max_concurrency is 1).
        r = http.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 3})
        assert r.status_code == 200


def _post(cluster: LocalCluster, body: object, raw: bytes | None = None) -> httpx.Response:
    url = f"{cluster.api_url}/v1/chat/completions"
    if raw is not None:
        return httpx.post(url, content=raw, headers={"content-type": "application/json"}, timeout=10)
    return httpx.post(url, json=body, timeout=10)


def _error(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    return error  # type: ignore[no-any-return]


def test_bad_requests_get_openai_style_errors(cluster: LocalCluster) -> None:
    _error(_post(cluster, None, raw=b"{not json"), 400)
    assert (
        _error(_post(cluster, {"model": MODEL, "messages": MESSAGES, "temperature": 9}), 400)["param"]
        == "temperature"
    )
    assert _error(_post(cluster, {"model": MODEL}), 400)["type"] == "invalid_request_error"
    _error(_post(cluster, {"model": MODEL, "messages": []}), 400)
    _error(_post(cluster, {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}), 400)
    _error(_post(cluster, {"model": MODEL, "messages": MESSAGES, "max_tokens": 0}), 400)
    _error(_post(cluster, [1, 2, 3]), 400)
    unknown = _error(_post(cluster, {"model": "no-such-model", "messages": MESSAGES}), 404)
    assert unknown["code"] == "model_not_found"
    assert unknown["param"] == "model"
    assert MODEL in unknown["message"]  # the served models are listed
    _error(httpx.get(f"{cluster.api_url}/v1/nothing-here"), 404)


async def _fill_and_overflow(cluster: LocalCluster) -> httpx.Response:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2000}
    async with httpx.AsyncClient(base_url=cluster.api_url, timeout=60) as http:
        # 2 instances x 2 slots run, 2 more wait in the queue (limit 2): the 7th is refused.
        held = [asyncio.create_task(http.post("/v1/chat/completions", json=body)) for _ in range(6)]

        def full() -> bool:
            state = cluster.state()
            return state is not None and sum(m["queued"] for m in state["models"]) == 2

        await asyncio.to_thread(wait_for, full, 15, "4 running and 2 queued requests")
        overflow = await http.post("/v1/chat/completions", json=body)
        for task in held:
            task.cancel()
        await asyncio.gather(*held, return_exceptions=True)
    return overflow


def test_queue_full_is_429(cluster: LocalCluster) -> None:
    error = _error(asyncio.run(_fill_and_overflow(cluster)), 429)
    assert error["code"] == "queue_full"
    # The abandoned requests were cancelled: every slot and the queue drain.
    wait_for(lambda: _instance_loads(cluster) == 0, 15, "abandoned requests to be cancelled")


def test_no_live_instance_is_503(start_cluster: ClusterFactory) -> None:
    cluster = start_cluster(workers=1, heartbeat_interval=0.2)
    worker = cluster.workers["node1"]
    worker.kill()
    worker.wait()

    def node_dead() -> bool:
        state = cluster.state()
        return state is not None and not any(n["alive"] for n in state["nodes"])

    wait_for(node_dead, 15, "the master to declare the worker dead")
    assert _error(_post(cluster, {"model": MODEL, "messages": MESSAGES}), 503)["code"] == "no_live_instance"
    models = httpx.get(f"{cluster.api_url}/v1/models", timeout=5).json()
    assert models["data"] == []


def test_models_and_health(cluster: LocalCluster) -> None:
    models = httpx.get(f"{cluster.api_url}/v1/models", timeout=5).json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    health = httpx.get(f"{cluster.api_url}/health", timeout=5).json()
    assert health["status"] == "ok" and health["nodes_alive"] == 2 and health["instances_ready"] == 2


async def _cancel_from_outside(cluster: LocalCluster) -> tuple[list[str], httpx.Response]:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 5000}
    async with httpx.AsyncClient(base_url=cluster.api_url, timeout=60) as http:
        async with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as streaming:
            streamed_task = streaming.headers["x-exo-task"]
            plain = asyncio.create_task(http.post("/v1/chat/completions", json=body))

            def both_running() -> list[str]:
                state = cluster.state(tasks=10)
                assert state is not None
                return [t["task_id"] for t in state["tasks"] if t["status"] == "running"]

            running = await asyncio.to_thread(
                wait_for, lambda: len(both_running()) == 2 and both_running(), 15, "two running tasks"
            )
            for task_id in running:
                assert (await http.post(f"/v1/tasks/{task_id}/cancel")).status_code == 200
            lines = [line async for line in streaming.aiter_lines() if line.startswith("data: ")]
            assert streamed_task in running
        return lines, await plain


def test_an_operator_cancel_ends_the_waiting_requests_with_a_clear_error(cluster: LocalCluster) -> None:
    lines, plain = asyncio.run(_cancel_from_outside(cluster))
    assert lines[-1] == "data: [DONE]"
    assert '"code":"cancelled"' in lines[-2]
    assert _error(plain, 409)["code"] == "cancelled"


def test_image_generation_takes_the_same_placement_path(cluster: LocalCluster) -> None:
    response = httpx.post(
        f"{cluster.api_url}/v1/images/generations",
        json={"model": MODEL, "prompt": "a red fox", "seed": 1},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    assert response.json()["data"][0]["b64_json"]
    assert response.headers["x-exo-instance"] in {"node1/0", "node2/0"}
    bad = httpx.post(
        f"{cluster.api_url}/v1/images/generations", json={"model": MODEL, "prompt": "x", "size": "big"}
    )
    assert _error(bad, 400)["param"] == "size"
