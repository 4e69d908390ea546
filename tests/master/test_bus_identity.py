"""The bus shell's identity checks: origin, instance namespace, key binding (pure, time passed in)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from exo_master.bus.identity import DropReason, IdentityGuard
from protocol.ids import InstanceId, ModelId, NodeId, TaskId
from protocol.messages import InstanceReport, TaskChunk, WorkerHeartbeat


def chunk(node: str, instance: str) -> TaskChunk:
    return TaskChunk(
        node_id=NodeId(node), task_id=TaskId("t"), instance_id=InstanceId(instance), index=0, text="x"
    )


def beat(node: str, *instances: str) -> WorkerHeartbeat:
    reports = tuple(InstanceReport(instance_id=InstanceId(i), model=ModelId("m")) for i in instances)
    return WorkerHeartbeat(node_id=NodeId(node), instances=reports)


def test_origin_must_be_the_node_id() -> None:
    guard = IdentityGuard()
    assert guard.check_message("b", chunk("a", "a/0"), None, 0.0) == DropReason.ORIGIN_MISMATCH
    assert guard.check_message("a", chunk("a", "a/0"), None, 0.0) is None
    assert guard.drops == {DropReason.ORIGIN_MISMATCH: 1}


def test_instances_are_namespaced_by_node() -> None:
    guard = IdentityGuard()
    assert guard.check_message("a", chunk("a", "b/0"), None, 0.0) == DropReason.FOREIGN_INSTANCE
    # "a/" is the namespace, not "a": node "a" cannot claim node "ab"'s instances.
    assert guard.check_message("a", chunk("a", "ab/0"), None, 0.0) == DropReason.FOREIGN_INSTANCE
    assert guard.check_message("a", beat("a", "a/0", "b/1"), None, 0.0) == DropReason.FOREIGN_INSTANCE
    assert guard.check_message("a", beat("a", "a/0", "a/1"), None, 0.0) is None


def test_a_node_is_bound_to_the_first_key_that_speaks_for_it() -> None:
    guard = IdentityGuard(release_after=10.0)
    assert guard.check_message("a", chunk("a", "a/0"), "KA", 0.0) is None
    assert guard.check_message("a", chunk("a", "a/0"), "KB", 1.0) == DropReason.KEY_MISMATCH
    assert guard.check_key(NodeId("a"), "KB", 2.0) == DropReason.KEY_MISMATCH
    assert guard.check_message("a", chunk("a", "a/0"), "KA", 5.0) is None
    # One key may hold several nodes (several workers on one machine).
    assert guard.check_message("b", chunk("b", "b/0"), "KA", 5.0) is None
    assert guard.bound_key(NodeId("a")) == "KA"


def test_an_idle_binding_is_released_to_a_new_key() -> None:
    guard = IdentityGuard(release_after=10.0)
    assert guard.check_key(NodeId("a"), "KA", 0.0) is None
    assert guard.check_key(NodeId("a"), "KB", 9.0) == DropReason.KEY_MISMATCH
    assert guard.check_key(NodeId("a"), "KB", 20.0) is None
    assert guard.check_key(NodeId("a"), "KA", 21.0) == DropReason.KEY_MISMATCH


def test_the_binding_table_is_bounded() -> None:
    guard = IdentityGuard(release_after=10.0, max_nodes=2)
    assert guard.check_key(NodeId("a"), "K", 0.0) is None
    assert guard.check_key(NodeId("b"), "K", 0.0) is None
    assert guard.check_key(NodeId("c"), "K", 1.0) == DropReason.TOO_MANY_NODES
    assert guard.check_key(NodeId("c"), "K", 11.0) is None  # a and b idle: evicted


@given(st.lists(st.tuples(st.sampled_from("ab"), st.sampled_from(["KA", "KB"])), max_size=30))
def test_while_a_binding_lives_only_its_key_passes(contacts: list[tuple[str, str]]) -> None:
    guard = IdentityGuard(release_after=1e9)
    first: dict[str, str] = {}
    for node, key in contacts:
        passed = guard.check_key(NodeId(node), key, 0.0) is None
        first.setdefault(node, key)
        assert passed == (first[node] == key)
