"""Sharded placements through /v1/instances in-process: the preview lists each rank (node, ring
address, layers), a shard count that cannot work is a 409 naming the problem, the placement row
shows every rank, and exoctl renders both."""

from __future__ import annotations

import msgspec
from rich.console import Console
from starlette.testclient import TestClient

from exo_master.core import CoreConfig, MasterCore
from exo_master.core.events import NodeSubscribed
from exo_master.exoctl.instances import plan_table, replicas_table
from exo_master.http.api import build_app
from exo_master.runtime import MasterRuntime
from protocol.ids import ModelId, NodeId
from protocol.instance_view import PlacementRow, PlanView
from protocol.messages import LoadInstance, LocalModel, WorkerHeartbeat
from protocol.sharding import RingPorts
from tests.master.test_shard_controller import SHAPE

GIB = 2**30
LOCAL = LocalModel(model=ModelId("smol"), weights_bytes=GIB, kv_bytes_per_token=1000, shape=SHAPE)


def setup() -> tuple[TestClient, list[LoadInstance]]:
    runtime = MasterRuntime(MasterCore(CoreConfig(heartbeat_liveness=1000)), bus=None)
    runtime.core.instances.restore((), float("-inf"))
    sent: list[LoadInstance] = []
    runtime.effect_observers.append(lambda e: sent.append(e) if isinstance(e, LoadInstance) else None)
    for index, name in enumerate(("a", "b", "c", "sim")):
        runtime.core.handle(NodeSubscribed(node_id=NodeId(name)), runtime.clock())
        ring = RingPorts(host="10.0.0.1", first=7000 + 100 * index, last=7099 + 100 * index)
        beat = WorkerHeartbeat(
            node_id=NodeId(name),
            memory_total=16 * GIB,
            memory_available=(8 - index) * GIB,
            models=(LOCAL,),
            ring=None if name == "sim" else ring,
        )
        runtime.core.handle(beat, runtime.clock())
    return TestClient(build_app(runtime)), sent


def render(thing: object) -> str:
    console = Console(width=160, record=True)
    console.print(thing)
    return console.export_text()


def test_the_preview_lists_every_rank_and_a_node_that_cannot_run_one() -> None:
    client, sent = setup()
    query = {"model": "smol", "shards": "2", "sharding": "pipeline"}
    body = client.get("/v1/instances/preview", params=query).json()
    assert body["fits"] and body["shards"] == 2 and body["sharding"] == "pipeline"
    (ranks,) = body["ranks"]
    assert [(r["rank"], r["node_id"]) for r in ranks] == [(0, "a"), (1, "b")]  # the most free memory
    assert ranks[0]["layers"][0] == 0 and ranks[1]["layers"][1] == 30
    assert ranks[0]["layers"][1] == ranks[1]["layers"][0]
    assert "cannot run a rank" in body["reasons"]["sim"]
    text = render(plan_table(msgspec.convert(body, PlanView)))
    assert "10.0.0.1:7000" in text and "cannot run a rank" in text
    assert sent == []


def test_a_shard_count_the_model_cannot_take_is_a_409_naming_why() -> None:
    client, sent = setup()
    response = client.post("/v1/instances", json={"model": "smol", "shards": 2, "sharding": "tensor"})
    assert response.status_code == 409
    error = response.json()["error"]
    assert error["code"] == "cannot_shard"
    assert "attention heads (9) do not divide by 2" in error["message"]
    too_many = client.post("/v1/instances", json={"model": "smol", "shards": 4, "sharding": "pipeline"})
    assert "4 shards need 4 nodes, only 3 available" in too_many.json()["error"]["message"]
    assert client.post("/v1/instances", json={"model": "smol", "shards": 0}).status_code == 400
    assert client.post("/v1/instances", json={"model": "smol", "sharding": "diagonal"}).status_code == 400
    assert sent == []


def test_a_placed_sharded_instance_shows_its_ranks() -> None:
    client, sent = setup()
    response = client.post("/v1/instances", json={"model": "smol", "shards": 3, "sharding": "tensor"})
    assert response.status_code == 201, response.text
    row = response.json()
    assert row["shards"] == 3 and row["sharding"] == "tensor" and row["ready"] == 0
    assert sorted((r["rank"], r["node_id"]) for r in row["instances"]) == [(0, "a"), (1, "b"), (2, "c")]
    assert len({r["group"] for r in row["instances"]}) == 1
    assert sorted(s.node_id for s in sent) == ["a", "b", "c"]
    text = render(replicas_table(msgspec.convert(row, PlacementRow)))
    assert "3 tensor shards each" in text and "0/3" in text and "2/3" in text
