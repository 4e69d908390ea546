"""Shard planning: how one model instance is split over K nodes, or why it cannot be (pure).

The master calls `plan_shards` with the model's shape (from its config.json and the size of its
weights), the candidate nodes with their free memory, K and the kind of sharding. The answer is
either a `ShardPlan` (a rank per node: rank 0 first, with its layer range and the bytes it needs)
or an `Impossible` with one readable reason per problem, for the placement preview.

Memory per rank, and why it is estimated this way:
- The weights' bytes are split between the *shared* part (token embedding, plus the output head
  when it is not tied) and the transformer layers, in proportion to their parameter counts: the
  file size is what is loaded, the parameter counts say where it goes. Every rank keeps the shared
  part (the embedding feeds rank 0, the head is computed on every rank so every rank samples the
  same token, see exo_worker/distributed).
- Tensor parallel: every rank holds 1/K of every layer (attention heads and MLP columns split).
- Pipeline parallel: a rank holds whole layers, its own range.
- Each rank also reserves KV cache room for `kv_reserve_tokens` tokens of its layers / heads.

Tensor parallel needs what mlx-lm's `shard()` needs: attention heads, KV heads and the MLP's
intermediate size divisible by K, and, for quantized weights, the split input dimensions of the
"sharded-to-all" projections (o_proj, down_proj) a multiple of the quantization group size.
Pipeline parallel needs K <= layers; layers go to ranks by D'Hondt over each rank's memory left
after the shared part and its reserve, capped by what fits: more free memory never gets fewer layers.

Nodes are taken by free memory (largest first; ties by node id), so the answer does not depend
on the order of the candidates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from protocol.sharding import Sharding, TransformerShape, shape_from_config

_KV_BYTES_PER_VALUE = 2  # fp16 / bf16 keys and values


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What planning needs to know about a model (a Llama-family transformer)."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    weight_bytes: int  # the size of its weight files
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    tie_word_embeddings: bool = True
    quantization_group_size: int | None = None  # None: not quantized

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "intermediate_size", "num_attention_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_key_value_heads < 1 or self.vocab_size < 1 or self.weight_bytes < 0:
            raise ValueError("num_key_value_heads and vocab_size must be >= 1, weight_bytes >= 0")

    @classmethod
    def from_config(cls, config: Mapping[str, Any], weight_bytes: int) -> ModelShape:
        """From a Hugging Face / mlx-lm config.json. KeyError or ValueError when it lacks a field."""
        return cls.from_report(shape_from_config(config), weight_bytes)

    @classmethod
    def from_report(cls, shape: TransformerShape, weight_bytes: int) -> ModelShape:
        """From the shape a worker reports with a model it holds."""
        return cls(
            num_layers=shape.num_layers,
            hidden_size=shape.hidden_size,
            intermediate_size=shape.intermediate_size,
            num_attention_heads=shape.num_attention_heads,
            num_key_value_heads=shape.num_key_value_heads,
            vocab_size=shape.vocab_size,
            weight_bytes=weight_bytes,
            head_dim=shape.head_dim,
            tie_word_embeddings=shape.tie_word_embeddings,
            quantization_group_size=shape.quantization_group_size,
        )

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def _layer_params(self) -> int:
        h, d = self.hidden_size, self.dim_per_head
        attention = h * d * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        return attention + 3 * h * self.intermediate_size

    def _shared_params(self) -> int:
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    @property
    def shared_bytes(self) -> int:
        """Bytes of the embedding (and untied head): on every rank."""
        total = self._shared_params() + self.num_layers * self._layer_params()
        return self.weight_bytes * self._shared_params() // total

    @property
    def layer_bytes(self) -> int:
        """Bytes of one transformer layer (rounded up)."""
        return math.ceil((self.weight_bytes - self.shared_bytes) / self.num_layers)

    def kv_bytes_per_token_per_layer(self) -> int:
        return 2 * self.num_key_value_heads * self.dim_per_head * _KV_BYTES_PER_VALUE


@dataclass(frozen=True, slots=True)
class Candidate:
    node_id: str
    free_bytes: int


@dataclass(frozen=True, slots=True)
class RankAssignment:
    rank: int
    node_id: str
    layer_start: int  # pipeline: this rank's layers [layer_start, layer_end); tensor: all layers
    layer_end: int
    bytes_needed: int


@dataclass(frozen=True, slots=True)
class ShardPlan:
    sharding: Sharding
    ranks: tuple[RankAssignment, ...]

    @property
    def split(self) -> tuple[int, ...]:
        """Layers per rank (pipeline), as the worker's `--shard-layers` takes them."""
        return tuple(r.layer_end - r.layer_start for r in self.ranks)


@dataclass(frozen=True, slots=True)
class Impossible:
    reasons: tuple[str, ...]


def tensor_divisibility_problems(shape: ModelShape, shards: int) -> list[str]:
    """Why mlx-lm's tensor-parallel `shard()` cannot split this model `shards` ways (empty: it can)."""
    problems: list[str] = []
    for what, value in (
        ("attention heads", shape.num_attention_heads),
        ("KV heads", shape.num_key_value_heads),
        ("intermediate size", shape.intermediate_size),
    ):
        if value % shards:
            problems.append(f"{what} ({value}) do not divide by {shards}")
    group = shape.quantization_group_size
    if group and not problems:
        for what, dim in (
            ("attention output input", shape.num_attention_heads * shape.dim_per_head),
            ("MLP down-projection input", shape.intermediate_size),
        ):
            if (dim // shards) % group:
                problems.append(
                    f"{what} split {shards} ways ({dim // shards}) is not a multiple of "
                    f"the quantization group size {group}"
                )
    return problems


def plan_shards(
    shape: ModelShape,
    candidates: Sequence[Candidate],
    shards: int,
    sharding: Sharding,
    *,
    kv_reserve_tokens: int = 4096,
) -> ShardPlan | Impossible:
    """Assign `shards` ranks to distinct candidate nodes, or say why that is impossible."""
    if shards < 1:
        return Impossible((f"the shard count must be >= 1, got {shards}",))
    ids = [c.node_id for c in candidates]
    if len(set(ids)) != len(ids):
        raise ValueError(f"candidate node ids must be distinct: {sorted(ids)}")
    reasons: list[str] = []
    if len(candidates) < shards:
        reasons.append(f"{shards} shards need {shards} nodes, only {len(candidates)} available")
    if sharding is Sharding.TENSOR:
        reasons += tensor_divisibility_problems(shape, shards)
    elif shards > shape.num_layers:
        reasons.append(f"{shards} pipeline shards for {shape.num_layers} layers: at most one rank per layer")
    if reasons:
        return Impossible(tuple(reasons))
    nodes = sorted(candidates, key=lambda c: (-c.free_bytes, c.node_id))[:shards]
    if sharding is Sharding.TENSOR:
        return _plan_tensor(shape, nodes, kv_reserve_tokens)
    return _plan_pipeline(shape, nodes, kv_reserve_tokens)


def _plan_tensor(shape: ModelShape, nodes: list[Candidate], kv_tokens: int) -> ShardPlan | Impossible:
    k = len(nodes)
    per_layer = math.ceil(shape.layer_bytes / k) + math.ceil(
        kv_tokens * shape.kv_bytes_per_token_per_layer() / k
    )
    need = shape.shared_bytes + shape.num_layers * per_layer
    short = [n for n in nodes if n.free_bytes < need]
    if short:
        return Impossible(tuple(_not_enough(n, need) for n in short))
    ranks = tuple(RankAssignment(r, n.node_id, 0, shape.num_layers, need) for r, n in enumerate(nodes))
    return ShardPlan(Sharding.TENSOR, ranks)


def _plan_pipeline(shape: ModelShape, nodes: list[Candidate], kv_tokens: int) -> ShardPlan | Impossible:
    per_layer = shape.layer_bytes + kv_tokens * shape.kv_bytes_per_token_per_layer()
    room = [n.free_bytes - shape.shared_bytes for n in nodes]
    caps = [max(0, r) // per_layer for r in room]
    short = [(n, shape.shared_bytes + per_layer) for n, cap in zip(nodes, caps, strict=True) if cap < 1]
    if short:
        return Impossible(tuple(_not_enough(n, need) for n, need in short))
    if sum(caps) < shape.num_layers:
        total_free = sum(n.free_bytes for n in nodes)
        total_need = len(nodes) * shape.shared_bytes + shape.num_layers * per_layer
        return Impossible(
            (f"not enough memory on {len(nodes)} nodes: {_gib(total_need)} needed, {_gib(total_free)} free",)
        )
    layers = [1] * len(nodes)
    for _ in range(shape.num_layers - len(nodes)):  # D'Hondt: the next layer to the largest quotient
        best = max(
            (i for i in range(len(nodes)) if layers[i] < caps[i]),
            key=lambda i: (room[i] / (layers[i] + 1), -i),
        )
        layers[best] += 1
    ranks, start = [], 0
    for rank, (node, count) in enumerate(zip(nodes, layers, strict=True)):
        need = shape.shared_bytes + count * per_layer
        ranks.append(RankAssignment(rank, node.node_id, start, start + count, need))
        start += count
    return ShardPlan(Sharding.PIPELINE, tuple(ranks))


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def _not_enough(node: Candidate, need: int) -> str:
    return f"node {node.node_id}: {_gib(need)} needed for its shard, {_gib(node.free_bytes)} free"
