"""The memory-aware placement rule: memory is never exceeded, replicas spread over distinct nodes
while there are nodes, holders of the model come first, and the answer does not depend on the order
the nodes come in."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from exo_master.core.instances.desired import PlacementSpec
from exo_master.core.instances.memory import instance_need
from exo_master.core.instances.rule import NodeView, plan
from protocol.ids import ModelId, NodeId
from protocol.messages import LocalModel

GIB = 2**30
MODEL = ModelId("m")
LOCAL = LocalModel(model=MODEL, size_bytes=GIB, weights_bytes=GIB, kv_bytes_per_token=1024)


def spec(replicas: int = 1, **kw: object) -> PlacementSpec:
    return PlacementSpec(placement_id="p", model=MODEL, replicas=replicas, max_concurrency=2, **kw)  # type: ignore[arg-type]


def node(
    name: str, free_gib: float, *, holds: bool = True, alive: bool = True, fetch: bool = False
) -> NodeView:
    return NodeView(
        node_id=NodeId(name),
        alive=alive,
        memory_total=64 * GIB,
        free=int(free_gib * GIB),
        models={MODEL: LOCAL} if holds else {},
        can_fetch=fetch,
    )


NEED = instance_need(LOCAL, 2)

nodes_strategy = st.lists(
    st.builds(
        node,
        st.sampled_from([f"n{i}" for i in range(8)]),
        st.floats(min_value=0, max_value=8),
        holds=st.booleans(),
        alive=st.booleans(),
        fetch=st.booleans(),
    ),
    max_size=8,
    unique_by=lambda n: n.node_id,
)


@settings(max_examples=80, derandomize=True)
@given(nodes=nodes_strategy, replicas=st.integers(min_value=1, max_value=10))
def test_no_node_gets_more_than_its_free_memory(nodes: list[NodeView], replicas: int) -> None:
    result = plan(spec(replicas), replicas, nodes)
    by_id = {n.node_id: n for n in nodes}
    for node_id in set(result.chosen):
        assert result.chosen.count(node_id) * result.need <= by_id[node_id].free
        assert by_id[node_id].alive


@settings(max_examples=80, derandomize=True)
@given(nodes=nodes_strategy, replicas=st.integers(min_value=1, max_value=10))
def test_replicas_land_on_distinct_nodes_while_there_are_nodes(nodes: list[NodeView], replicas: int) -> None:
    result = plan(spec(replicas), replicas, nodes)
    fitting = {n.node_id for n in nodes if n.node_id not in result.reasons or n.node_id in result.chosen}
    distinct = len(set(result.chosen))
    assert distinct == min(len(result.chosen), len(fitting))
    if len(result.chosen) > distinct:  # a node twice only when every usable node has one
        assert set(result.chosen) == fitting


@settings(max_examples=80, derandomize=True)
@given(nodes=nodes_strategy, replicas=st.integers(min_value=1, max_value=10), data=st.data())
def test_the_plan_is_deterministic_whatever_the_node_order(
    nodes: list[NodeView], replicas: int, data: st.DataObject
) -> None:
    shuffled = data.draw(st.permutations(nodes))
    assert plan(spec(replicas), replicas, nodes) == plan(spec(replicas), replicas, shuffled)


@settings(max_examples=80, derandomize=True)
@given(nodes=nodes_strategy, replicas=st.integers(min_value=1, max_value=10))
def test_every_node_not_chosen_has_a_reason_when_the_plan_falls_short(
    nodes: list[NodeView], replicas: int
) -> None:
    result = plan(spec(replicas), replicas, nodes)
    if not result.complete:
        assert {n.node_id for n in nodes} - set(result.chosen) <= set(result.reasons)


def test_holders_of_the_model_come_before_nodes_that_would_fetch_it() -> None:
    nodes = [node("a", 8, holds=False, fetch=True), node("b", 2), node("c", 4, holds=False, fetch=True)]
    assert plan(spec(2), 2, nodes).chosen == (NodeId("b"), NodeId("a"))


def test_most_free_memory_first_then_node_id() -> None:
    nodes = [node("b", 4), node("a", 4), node("c", 6)]
    assert plan(spec(3), 3, nodes).chosen == (NodeId("c"), NodeId("a"), NodeId("b"))


def test_a_placement_that_fits_nowhere_names_each_nodes_reason() -> None:
    nodes = [
        node("small", 0.5),
        node("dead", 8, alive=False),
        node("empty", 8, holds=False),
        node("out", 8),
    ]
    result = plan(spec(1, exclude=("out",)), 1, nodes)
    assert result.chosen == ()
    assert result.reasons[NodeId("dead")] == "node is not alive"
    assert result.reasons[NodeId("out")] == "excluded by the placement"
    assert "does not hold model 'm'" in result.reasons[NodeId("empty")]
    assert result.reasons[NodeId("small")].startswith("not enough memory for one replica: needs 1.0 GiB")


def test_a_second_replica_on_one_node_only_when_it_has_room_for_both() -> None:
    one = plan(spec(2), 2, [node("a", 1.5)])
    assert one.chosen == (NodeId("a"),)
    assert "another replica" in one.reasons[NodeId("a")]
    assert plan(spec(2), 2, [node("a", 2.5)]).chosen == (NodeId("a"), NodeId("a"))


def test_an_unknown_model_is_held_by_no_node() -> None:
    result = plan(PlacementSpec(placement_id="p", model="other"), 1, [node("a", 8)])
    assert result.chosen == () and result.need == 0
    assert result.reasons == {NodeId("a"): "does not hold model 'other'"}
