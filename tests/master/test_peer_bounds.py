"""Every table keyed by something a peer chooses is bounded and aged: node rows, incarnations,
sequence trackers, metric labels. And fakes never crowd out a worker that subscribes."""

from __future__ import annotations

from exo_master.bus.incarnations import IncarnationGuard, Verdict
from exo_master.core import CoreConfig, MasterCore
from exo_master.core.events import Effect, NodeSubscribed, TaskPlaced
from protocol.envelope import OTHER_ORIGINS, SequenceTracker
from protocol.ids import NodeId
from protocol.messages import NodeRefused, WorkerHeartbeat
from tests.master.cluster import MODEL, heartbeat, node_of, only, report, submit


def fake(core: MasterCore, i: int, now: float) -> list[object]:
    """A heartbeat with a made-up node id, from a peer that never subscribed."""
    return list(core.handle(WorkerHeartbeat(node_id=NodeId(f"fake{i}"), instances=()), now))


def join(core: MasterCore, i: int, now: float) -> list[Effect]:
    effects = list(core.handle(NodeSubscribed(node_id=node_of(i)), now))
    return effects + list(core.handle(heartbeat(i, report(i)), now))


def test_fake_nodes_are_forgotten_as_soon_as_they_fall_silent() -> None:
    core = MasterCore(CoreConfig(max_nodes=16))
    for i in range(16):
        fake(core, i, 0.0)
    join(core, 0, 0.0)  # a real worker, while the flood goes on: it takes a fake's row
    assert len(core.state.nodes) == 16 and node_of(0) in core.state.nodes
    core.handle(heartbeat(0, report(0)), 3.5)
    core.tick(3.5)  # 3 s of silence (the liveness timeout): the fakes are gone, not dead rows
    assert [n.node_id for n in core.view(3.5).nodes] == [node_of(0)]


def test_a_subscribed_worker_gets_a_row_in_a_table_full_of_fakes() -> None:
    core = MasterCore(CoreConfig(max_nodes=8))
    for i in range(20):
        fake(core, i, 0.0)  # 12 of them are refused (silently: they never subscribed)
    assert core.counters().refused_nodes == 12
    assert not only(join(core, 0, 0.1), NodeRefused)
    assert node_of(0) in core.state.nodes
    assert isinstance(only(submit(core, "t", now=0.2), TaskPlaced)[0], TaskPlaced)


def test_a_table_full_of_real_workers_refuses_the_newcomer_with_a_reason() -> None:
    core = MasterCore(CoreConfig(max_nodes=3))
    for i in range(3):
        join(core, i, 0.0)
    (refusal,) = only(join(core, 3, 0.1), NodeRefused)
    assert refusal.node_id == node_of(3) and refusal.incarnation == ""  # "" is any process of the id
    assert "node table is full" in refusal.reason and "--max-nodes" in refusal.reason
    assert node_of(3) not in core.state.nodes
    assert len(core.state.nodes) == 3


def test_an_unsubscribed_newcomer_is_not_refused_out_loud() -> None:
    core = MasterCore(CoreConfig(max_nodes=2))
    join(core, 0, 0.0)
    join(core, 1, 0.0)
    assert not only(core.handle(heartbeat(2, report(2)), 0.1), NodeRefused)  # it cannot hear it yet
    assert core.counters().refused_nodes == 1


def test_subscriptions_remembered_for_unknown_nodes_are_bounded() -> None:
    core = MasterCore(CoreConfig(max_nodes=4))
    for i in range(100):
        core.handle(NodeSubscribed(node_id=NodeId(f"ghost{i}")), 0.0)
    assert len(core.liveness.subscribed) == 16


def test_the_sequence_tracker_follows_a_bounded_number_of_origins() -> None:
    tracker = SequenceTracker(max_origins=100, max_labels=8)
    for i in range(100_000):
        tracker.observe(f"o{i}", 1)
        tracker.observe(f"o{i}", 3)  # one gap each
    assert len(tracker) == 100
    assert len(tracker.gaps) <= 9 and OTHER_ORIGINS in tracker.gaps
    assert sum(tracker.gaps.values()) == 100_000  # nothing lost from the totals
    tracker.observe("o99999", 5)  # a followed origin keeps its sequence
    assert sum(tracker.gaps.values()) == 100_001


def test_a_forgotten_origin_starts_a_new_sequence_without_a_false_gap() -> None:
    tracker = SequenceTracker(max_origins=2)
    tracker.observe("a", 10)
    tracker.observe("b", 1)
    tracker.observe("c", 1)  # "a" is the least recently heard: forgotten
    assert tracker.observe("a", 500) == 0


def test_incarnations_are_bounded_however_many_a_peer_cycles() -> None:
    guard = IncarnationGuard(grace=2.0, max_nodes=50, max_refused=50)
    guard.observe("real", "r", 0.0)
    for i in range(10_000):
        now = i * 0.001
        guard.observe("real", f"cycled{i}", now)  # a newcomer, held
        assert guard.observe("real", "r", now) is Verdict.ADMIT  # the live one: the newcomer refused
        guard.observe(f"node{i}", "x", now)  # and as many node ids
    assert len(guard) <= 50 and len(guard.refused) <= 50
    assert guard.observe("real", "cycled9999", 10.0) is Verdict.REFUSE  # the recent refusals hold


def test_the_model_of_a_fake_never_matters() -> None:
    """A fake that reports an instance is established (it is a worker, as far as anyone knows)."""
    core = MasterCore(CoreConfig(max_nodes=2))
    core.handle(heartbeat(0, report(0, model=MODEL)), 0.0)
    core.tick(3.5)
    assert core.view(3.5).nodes[0].alive is False  # kept as a dead row, as before
