"""Shard planning (pure): rank assignments for tensor and pipeline sharding, or the reasons why not."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from exo_master.core.shard_plan import (
    Candidate,
    Impossible,
    ModelShape,
    Sharding,
    ShardPlan,
    plan_shards,
    tensor_divisibility_problems,
)

GIB = 1 << 30

# SmolLM2-135M-Instruct as exo_worker.models prepares it (config.json fields, ~100 MB of weights).
SMOLLM2_CONFIG = {
    "num_hidden_layers": 30,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
    "quantization": {"group_size": 32, "bits": 4},
}
SMOLLM2 = ModelShape.from_config(SMOLLM2_CONFIG, weight_bytes=100_000_000)


def nodes(*free_gib: float) -> list[Candidate]:
    return [Candidate(f"n{i}", int(f * GIB)) for i, f in enumerate(free_gib)]


def test_smollm2_splits_three_ways_by_tensor_not_two() -> None:
    three = plan_shards(SMOLLM2, nodes(8, 8, 8), 3, Sharding.TENSOR)
    assert isinstance(three, ShardPlan)
    assert [r.rank for r in three.ranks] == [0, 1, 2]
    two = plan_shards(SMOLLM2, nodes(8, 8, 8), 2, Sharding.TENSOR)
    assert isinstance(two, Impossible)
    assert any("attention heads (9) do not divide by 2" in r for r in two.reasons)
    assert any("KV heads (3)" in r for r in two.reasons)


def test_pipeline_two_ways_gives_layers_by_free_memory() -> None:
    plan = plan_shards(SMOLLM2, nodes(1, 3), 2, Sharding.PIPELINE)
    assert isinstance(plan, ShardPlan)
    assert plan.ranks[0].node_id == "n1"  # most free memory is rank 0
    assert plan.split[0] > plan.split[1] and sum(plan.split) == 30


def test_impossible_explains_missing_nodes_and_memory() -> None:
    few = plan_shards(SMOLLM2, nodes(8), 3, Sharding.TENSOR)
    assert isinstance(few, Impossible) and "3 shards need 3 nodes, only 1 available" in few.reasons[0]
    tight = plan_shards(SMOLLM2, nodes(0.01, 8, 8), 3, Sharding.TENSOR)
    assert isinstance(tight, Impossible) and tight.reasons[0].startswith("node n0:")
    full = plan_shards(SMOLLM2, nodes(0.08, 0.08), 2, Sharding.PIPELINE)
    assert isinstance(full, Impossible) and "not enough memory on 2 nodes" in full.reasons[0]
    many = plan_shards(SMOLLM2, nodes(*[8] * 31), 31, Sharding.PIPELINE)
    assert isinstance(many, Impossible) and "at most one rank per layer" in many.reasons[0]


def test_quantization_group_must_divide_the_split_input() -> None:
    shape = ModelShape(
        num_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=100, weight_bytes=10_000, quantization_group_size=32,
    )  # fmt: skip
    assert tensor_divisibility_problems(shape, 2) == [
        "MLP down-projection input split 2 ways (48) is not a multiple of the quantization group size 32"
    ]
    assert tensor_divisibility_problems(shape, 1) == []


shapes = st.builds(
    ModelShape,
    num_layers=st.integers(1, 40),
    hidden_size=st.sampled_from([64, 128, 576, 4096]),
    intermediate_size=st.sampled_from([96, 128, 1536, 11008]),
    num_attention_heads=st.integers(1, 12),
    num_key_value_heads=st.integers(1, 12),
    vocab_size=st.integers(100, 50_000),
    weight_bytes=st.integers(0, 50 * GIB),
    quantization_group_size=st.sampled_from([None, 32, 64]),
)
candidate_lists = st.lists(st.integers(0, 64 * GIB), min_size=0, max_size=6).map(
    lambda frees: [Candidate(f"node-{i}", f) for i, f in enumerate(frees)]
)


@given(shapes, candidate_lists, st.integers(1, 6), st.sampled_from(list(Sharding)), st.randoms())
def test_a_plan_fits_and_covers_every_layer_once(
    shape: ModelShape, candidates: list[Candidate], k: int, sharding: Sharding, rnd: object
) -> None:
    plan = plan_shards(shape, candidates, k, sharding)
    shuffled = list(candidates)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    assert plan_shards(shape, shuffled, k, sharding) == plan  # the candidates' order does not matter
    if isinstance(plan, Impossible):
        assert plan.reasons and all(isinstance(r, str) and r for r in plan.reasons)
        return
    free = {c.node_id: c.free_bytes for c in candidates}
    assert [r.rank for r in plan.ranks] == list(range(k))
    assert len({r.node_id for r in plan.ranks}) == k  # distinct nodes
    assert all(r.bytes_needed <= free[r.node_id] for r in plan.ranks)  # memory never exceeded
    if sharding is Sharding.TENSOR:
        assert tensor_divisibility_problems(shape, k) == []
        assert all((r.layer_start, r.layer_end) == (0, shape.num_layers) for r in plan.ranks)
    else:
        # Contiguous ranges in rank order, at least one layer each, covering [0, num_layers).
        assert plan.ranks[0].layer_start == 0 and plan.ranks[-1].layer_end == shape.num_layers
        assert all(a.layer_end == b.layer_start for a, b in zip(plan.ranks, plan.ranks[1:], strict=False))
        assert min(plan.split) >= 1
        # More free memory never gets fewer layers.
        layers = {r.node_id: r.layer_end - r.layer_start for r in plan.ranks}
        for a in plan.ranks:
            for b in plan.ranks:
                if free[a.node_id] > free[b.node_id]:
                    assert layers[a.node_id] >= layers[b.node_id]


@given(shapes, st.integers(1, 6))
def test_plentiful_memory_only_fails_on_shape(shape: ModelShape, k: int) -> None:
    plenty = [Candidate(f"node-{i}", 1 << 50) for i in range(k)]
    tensor = plan_shards(shape, plenty, k, Sharding.TENSOR)
    assert isinstance(tensor, ShardPlan) == (tensor_divisibility_problems(shape, k) == [])
    pipeline = plan_shards(shape, plenty, k, Sharding.PIPELINE)
    assert isinstance(pipeline, ShardPlan) == (k <= shape.num_layers)
