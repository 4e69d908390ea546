"""Desired state: the placements an operator asked for, and the versioned form they are saved in.

A placement is a model with a number of replicas (each one node's, or split over `shards` nodes),
optionally limited to some nodes or kept off
others, with the slots (`max_concurrency`) and relative speed (`capacity`) of each replica. Its id
is chosen by the shell (random, so ids never repeat across master restarts); the core only keeps it.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from protocol.ids import ModelId, NodeId
from protocol.messages import MAX_CAPACITY, MAX_CONCURRENCY, MAX_ID_CHARS
from protocol.sharding import MAX_SHARDS, Sharding

MAX_REPLICAS = 64
MAX_NODE_FILTER = 64
STATE_VERSION = 1

_Id = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_CHARS)]
_Nodes = Annotated[
    tuple[Annotated[str, msgspec.Meta(max_length=MAX_ID_CHARS)], ...],
    msgspec.Meta(max_length=MAX_NODE_FILTER),
]


class PlacementSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    placement_id: _Id
    model: _Id
    replicas: Annotated[int, msgspec.Meta(ge=1, le=MAX_REPLICAS)] = 1
    nodes: _Nodes = ()  # use only these nodes (empty: any node)
    exclude: _Nodes = ()  # never these nodes
    max_concurrency: Annotated[int, msgspec.Meta(ge=1, le=MAX_CONCURRENCY)] = 4
    capacity: Annotated[float, msgspec.Meta(gt=0, le=MAX_CAPACITY)] = 1.0
    # More than 1: each replica is one instance split over this many nodes (MLX distributed).
    shards: Annotated[int, msgspec.Meta(ge=1, le=MAX_SHARDS)] = 1
    sharding: Sharding = Sharding.TENSOR

    @property
    def model_id(self) -> ModelId:
        return ModelId(self.model)

    def describe(self) -> str:
        shards = f" in {self.shards} {self.sharding.value} shards" if self.shards > 1 else ""
        return f"{self.replicas} x {self.model}{shards}"

    def allows(self, node_id: NodeId) -> str | None:
        """Why the spec keeps this node out, or None."""
        if node_id in self.exclude:
            return "excluded by the placement"
        if self.nodes and node_id not in self.nodes:
            return "not among the placement's nodes"
        return None


class DesiredFile(msgspec.Struct, frozen=True, kw_only=True):
    """What `--state-dir` holds (instances.json). `version` changes when the format does."""

    version: int = STATE_VERSION
    placements: tuple[PlacementSpec, ...] = ()


class StateFileError(ValueError):
    """The state file cannot be read as this version's format. One readable line."""


def encode_desired(placements: tuple[PlacementSpec, ...]) -> bytes:
    return msgspec.json.format(msgspec.json.encode(DesiredFile(placements=placements)), indent=2)


def decode_desired(data: bytes) -> tuple[PlacementSpec, ...]:
    try:
        raw = msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise StateFileError(f"not JSON: {exc}") from None
    version = raw.get("version") if isinstance(raw, dict) else None
    if version != STATE_VERSION:
        raise StateFileError(
            f"unsupported state file version {version!r} (this master reads {STATE_VERSION})"
        )
    try:
        return msgspec.convert(raw, DesiredFile).placements
    except msgspec.ValidationError as exc:
        raise StateFileError(str(exc)) from None
