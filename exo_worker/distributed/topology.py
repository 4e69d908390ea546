"""The spec of a sharded instance as one rank sees it, and joining its MLX `ring` group.

Every rank gets the same list of ring addresses (`--shard-hosts h0:p0,h1:p1,...`, index = rank)
and its own rank. The control channel (see control.py) listens on rank 0's host, by default on the
port after rank 0's ring port. Pipeline sharding also needs the layer split (layers per rank, in
rank order; default: even, the extra layers to the low ranks).
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from dataclasses import dataclass
from typing import Any

from protocol.sharding import Sharding


def parse_hosts(text: str) -> tuple[str, ...]:
    """ "h0:p0,h1:p1,..." -> addresses in rank order. ValueError with one readable line when malformed."""
    hosts = tuple(part.strip() for part in text.split(",") if part.strip())
    if len(hosts) < 2:
        raise ValueError(f"a sharded instance needs at least 2 ring addresses HOST:PORT, got {text!r}")
    for host in hosts:
        name, sep, port = host.rpartition(":")
        if not sep or not name or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"bad ring address {host!r}: expected HOST:PORT")
    if len(set(hosts)) != len(hosts):
        raise ValueError(f"ring addresses must be distinct: {text!r}")
    return hosts


def even_split(num_layers: int, ranks: int) -> tuple[int, ...]:
    base, extra = divmod(num_layers, ranks)
    return tuple(base + (1 if r < extra else 0) for r in range(ranks))


@dataclass(frozen=True, slots=True)
class ShardSpec:
    rank: int
    hosts: tuple[str, ...]  # ring addresses HOST:PORT, index = rank
    sharding: Sharding
    control: str = ""  # HOST:PORT of rank 0's control socket; "" = rank 0's host, ring port + 1
    split: tuple[int, ...] = ()  # pipeline: layers per rank; () = even
    # A rank silent this long is lost (heartbeats go every tenth of it).
    loss_timeout: float = 10.0
    # How long rank 0 waits for every follower to say hello (a follower, for rank 0's first word).
    join_timeout: float = 300.0
    # How long rank 0's load may take in all (the ring's set-up, every rank's weights, warm-up):
    # a ring that never comes up (a firewall, a wrong address) fails the load instead of hanging.
    load_timeout: float = 900.0

    def __post_init__(self) -> None:
        if not 0 <= self.rank < len(self.hosts):
            raise ValueError(f"rank {self.rank} is outside 0..{len(self.hosts) - 1}")
        if self.split and (len(self.split) != len(self.hosts) or min(self.split) < 1):
            raise ValueError(f"the layer split {list(self.split)} needs {len(self.hosts)} counts >= 1")
        if min(self.loss_timeout, self.join_timeout, self.load_timeout) <= 0:
            raise ValueError("timeouts must be > 0")

    @property
    def size(self) -> int:
        return len(self.hosts)

    @property
    def control_endpoint(self) -> str:
        if self.control:
            return f"tcp://{self.control}"
        host, _, port = self.hosts[0].rpartition(":")
        return f"tcp://{host}:{int(port) + 1}"

    @property
    def control_bind(self) -> str:
        """Where rank 0 binds: the control endpoint with its host resolved (ZeroMQ binds addresses)."""
        host, _, port = self.control_endpoint.removeprefix("tcp://").rpartition(":")
        return f"tcp://{socket.gethostbyname(host)}:{port}"

    def layer_range(self, num_layers: int) -> tuple[int, int]:
        """This rank's pipeline layers [start, end)."""
        split = self.split or even_split(num_layers, self.size)
        if sum(split) != num_layers:
            raise ValueError(f"the layer split {list(split)} does not sum to the model's {num_layers} layers")
        start = sum(split[: self.rank])
        return start, start + split[self.rank]

    def describe(self) -> dict[str, Any]:
        """What every rank must agree on (rank 0 compares the followers' with its own)."""
        return {"hosts": list(self.hosts), "sharding": self.sharding.value, "split": list(self.split)}


def init_group(spec: ShardSpec) -> Any:
    """Join the MLX `ring` group of `spec` (call once per process; blocks until the ring is up).

    MLX reads the ring's layout from the environment: MLX_RANK and MLX_HOSTFILE (a JSON list, per
    rank, of its addresses).
    """
    import mlx.core as mx

    with tempfile.NamedTemporaryFile("w", prefix="exo-ring-", suffix=".json", delete=False) as f:
        json.dump([[host] for host in spec.hosts], f)
    os.environ["MLX_RANK"] = str(spec.rank)
    os.environ["MLX_HOSTFILE"] = f.name
    try:
        group = mx.distributed.init(backend="ring", strict=True)
    finally:
        os.unlink(f.name)
    if group.size() != spec.size or group.rank() != spec.rank:
        raise RuntimeError(
            f"the ring came up as rank {group.rank()} of {group.size()}, not {spec.rank} of {spec.size}"
        )
    return group
