"""Failures with real processes: a worker dies mid-task, the master restarts."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from exo_master.devtools.launcher import ClusterSpec, LocalCluster, wait_for
from exo_master.devtools.ports import free_port_pair
from tests.e2e.conftest import ClusterFactory
from tests.support.loadgen import burst, spread

pytestmark = pytest.mark.e2e
Stream = tuple[str, AsyncIterator[str]]
BODY = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}


async def _stream_until_first_token(http: httpx.AsyncClient, stack: contextlib.AsyncExitStack) -> Stream:
    response = await stack.enter_async_context(
        http.stream("POST", "/v1/chat/completions", json={**BODY, "stream": True})
    )
    assert response.status_code == 200
    lines = response.aiter_lines()
    async for line in lines:
        if '"content":"' in line and '"content":""' not in line:
            break  # output has reached the client: the task can no longer be silently re-run
    return response.headers["x-exo-node"], lines


async def _rest_of(lines: AsyncIterator[str]) -> list[str]:
    return [line async for line in lines if line.startswith("data: ")]


async def _kill_a_worker_mid_stream(cluster: LocalCluster) -> dict[str, list[str]]:
    async with (
        httpx.AsyncClient(base_url=cluster.api_url, timeout=60) as http,
        contextlib.AsyncExitStack() as stack,
    ):
        streams = dict([await _stream_until_first_token(http, stack) for _ in range(2)])
        assert set(streams) == {"node1", "node2"}
        process = cluster.workers["node1"]
        process.kill()
        await asyncio.to_thread(process.wait)
        return {node: await _rest_of(lines) for node, lines in streams.items()}


def test_a_dead_worker_fails_its_running_task_with_a_clear_error(start_cluster: ClusterFactory) -> None:
    cluster = start_cluster(workers=2, sim_tokens_per_s=50, heartbeat_interval=0.2)
    rest = asyncio.run(_kill_a_worker_mid_stream(cluster))
    survivor, victim = rest["node2"], rest["node1"]
    assert survivor[-1] == "data: [DONE]" and any('"finish_reason":"length"' in line for line in survivor)
    error = json.loads(victim[-2].removeprefix("data: "))["error"]
    assert victim[-1] == "data: [DONE]"
    assert error["code"] == "instance_lost" and "node1 stopped responding" in error["message"]
    # The cluster keeps serving on the survivor.
    assert spread(asyncio.run(burst(cluster.api_url, 4, max_tokens=4))) == [4]


def test_a_restarted_master_rebuilds_its_state_from_heartbeats(start_cluster: ClusterFactory) -> None:
    cluster = start_cluster(workers=2, sim_tokens_per_s=20, heartbeat_interval=0.2)
    assert cluster.master is not None
    cluster.stop_process(cluster.master)
    cluster.start_master()
    state = cluster.wait_ready(2, timeout=30)
    assert {n["node_id"] for n in state["nodes"]} == {"node1", "node2"}
    assert spread(asyncio.run(burst(cluster.api_url, 16))) == [8, 8]


def test_a_second_worker_with_a_taken_node_id_is_refused_and_exits_2(start_cluster: ClusterFactory) -> None:
    cluster = start_cluster(workers=1, heartbeat_interval=0.2)
    original = cluster.workers["node1"]
    duplicate = cluster.start_worker("node1")  # the same --node-id as the running worker
    cluster.workers["node1"] = original  # the launcher stops the one that keeps running
    assert duplicate.wait(timeout=30) == 2
    log = (cluster.spec.log_dir / "node1.log").read_text() if cluster.spec.log_dir else ""
    assert "already served by another running worker" in log
    # The first worker still serves, alone: nothing interleaves into a client's stream.
    assert original.poll() is None
    state = cluster.state()
    assert state is not None and [n["node_id"] for n in state["nodes"]] == ["node1"]
    assert spread(asyncio.run(burst(cluster.api_url, 4, max_tokens=4))) == [4]
    metrics = httpx.get(f"{cluster.api_url}/metrics").text
    assert "exo_bus_duplicate_node_messages_total" in metrics


def test_a_restarted_worker_with_the_same_node_id_is_admitted(start_cluster: ClusterFactory) -> None:
    cluster = start_cluster(workers=1, heartbeat_interval=0.2)
    old = cluster.workers["node1"]
    old.kill()
    old.wait()
    cluster.start_worker("node1")  # a new process, a new incarnation: admitted once the old is silent
    cluster.wait_ready(1, timeout=30)
    assert spread(asyncio.run(burst(cluster.api_url, 4, max_tokens=4))) == [4]


def test_a_worker_that_cannot_reach_its_master_says_where_it_looks(tmp_path: Path) -> None:
    nowhere = free_port_pair()
    cluster = LocalCluster(ClusterSpec(workers=0, heartbeat_interval=0.2, log_dir=tmp_path))
    try:
        cluster.spec.worker_master = f"127.0.0.1:{nowhere}"
        cluster.start_worker("lost")
        log = tmp_path / "lost.log"

        def said_twice() -> bool:
            lines = log.read_text().splitlines() if log.exists() else []
            return sum("master.unreachable" in line and f":{nowhere}" in line for line in lines) >= 2

        wait_for(said_twice, timeout=30, what="two master.unreachable lines naming the address")
    finally:
        cluster.stop()
