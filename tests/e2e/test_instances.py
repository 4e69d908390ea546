"""Instance placement with real processes: sim workers started without a model, placements through
the API. Two replicas over three workers; a replica's worker killed -9 comes back on the third;
a delete finishes the requests in flight with 200; a restarted master adopts what is loaded instead
of reloading; a placement that fits nowhere is a 409 naming each node's reason."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from exo_master.devtools.launcher import LocalCluster, wait_for
from tests.e2e.conftest import ClusterFactory
from tests.support.loadgen import burst, burst_responses

pytestmark = pytest.mark.e2e
HEARTBEAT = 0.2


def _workers(tmp_path: Path) -> dict[str, object]:
    return {
        "workers": 3,
        "managed": True,
        "heartbeat_interval": HEARTBEAT,
        "sim_tokens_per_s": 100,
        "max_concurrency": 8,
        "worker_args": [
            "--sim-memory",
            "4GiB",
            "--sim-model",
            "sim-model=1GiB:0.3",
            "--sim-model",
            "big=6GiB",
        ],
        "master_args": ["--state-dir", str(tmp_path / "state")],
    }


def _exoctl(cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "exo_master.exoctl.cli", "--api", cluster.api_url, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def _get(cluster: LocalCluster, path: str) -> Any:
    response = httpx.get(f"{cluster.api_url}{path}", timeout=5)
    assert response.status_code == 200, response.text
    return response.json()


def _ready_nodes(cluster: LocalCluster, placement_id: str, replicas: int) -> list[str] | None:
    row = _get(cluster, f"/v1/instances/{placement_id}")
    ready = sorted(i["node_id"] for i in row["instances"] if i["state"] == "ready")
    return ready if len(ready) == replicas and row["status"] == "ready" else None


def _loads_logged(cluster: LocalCluster) -> int:
    assert cluster.spec.log_dir is not None
    return sum(
        path.read_text().count('"event": "instance.load"') for path in cluster.spec.log_dir.glob("node*.log")
    )


def test_two_replicas_heal_onto_the_third_node_and_survive_a_master_restart(
    start_cluster: ClusterFactory, tmp_path: Path
) -> None:
    cluster = start_cluster(**_workers(tmp_path))
    placed = cluster.place("sim-model", replicas=2)
    first = sorted(i["node_id"] for i in placed["instances"])
    assert len(set(first)) == 2
    assert set(_get(cluster, "/v1/models")["data"][0].values()) >= {"sim-model"}
    assert len(set(asyncio.run(burst(cluster.api_url, 8, max_tokens=4)))) == 2

    # A master restart: the placement comes back from --state-dir, adopted, nothing reloaded.
    loads = _loads_logged(cluster)
    assert cluster.master is not None
    cluster.stop_process(cluster.master)
    cluster.start_master()
    cluster.wait_healthy(timeout=30)
    same = wait_for(lambda: _ready_nodes(cluster, placed["id"], 2), timeout=30, what="the adopted replicas")
    assert same == first
    assert _loads_logged(cluster) == loads
    row = _get(cluster, f"/v1/instances/{placed['id']}")
    assert {i["instance_id"] for i in row["instances"]} == {i["instance_id"] for i in placed["instances"]}
    assert "adopted" in [e["what"] for e in row["events"]]

    # kill -9 one replica's worker: the replica comes back on the third node; requests keep working.
    victim = first[0]
    process = cluster.workers.pop(victim)
    process.kill()
    process.wait()
    spare = ({"node1", "node2", "node3"} - set(first)).pop()
    healed = sorted({first[1], spare})
    wait_for(lambda: _ready_nodes(cluster, placed["id"], 2) == healed, timeout=30, what="the healed replica")
    assert len(set(asyncio.run(burst(cluster.api_url, 8, max_tokens=4)))) == 2


def test_a_delete_lets_requests_in_flight_finish_and_what_fits_nowhere_is_a_409(
    start_cluster: ClusterFactory, tmp_path: Path
) -> None:
    cluster = start_cluster(**_workers(tmp_path))
    refused = _exoctl(cluster, "instances", "place", "big")
    assert refused.returncode == 1 and "node1: not enough memory" in refused.stderr
    response = httpx.post(f"{cluster.api_url}/v1/instances", json={"model": "big"}, timeout=5)
    assert response.status_code == 409
    reasons = response.json()["error"]["reasons"]
    assert set(reasons) == {"node1", "node2", "node3"}
    assert all(why.startswith("not enough memory for one replica: needs 6.0 GiB") for why in reasons.values())

    done = _exoctl(cluster, "instances", "place", "sim-model", "--wait", "--json")
    assert done.returncode == 0, done.stderr
    placed = json.loads(done.stdout)
    assert placed["status"] == "ready"
    body = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 60}

    async def delete_during_requests() -> list[httpx.Response]:
        requests = asyncio.create_task(burst_responses(cluster.api_url, 4, body))

        def running() -> bool:
            state = httpx.get(f"{cluster.api_url}/v1/cluster/state", timeout=5).json()
            return sum(i["in_flight"] for i in state["instances"]) == 4

        await asyncio.to_thread(wait_for, running, 30, "4 requests running")
        deleted = await asyncio.to_thread(_exoctl, cluster, "instances", "delete", placed["id"])
        assert deleted.returncode == 0 and "draining" in deleted.stdout, deleted.stderr
        async with httpx.AsyncClient(base_url=cluster.api_url) as http:
            refused = await http.post("/v1/chat/completions", json=body)
            assert refused.status_code in (404, 503), refused.text  # no new request on a draining one
        return await requests

    responses = asyncio.run(delete_during_requests())
    assert [r.status_code for r in responses] == [200] * 4
    assert all(r.json()["choices"][0]["finish_reason"] == "length" for r in responses)

    def gone() -> bool:
        return (
            _get(cluster, "/v1/instances")["data"] == []
            and not _get(cluster, "/v1/cluster/state")["instances"]
        )

    wait_for(gone, timeout=30, what="the placement unloaded")
