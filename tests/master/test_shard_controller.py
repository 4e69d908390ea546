"""Sharded placements in the instance controller, driven by heartbeats and time: K ranks on K nodes
with ring ports, ready when rank 0 is, one fate for all ranks (a lost rank fails the instance, every
rank is unloaded and the whole instance placed again), draining through rank 0, adoption."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from exo_master.core.instances.controller import InstanceController
from exo_master.core.instances.desired import PlacementSpec
from exo_master.core.instances.records import ControllerConfig
from exo_worker.local_models import SMOLLM2_SHAPE
from protocol.ids import InstanceId, ModelId, NodeId
from protocol.messages import (
    InstanceReport,
    InstanceStatus,
    LoadInstance,
    LocalModel,
    UnloadInstance,
    WorkerHeartbeat,
)
from protocol.sharding import RingPorts, Sharding
from tests.master.test_instance_controller import FakeCore

GIB = 2**30
MODEL = ModelId("smol")
SHAPE = SMOLLM2_SHAPE
LOCAL = LocalModel(model=MODEL, size_bytes=GIB, weights_bytes=GIB, kv_bytes_per_token=1000, shape=SHAPE)


class Cluster:
    """Nodes (all on one host, like three workers on this machine) that obey at once."""

    def __init__(self, *names: str, ring: Sequence[str] | None = None, memory_gib: float = 4) -> None:
        self.core = FakeCore()
        self.ctl = InstanceController(self.core, ControllerConfig())
        self.names = [NodeId(n) for n in names]
        self.ring = {NodeId(n) for n in (names if ring is None else ring)}
        self.memory = int(memory_gib * GIB)
        self.held: dict[NodeId, dict[InstanceId, InstanceReport]] = {n: {} for n in self.names}
        self.now = 0.0
        for n in self.names:
            self.core.alive[n] = True

    def beat(self, nid: NodeId) -> None:
        used = sum(r.memory_bytes for r in self.held[nid].values())
        self.ctl.heartbeat(
            WorkerHeartbeat(
                node_id=nid,
                instances=tuple(self.held[nid].values()),
                memory_total=self.memory,
                memory_available=self.memory - used,
                models=(LOCAL,),
                ring=RingPorts(host="127.0.0.1", first=7000, last=7009) if nid in self.ring else None,
            ),
            self.now,
        )

    def step(self, dt: float = 1.0) -> list[Any]:
        self.now += dt
        for node, alive in self.core.alive.items():
            if alive:
                self.beat(node)
        return self.ctl.reconcile(self.now)

    def report(self, cmd: LoadInstance, status: InstanceStatus) -> None:
        assert cmd.shard is not None
        self.held[cmd.node_id][cmd.instance_id] = InstanceReport(
            instance_id=cmd.instance_id,
            model=cmd.model,
            status=status,
            placement=cmd.placement,
            memory_bytes=cmd.shard.memory_bytes,
            shard=cmd.shard,
            error="rank lost" if status is InstanceStatus.FAILED else None,
        )

    def obey(self, out: Sequence[object], status: InstanceStatus = InstanceStatus.READY) -> None:
        for cmd in out:
            if isinstance(cmd, LoadInstance) and self.core.alive.get(cmd.node_id):
                self.report(cmd, status)
            elif isinstance(cmd, UnloadInstance):
                self.held[cmd.node_id].pop(cmd.instance_id, None)

    def place(self, shards: int, sharding: Sharding = Sharding.TENSOR, pid: str = "p") -> list[LoadInstance]:
        spec = PlacementSpec(
            placement_id=pid, model=MODEL, shards=shards, sharding=sharding, max_concurrency=1
        )
        result = self.ctl.place(spec, self.now)
        assert result.complete, (result.problems, result.reasons)
        return loads(self.ctl.reconcile(self.now))

    def state(self, instance_id: str) -> str:
        return self.ctl.replicas[InstanceId(instance_id)].state.value


def loads(out: Sequence[object]) -> list[LoadInstance]:
    return [c for c in out if isinstance(c, LoadInstance)]


def unloads(out: Sequence[object]) -> set[str]:
    return {c.instance_id for c in out if isinstance(c, UnloadInstance)}


def test_three_tensor_shards_go_to_three_nodes_with_one_ring_and_distinct_ports() -> None:
    c = Cluster("a", "b", "c", "d", ring=["a", "b", "c"])
    c.step()
    sent = c.place(3)
    assert sorted(cmd.node_id for cmd in sent) == ["a", "b", "c"]
    shards = [cmd.shard for cmd in sent]
    assert all(s is not None for s in shards)
    leader = next(cmd for cmd in sent if cmd.shard and cmd.shard.rank == 0)
    assert {s.group for s in shards if s} == {leader.instance_id}
    assert leader.instance_id.startswith(f"{leader.node_id}/")
    hosts = {s.hosts for s in shards if s}
    assert len(hosts) == 1
    (ring,) = hosts
    assert len(ring) == 3
    ports = [int(a.rpartition(":")[2]) for a in ring] + [int(leader.shard.control.rpartition(":")[2])]  # type: ignore[union-attr]
    assert len(set(ports)) == 4 and all(7000 <= p <= 7009 for p in ports)
    assert {s.rank for s in shards if s} == {0, 1, 2}
    assert all(s.split == () and s.memory_bytes > 0 for s in shards if s)
    for cmd in sent:  # every rank's id lives in its own node's namespace
        assert cmd.instance_id.startswith(f"{cmd.node_id}/")


def test_the_instance_is_ready_only_when_rank_zero_is() -> None:
    c = Cluster("a", "b", "c")
    c.step()
    sent = c.place(2, Sharding.PIPELINE)
    follower = next(cmd for cmd in sent if cmd.shard and cmd.shard.rank == 1)
    leader = next(cmd for cmd in sent if cmd.shard and cmd.shard.rank == 0)
    assert follower.shard is not None and sum(follower.shard.split) == 30
    c.report(follower, InstanceStatus.READY)
    c.report(leader, InstanceStatus.LOADING)
    c.step()
    assert c.state(leader.instance_id) == "loading"
    assert [r for r in c.ctl.replicas.values() if r.rank == 0 and r.state.value == "ready"] == []
    c.report(leader, InstanceStatus.READY)
    assert loads(c.step()) == []
    assert c.state(leader.instance_id) == "ready" and c.state(follower.instance_id) == "ready"


def test_a_lost_rank_fails_the_instance_unloads_every_rank_and_places_it_again() -> None:
    c = Cluster("a", "b", "c")
    c.step()
    first = c.place(3)
    c.obey(first)
    c.step()
    old_ports = {a for cmd in first if cmd.shard for a in cmd.shard.hosts}
    follower = next(cmd for cmd in first if cmd.shard and cmd.shard.rank == 2)
    leader = next(cmd for cmd in first if cmd.shard and cmd.shard.rank == 0)
    c.report(follower, InstanceStatus.FAILED)  # its process died: the node says so
    out = c.step()
    assert leader.instance_id in c.core.draining  # no new task goes to rank 0 from now on
    cause = f"rank 2 ({follower.instance_id}) failed: rank lost"
    assert {e.instance_id: e.detail for e in c.ctl.events if e.what == "failed"} == {
        cmd.instance_id: "rank lost" if cmd is follower else cause for cmd in first
    }
    again = loads(out)
    assert len(again) == 3  # the whole instance, at once (a ready instance lost: no backoff)
    assert {a for cmd in again if cmd.shard for a in cmd.shard.hosts}.isdisjoint(old_ports)
    # Every old rank is unloaded, the killed one too (its node still reports it, failed).
    assert unloads(out) == {cmd.instance_id for cmd in first}
    c.obey(out)
    c.step()
    c.step()
    assert all(InstanceId(cmd.instance_id) not in c.ctl.replicas for cmd in first)
    assert sorted(r.state.value for r in c.ctl.replicas.values()) == ["ready"] * 3


def test_a_dead_follower_node_fails_the_instance_and_three_shards_wait_for_a_third_node() -> None:
    c = Cluster("a", "b", "c")
    c.step()
    first = c.place(3)
    c.obey(first)
    c.step()
    victim = next(cmd for cmd in first if cmd.shard and cmd.shard.rank == 1)
    c.core.alive[victim.node_id] = False
    out = c.step()
    assert loads(out) == []  # two nodes left: three shards do not fit
    record = c.ctl.placements["p"]
    assert "3 shards need 3 nodes, only 2 available" in record.reason
    assert unloads(c.step()) == {cmd.instance_id for cmd in first if cmd.node_id != victim.node_id}
    c.core.alive[victim.node_id] = True
    for _ in range(3):
        out = c.step()
        if loads(out):
            break
    assert len(loads(out)) == 3


def test_deleting_drains_rank_zero_first_and_keeps_its_followers_until_then() -> None:
    c = Cluster("a", "b")
    c.step()
    sent = c.place(2, Sharding.PIPELINE)
    c.obey(sent)
    c.step()
    leader = next(cmd for cmd in sent if cmd.shard and cmd.shard.rank == 0)
    follower = next(cmd for cmd in sent if cmd.shard and cmd.shard.rank == 1)
    c.core.busy[leader.instance_id] = 1
    c.ctl.delete("p", c.now)
    assert unloads(c.step()) == set()
    assert c.state(leader.instance_id) == "draining" and c.state(follower.instance_id) == "ready"
    c.core.busy[leader.instance_id] = 0
    out = c.step()
    assert unloads(out) == {leader.instance_id, follower.instance_id}
    c.obey(out)
    c.step()
    c.step()
    assert c.ctl.placements == {} and c.ctl.replicas == {}


def test_the_preview_says_why_a_shard_count_is_impossible() -> None:
    c = Cluster("a", "b", "c")
    c.step()
    two_tensor = c.ctl.preview(PlacementSpec(placement_id="x", model=MODEL, shards=2))
    assert not two_tensor.complete
    assert any("attention heads (9) do not divide by 2" in p for p in two_tensor.problems)
    four = c.ctl.preview(PlacementSpec(placement_id="x", model=MODEL, shards=4, sharding=Sharding.PIPELINE))
    assert four.problems == ("4 shards need 4 nodes, only 3 available",)
    two_pipeline = c.ctl.preview(
        PlacementSpec(placement_id="x", model=MODEL, shards=2, sharding=Sharding.PIPELINE)
    )
    assert two_pipeline.complete and len(two_pipeline.groups[0]) == 2
    assert c.ctl.replicas == {}  # a preview places nothing


def test_a_restarted_master_adopts_a_sharded_instance_without_reloading() -> None:
    c = Cluster("a", "b", "c")
    c.step()
    c.obey(c.place(3))
    c.step()
    spec = c.ctl.placements["p"].spec
    c.ctl = InstanceController(c.core, ControllerConfig())
    c.ctl.restore((spec,), c.now)
    out = c.step()
    out += c.step()
    out += c.step(5)
    assert loads(out) == [] and unloads(out) == set()
    assert sorted((r.rank, r.state.value) for r in c.ctl.replicas.values()) == [
        (0, "ready"),
        (1, "ready"),
        (2, "ready"),
    ]
