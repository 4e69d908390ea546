"""/v1/instances in-process: place (201 with where, 409 with a reason per node), list, show,
preview, delete (drains), the API key, /v1/models, and the state file written on each change."""

from __future__ import annotations

from pathlib import Path

from starlette.testclient import TestClient

from exo_master.core import CoreConfig, MasterCore
from exo_master.core.events import NodeSubscribed
from exo_master.http.api import build_app
from exo_master.http.auth import secure_app
from exo_master.runtime import MasterRuntime
from exo_master.store.state_file import StateStore
from protocol.ids import ModelId, NodeId
from protocol.messages import InstanceReport, LoadInstance, LocalModel, WorkerHeartbeat

GIB = 2**30
LOCAL = LocalModel(model=ModelId("m"), weights_bytes=2 * GIB)


def setup(tmp_path: Path, keys: tuple[str, ...] = ()) -> tuple[MasterRuntime, TestClient, list[LoadInstance]]:
    runtime = MasterRuntime(MasterCore(CoreConfig(heartbeat_liveness=1000)), bus=None)
    runtime.core.instances.restore((), float("-inf"))
    sent: list[LoadInstance] = []
    runtime.effect_observers.append(lambda e: sent.append(e) if isinstance(e, LoadInstance) else None)
    for name, free in (("a", 8), ("b", 6), ("c", 1)):
        runtime.core.handle(NodeSubscribed(node_id=NodeId(name)), runtime.clock())
        beat = WorkerHeartbeat(
            node_id=NodeId(name), memory_total=16 * GIB, memory_available=free * GIB, models=(LOCAL,)
        )
        runtime.core.handle(beat, runtime.clock())
    store = StateStore(tmp_path)
    runtime.save_desired = store.save
    app = build_app(runtime)
    return runtime, TestClient(secure_app(app, keys, ())), sent


def test_place_list_show_and_delete(tmp_path: Path) -> None:
    _, client, sent = setup(tmp_path)
    response = client.post("/v1/instances", json={"model": "m", "replicas": 2, "max_concurrency": 1})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["status"] == "loading" and body["managed"] and body["nodes"] == ["a", "b"]
    assert [(s.node_id, s.model) for s in sent] == [("a", "m"), ("b", "m")]
    assert [p.placement_id for p in StateStore(tmp_path).load()] == [body["id"]]
    assert client.get("/v1/models").json()["data"][0]["id"] == "m"

    listed = client.get("/v1/instances").json()["data"]
    assert [row["id"] for row in listed] == [body["id"]]
    shown = client.get(f"/v1/instances/{body['id']}").json()
    assert [e["what"] for e in shown["events"]][:3] == ["placed", "load", "load"]

    deleted = client.delete(f"/v1/instances/{body['id']}")
    assert deleted.status_code == 200 and deleted.json()["status"] == "draining"
    assert StateStore(tmp_path).load() == ()
    assert client.get("/v1/instances/nope").status_code == 404


def test_a_placement_that_fits_nowhere_is_a_409_naming_each_nodes_reason(tmp_path: Path) -> None:
    _, client, sent = setup(tmp_path)
    response = client.post("/v1/instances", json={"model": "m", "replicas": 5, "nodes": ["a", "c"]})
    assert response.status_code == 409
    error = response.json()["error"]
    assert error["code"] == "insufficient_memory"
    assert set(error["reasons"]) == {"a", "b", "c"}
    assert error["reasons"]["b"] == "not among the placement's nodes"
    assert error["reasons"]["c"].startswith("not enough memory for one replica")
    assert "another replica" in error["reasons"]["a"]
    assert sent == [] and client.get("/v1/instances").json()["data"] == []


def test_preview_says_where_without_placing(tmp_path: Path) -> None:
    _, client, sent = setup(tmp_path)
    preview = client.get("/v1/instances/preview", params={"model": "m", "replicas": 4, "exclude": "a"})
    assert preview.status_code == 200
    assert preview.json()["fits"] is False and preview.json()["nodes"] == ["b", "b", "b"]
    assert sent == []
    assert client.get("/v1/instances/preview").status_code == 400
    assert client.get("/v1/instances/preview", params={"model": "m", "replicas": "x"}).status_code == 400


def test_bad_bodies_are_400s(tmp_path: Path) -> None:
    _, client, _ = setup(tmp_path)
    for body in ({}, {"model": "m", "replicas": 0}, {"model": "m", "colour": "red"}, {"model": ""}):
        assert client.post("/v1/instances", json=body).status_code == 400, body


def test_the_api_key_applies(tmp_path: Path) -> None:
    _, client, _ = setup(tmp_path, keys=("secret",))
    assert client.get("/v1/instances").status_code == 401
    assert client.post("/v1/instances", json={"model": "m"}).status_code == 401
    ok = client.get("/v1/instances", headers={"authorization": "Bearer secret"})
    assert ok.status_code == 200


def test_an_instance_a_worker_declared_is_listed_as_unmanaged_and_cannot_be_deleted(tmp_path: Path) -> None:
    runtime, client, _ = setup(tmp_path)
    declared = InstanceReport(instance_id="a/0", model=ModelId("m"))  # type: ignore[arg-type]
    beat = WorkerHeartbeat(
        node_id=NodeId("a"), instances=(declared,), memory_total=16 * GIB, memory_available=8 * GIB
    )
    runtime.core.handle(beat, runtime.clock())
    [row] = client.get("/v1/instances").json()["data"]
    assert (row["id"], row["managed"], row["status"]) == ("a/0", False, "ready")
    assert client.delete("/v1/instances/a/0").status_code == 409
