"""No peer can starve another (real processes, plaintext bus): a flood of made-up node ids does not
keep a new worker out, a full node table says so, and a stranger's unsubscription changes nothing
(one cluster for the flood and the unsubscription, to keep the suite short)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from exo_master.devtools.launcher import LocalCluster, wait_for
from protocol.ids import NodeId
from protocol.messages import WorkerHeartbeat
from tests.e2e.buspeer import BusPeer, raw_subscription_frames
from tests.e2e.conftest import ClusterFactory

pytestmark = pytest.mark.e2e

CHAT = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
FLOOD = 1_100  # fake node ids: more than the default node table (1,024)


def _metric(cluster: LocalCluster, name: str) -> float:
    try:
        text = httpx.get(f"{cluster.api_url}/metrics", headers=cluster.headers, timeout=10).text
    except httpx.HTTPError:
        return 0.0  # a busy master (the flood): the caller waits and asks again
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    return values[0] if values else 0.0


def _nodes(cluster: LocalCluster) -> dict[str, dict[str, object]]:
    state = cluster.state()
    return {n["node_id"]: n for n in state["nodes"]} if state is not None else {}


def _ready(cluster: LocalCluster, node_id: str) -> bool:
    state = cluster.state()
    return state is not None and any(
        i["node_id"] == node_id and i["status"] == "ready" for i in state["instances"]
    )


@pytest.fixture
def flooder() -> Iterator[list[BusPeer]]:
    made: list[BusPeer] = []
    yield made
    for peer in made:
        peer.close()


def test_a_new_worker_is_ready_within_seconds_of_a_fake_node_flood(
    start_cluster: ClusterFactory, flooder: list[BusPeer]
) -> None:
    cluster = start_cluster(workers=1, curve=False)
    peer = BusPeer(cluster, None, None)
    flooder.append(peer)
    stop = threading.Event()

    def flood() -> None:  # heartbeats from 1,100 made-up nodes, every second, until told
        while not stop.is_set():
            for i in range(FLOOD):
                peer.send(f"fake{i}", WorkerHeartbeat(node_id=NodeId(f"fake{i}"), instances=()))
            stop.wait(1.0)  # wait-ok: the flood's own pace, a heartbeat's

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    try:
        wait_for(lambda: _metric(cluster, "exo_refused_nodes_total") > 0, 30, "the node table to fill")
        started = time.monotonic()
        cluster.start_worker("late")
        wait_for(lambda: _ready(cluster, "late"), 30, "the new worker to be ready during the flood")
        print(f"ready {time.monotonic() - started:.1f} s after its start, during a {FLOOD}-node flood")
    finally:
        stop.set()
        thread.join(timeout=10)
    # The flood stopped: the fakes (never subscribed, no instance) are gone within seconds.
    # (3 s after the last fake is heard; a loaded machine may take a while to drain the flood)
    wait_for(lambda: set(_nodes(cluster)) == {"node1", "late"}, 45, "the fake nodes to be forgotten")
    # A stranger's raw unsubscription of node1's topic (plaintext: anyone can connect) changes nothing.
    raw_subscription_frames(cluster.bus_port, [b"\x00node/node1\x00"] * 3)
    wait_for(
        lambda: _metric(cluster, "exo_bus_unsubscriptions_ignored_total") >= 3, 15, "the unsubscriptions"
    )
    assert _nodes(cluster)["node1"]["subscribed"] is True
    served = set()
    for i in range(6):  # distinct chats: no prefix affinity, least-loaded alternates between the two
        body = {**CHAT, "messages": [{"role": "user", "content": f"hi {i}"}]}
        reply = httpx.post(f"{cluster.api_url}/v1/chat/completions", json=body, timeout=30)
        assert reply.status_code == 200
        served.add(reply.headers["x-exo-node"])
    assert served == {"node1", "late"}  # node1 is still in placement


def test_a_full_node_table_refuses_a_newcomer_with_a_reason(start_cluster: ClusterFactory) -> None:
    cluster = start_cluster(workers=2, curve=False, master_args=["--max-nodes", "2"])
    late = cluster.start_worker("late")
    late.wait(timeout=60)
    assert late.returncode == 2
    assert cluster.spec.log_dir is not None
    log = (cluster.spec.log_dir / "late.log").read_text()
    assert "node table is full" in log and "--max-nodes" in log, log[-2000:]
    assert set(_nodes(cluster)) == {"node1", "node2"}
