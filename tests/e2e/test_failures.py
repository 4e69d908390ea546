"""Failures with real processes: a worker dies mid-task, the master restarts."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from exo_master.launcher import LocalCluster, wait_for
from tests.e2e.burst import burst, spread
from tests.e2e.conftest import ClusterFactory

pytestmark = pytest.mark.e2e
BODY = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}


async def _two_long_requests_then_kill(cluster: LocalCluster, victim: str) -> dict[str, httpx.Response]:
    async with httpx.AsyncClient(base_url=cluster.api_url, timeout=60) as http:
        requests = [asyncio.create_task(http.post("/v1/chat/completions", json=BODY)) for _ in range(2)]

        def both_streaming() -> bool:
            state = cluster.state()
            return state is not None and sum(i["in_flight"] for i in state["instances"]) == 2

        await asyncio.to_thread(wait_for, both_streaming, 15, "one running task per instance")
        process = cluster.workers[victim]
        process.kill()
        await asyncio.to_thread(process.wait)
        survivor_request, victim_request = None, None
        for response in await asyncio.gather(*requests):
            if response.status_code == 200:
                survivor_request = response
            else:
                victim_request = response
    assert survivor_request is not None and victim_request is not None
    return {"survivor": survivor_request, "victim": victim_request}


def test_a_dead_worker_fails_its_running_task_with_a_clear_error(start_cluster: ClusterFactory) -> None:
    cluster = start_cluster(workers=2, sim_tokens_per_s=50, heartbeat_interval=0.2)
    responses = asyncio.run(_two_long_requests_then_kill(cluster, "node1"))
    assert responses["survivor"].headers["x-exo-node"] == "node2"
    error = responses["victim"].json()["error"]
    assert responses["victim"].status_code == 503
    assert "node1 stopped responding" in error["message"]
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
