"""The instance controller, driven by feeding it heartbeats and time: placing, loading, healing with
backoff, draining, adoption after a restart, and idempotence."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from exo_master.core.instances.controller import InstanceController
from exo_master.core.instances.desired import PlacementSpec
from exo_master.core.instances.lifecycle import ReplicaState
from exo_master.core.instances.records import ControllerConfig, InstanceEvent
from protocol.ids import InstanceId, ModelId, NodeId
from protocol.messages import (
    InstanceReport,
    InstanceStatus,
    LoadInstance,
    LocalModel,
    UnloadInstance,
    WorkerHeartbeat,
)

GIB = 2**30
MODEL = ModelId("m")
LOCAL = LocalModel(model=MODEL, size_bytes=GIB, weights_bytes=GIB)


@dataclass
class FakeCore:
    alive: dict[NodeId, bool] = field(default_factory=dict)
    busy: dict[InstanceId, int] = field(default_factory=dict)
    draining: set[InstanceId] = field(default_factory=set)
    broken_why: dict[InstanceId, str] = field(default_factory=dict)
    coming: frozenset[ModelId] = frozenset()

    def node_alive(self, node_id: NodeId) -> bool | None:
        return self.alive.get(node_id)

    def in_flight(self, instance_id: InstanceId) -> int:
        return self.busy.get(instance_id, 0)

    def set_draining(self, instance_id: InstanceId) -> None:
        self.draining.add(instance_id)

    def set_coming(self, models: frozenset[ModelId]) -> None:
        self.coming = models

    def broken(self, instance_id: InstanceId, why: str) -> None:
        self.draining.add(instance_id)
        self.broken_why[instance_id] = why


class Cluster:
    """Nodes that do what they are told at once, unless told to fail."""

    def __init__(self, *names: str, memory_gib: float = 4, **config: float) -> None:
        self.core = FakeCore()
        self.ctl = InstanceController(self.core, ControllerConfig(**config))  # type: ignore[arg-type]
        self.memory = {NodeId(n): int(memory_gib * GIB) for n in names}
        self.held: dict[NodeId, dict[InstanceId, InstanceReport]] = {NodeId(n): {} for n in names}
        self.now = 0.0
        self.out: list[object] = []
        for n in names:
            self.core.alive[NodeId(n)] = True

    def beat(self, node: str) -> None:
        nid = NodeId(node)
        used = sum(r.memory_bytes for r in self.held[nid].values())
        self.ctl.heartbeat(
            WorkerHeartbeat(
                node_id=nid,
                instances=tuple(self.held[nid].values()),
                memory_total=self.memory[nid],
                memory_available=self.memory[nid] - used,
                models=(LOCAL,),
            ),
            self.now,
        )

    def step(self, dt: float = 1.0) -> Sequence[object]:
        self.now += dt
        for node, alive in self.core.alive.items():
            if alive:
                self.beat(node)
        out = self.ctl.reconcile(self.now)
        self.out.extend(out)
        return out

    def obey(self, out: Sequence[object], status: InstanceStatus = InstanceStatus.READY) -> None:
        for cmd in out:
            if isinstance(cmd, LoadInstance) and self.core.alive.get(cmd.node_id):
                self.held[cmd.node_id][cmd.instance_id] = InstanceReport(
                    instance_id=cmd.instance_id,
                    model=cmd.model,
                    status=status,
                    placement=cmd.placement,
                    memory_bytes=GIB,
                    error="boom" if status is InstanceStatus.FAILED else None,
                )
            elif isinstance(cmd, UnloadInstance) and cmd.node_id in self.held:
                self.held[cmd.node_id].pop(cmd.instance_id, None)

    def place(self, replicas: int, pid: str = "p") -> Sequence[object]:
        result = self.ctl.place(
            PlacementSpec(placement_id=pid, model=MODEL, replicas=replicas, max_concurrency=1), self.now
        )
        assert result.complete, result.reasons
        return self.ctl.reconcile(self.now)

    def states(self) -> dict[str, tuple[str, str]]:
        return {iid.rpartition("/")[2]: (r.node_id, r.state.value) for iid, r in self.ctl.replicas.items()}


def loads(out: Sequence[object]) -> list[tuple[str, str]]:
    return [(c.node_id, c.instance_id) for c in out if isinstance(c, LoadInstance)]


def unloads(out: Sequence[object]) -> list[str]:
    return [c.instance_id.rpartition("/")[2] for c in out if isinstance(c, UnloadInstance)]


def test_two_replicas_over_three_nodes_load_on_two_distinct_nodes_and_become_ready() -> None:
    c = Cluster("a", "b", "c")
    c.step()
    out = c.place(2)
    assert loads(out) == [("a", "a/p.0"), ("b", "b/p.1")]
    c.obey(out, InstanceStatus.LOADING)
    c.step()
    assert c.states() == {"p.0": ("a", "loading"), "p.1": ("b", "loading")}
    c.obey(out)
    assert loads(c.step()) == []
    assert c.states() == {"p.0": ("a", "ready"), "p.1": ("b", "ready")}


def test_a_replica_on_a_dead_node_comes_back_on_the_third_node() -> None:
    c = Cluster("a", "b", "c")
    c.step()
    c.obey(c.place(2))
    c.step()
    c.core.alive[NodeId("a")] = False
    out = c.step()
    assert loads(out) == [("c", "c/p.2")]
    assert "p.0" not in c.states()
    c.obey(out)
    c.step()
    assert c.states() == {"p.1": ("b", "ready"), "p.2": ("c", "ready")}


def test_a_failed_load_backs_off_that_node_and_retries_elsewhere_later() -> None:
    c = Cluster("a", "b", backoff_initial=3.0)
    c.step()
    out = c.place(1)
    assert loads(out) == [("a", "a/p.0")]
    c.obey(out, InstanceStatus.FAILED)
    out = c.step()
    failed_at = c.now
    assert unloads(out) == ["p.0"]  # the failed instance is unloaded to free its memory
    c.obey(out)
    attempts: list[tuple[str, str]] = []
    while not attempts:
        attempts = loads(c.step())
    assert attempts == [("b", "b/p.1")]  # a backs off (6 s), b is free
    assert c.now == failed_at + 3.0  # the placement waited its own backoff (3 s)


def test_a_placement_stops_retrying_after_max_failures_and_says_why() -> None:
    c = Cluster("a", backoff_initial=0.5, backoff_max=0.5, max_failures=3)
    c.step()
    c.obey(c.place(1), InstanceStatus.FAILED)
    attempts = 1
    for _ in range(20):
        out = c.step()
        attempts += len(loads(out))
        c.obey(out, InstanceStatus.FAILED)
    assert attempts == 3
    assert "stopped after 3 failed loads" in c.ctl.placements["p"].reason


def test_a_stopped_placement_starts_again_on_a_node_it_never_failed_on() -> None:
    c = Cluster("a", backoff_initial=0.5, backoff_max=0.5, max_failures=2)
    c.step()
    c.obey(c.place(1), InstanceStatus.FAILED)
    for _ in range(10):
        c.obey(c.step(), InstanceStatus.FAILED)
    assert "stopped after 2 failed loads" in c.ctl.placements["p"].reason
    c.memory[NodeId("b")], c.held[NodeId("b")], c.core.alive[NodeId("b")] = 4 * GIB, {}, True  # b joins
    out = c.step()
    assert loads(out) == [("b", "b/p.2")]  # there, not on a again
    assert any(e.what == "retrying" and "b" in e.detail for e in c.out if isinstance(e, InstanceEvent))
    c.obey(out)
    c.step()
    assert c.states()["p.2"] == ("b", "ready")


def test_delete_drains_until_in_flight_tasks_finish_then_unloads() -> None:
    c = Cluster("a", "b")
    c.step()
    c.obey(c.place(1))
    c.step()
    c.core.busy[InstanceId("a/p.0")] = 2
    c.ctl.delete("p", c.now)
    assert c.core.draining == {"a/p.0"}
    assert unloads(c.step()) == []
    assert c.states() == {"p.0": ("a", "draining")}
    steps = [(e.what, e.instance_id) for e in c.out if isinstance(e, InstanceEvent)]
    assert ("deleting", "") in steps and ("draining", "a/p.0") in steps  # each step is logged
    c.core.busy[InstanceId("a/p.0")] = 0
    out = c.step()
    assert unloads(out) == ["p.0"]
    c.obey(out)
    c.step()
    assert c.states() == {} and "p" not in c.ctl.placements


def test_a_drain_ends_after_its_grace_period_even_with_tasks_in_flight() -> None:
    c = Cluster("a", drain_grace=3.0)
    c.step()
    c.obey(c.place(1))
    c.step()
    c.core.busy[InstanceId("a/p.0")] = 1
    c.ctl.delete("p", c.now)
    assert [unloads(c.step()) for _ in range(3)] == [[], [], ["p.0"]]


def test_a_restored_placement_adopts_loaded_instances_instead_of_reloading() -> None:
    c = Cluster("a", "b", "c")
    c.step()
    out = c.place(2)
    c.obey(out)
    c.step()
    spec = c.ctl.placements["p"].spec
    # A new master (a new controller) with the saved desired state hears the same nodes.
    c.ctl = InstanceController(c.core, ControllerConfig(adopt_grace=3.0))
    c.ctl.restore((spec,), c.now)
    commands = [cmd for _ in range(6) for cmd in c.step() if not isinstance(cmd, InstanceEvent)]
    assert commands == []
    assert c.states() == {"p.0": ("a", "ready"), "p.1": ("b", "ready")}
    assert c.ctl.placements["p"].next_index == 2  # a healed replica will not reuse an id


def test_an_instance_of_an_unknown_placement_is_unloaded_after_the_grace_period() -> None:
    c = Cluster("a", adopt_grace=2.0)
    c.ctl.restore((), c.now)
    c.held[NodeId("a")][InstanceId("old.0")] = InstanceReport(
        instance_id=InstanceId("old.0"), model=MODEL, placement="old"
    )
    assert unloads(c.step()) == []
    assert unloads(c.step()) == ["old.0"]


def test_unmanaged_instances_are_never_touched() -> None:
    c = Cluster("a")
    c.held[NodeId("a")][InstanceId("a/0")] = InstanceReport(instance_id=InstanceId("a/0"), model=MODEL)
    assert [cmd for _ in range(5) for cmd in c.step()] == []


def test_a_placement_that_does_not_fit_is_not_recorded() -> None:
    c = Cluster("a", "b", memory_gib=0.5)
    c.step()
    result = c.ctl.place(PlacementSpec(placement_id="p", model=MODEL), c.now)
    assert not result.complete
    assert set(result.reasons) == {"a", "b"}
    assert c.ctl.placements == {} and c.ctl.reconcile(c.now) == []


def test_reconcile_is_idempotent_and_resends_a_load_until_the_node_reports_it() -> None:
    c = Cluster("a", resend=2.0, start_timeout=100.0)
    c.step()
    c.place(1)
    assert loads(c.ctl.reconcile(c.now)) == []  # same instant: nothing new
    resent = [loads(c.step()) for _ in range(4)]
    assert resent == [[], [("a", "a/p.0")], [], [("a", "a/p.0")]]


def test_memory_of_a_loading_replica_counts_before_the_node_reports_it_used() -> None:
    c = Cluster("a", memory_gib=1.5)
    c.step()
    c.place(1)
    result = c.ctl.preview(PlacementSpec(placement_id="q", model=MODEL, max_concurrency=1))
    assert not result.complete and "not enough memory" in result.reasons[NodeId("a")]


def test_a_returning_node_with_an_extra_replica_gets_it_drained_not_the_healed_one() -> None:
    c = Cluster("a", "b", "c")
    c.step()
    c.obey(c.place(1))
    c.step()
    c.core.alive[NodeId("a")] = False
    out = c.step()
    c.obey(out)
    c.step()
    c.core.alive[NodeId("a")] = True  # back, still holding p.0
    out = c.step()
    assert unloads(out) == ["p.0"]
    assert c.states()["p.1"][1] == ReplicaState.READY


def test_a_node_the_core_forgets_is_forgotten_here_too() -> None:
    c = Cluster("a", "b")
    c.step()
    assert set(c.ctl.nodes) == {"a", "b"}
    del c.core.alive[NodeId("b")]  # dead too long: the core dropped it
    c.step()
    assert set(c.ctl.nodes) == {"a"}
    # A node the core refused (its node table is full) is not recorded either.
    c.memory[NodeId("z")], c.held[NodeId("z")] = GIB, {}
    c.beat("z")
    assert set(c.ctl.nodes) == {"a"}
