"""How one model instance is split over several ranks: shared by the master's planner and the worker.

A sharded instance is K ranks on K nodes. Rank 0's instance takes the requests (the scheduling core
sees only it); ranks 1..K-1 follow rank 0 in lockstep and take no requests of their own. The master
hands each rank a `ShardAssignment` in its LoadInstance, and the node reports it back in the rank's
InstanceReport, so a restarted master can tell which ranks make up which instance.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Annotated, Any

import msgspec

MAX_SHARDS = 16
_MAX_ADDRESS = 262  # a host name (253) plus ":" and a port
_Address = Annotated[str, msgspec.Meta(min_length=3, max_length=_MAX_ADDRESS, pattern=r"^[^\s,]+:\d{1,5}$")]
_Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
_Dim = Annotated[int, msgspec.Meta(ge=1, le=1 << 24)]


class Sharding(enum.StrEnum):
    TENSOR = "tensor"  # every rank holds a slice of every layer (heads, MLP columns): all-reduce per layer
    PIPELINE = "pipeline"  # every rank holds a range of whole layers: activations passed rank to rank


class TransformerShape(msgspec.Struct, frozen=True, kw_only=True):
    """The transformer's shape from its config.json: what shard planning needs (a worker reports it
    with every model it holds)."""

    num_layers: _Dim
    hidden_size: _Dim
    intermediate_size: _Dim
    num_attention_heads: _Dim
    num_key_value_heads: _Dim
    vocab_size: _Dim
    head_dim: Annotated[int, msgspec.Meta(ge=0, le=1 << 24)] = 0  # 0: hidden_size // heads
    tie_word_embeddings: bool = True
    quantization_group_size: Annotated[int, msgspec.Meta(ge=1, le=1 << 16)] | None = None


def shape_from_config(config: Mapping[str, Any]) -> TransformerShape:
    """From a Hugging Face / mlx-lm config.json. KeyError, TypeError or ValueError (msgspec's
    ValidationError is one) when it lacks a field or a value is out of range."""
    quantization = config.get("quantization") or config.get("quantization_config") or {}
    heads = int(config["num_attention_heads"])
    return msgspec.convert(
        {
            "num_layers": int(config["num_hidden_layers"]),
            "hidden_size": int(config["hidden_size"]),
            "intermediate_size": int(config["intermediate_size"]),
            "num_attention_heads": heads,
            "num_key_value_heads": int(config.get("num_key_value_heads") or heads),
            "vocab_size": int(config["vocab_size"]),
            "head_dim": int(config.get("head_dim") or 0),
            "tie_word_embeddings": bool(config.get("tie_word_embeddings", True)),
            "quantization_group_size": (
                int(quantization["group_size"])
                if isinstance(quantization, dict) and "group_size" in quantization
                else None
            ),
        },
        TransformerShape,
    )


class ShardAssignment(msgspec.Struct, frozen=True, kw_only=True):
    """One rank of a sharded instance."""

    # The instance the ranks make up: rank 0's instance id, the one that takes the requests.
    group: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    rank: Annotated[int, msgspec.Meta(ge=0, lt=MAX_SHARDS)]
    # The MLX ring's addresses HOST:PORT, index = rank.
    hosts: Annotated[tuple[_Address, ...], msgspec.Meta(min_length=2, max_length=MAX_SHARDS)]
    sharding: Sharding
    # Rank 0's control socket HOST:PORT (rank 0 binds it, the others connect).
    control: _Address
    # Pipeline: layers per rank, in rank order; () for tensor parallel.
    split: Annotated[tuple[_Dim, ...], msgspec.Meta(max_length=MAX_SHARDS)] = ()
    # The memory the master planned for this rank (weights share + KV reserve), in bytes.
    memory_bytes: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] = 0

    def __post_init__(self) -> None:
        if self.rank >= len(self.hosts):
            raise ValueError(f"rank {self.rank} is outside 0..{len(self.hosts) - 1}")
        if self.split and len(self.split) != len(self.hosts):
            raise ValueError(f"the layer split {list(self.split)} needs {len(self.hosts)} counts")

    @property
    def size(self) -> int:
        return len(self.hosts)


class RingPorts(msgspec.Struct, frozen=True, kw_only=True):
    """Where a node lets MLX distributed listen: its address as the other ranks reach it, and a port
    range the master hands out from (a rank 0 takes two: its ring port and its control port)."""

    host: Annotated[str, msgspec.Meta(min_length=1, max_length=253, pattern=r"^[^\s,:]+$")]
    first: _Port
    last: _Port

    def __post_init__(self) -> None:
        if not 0 < self.first <= self.last:
            raise ValueError(f"the ring port range {self.first}-{self.last} is empty")
