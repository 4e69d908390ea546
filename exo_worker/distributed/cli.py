"""exo-worker's sharding flags (preview, until the master places shards itself).

    exo-worker --engine mlx --model smollm2 --shard-rank 1 --shard-hosts h0:p0,h1:p1,h2:p2   # a follower
    exo-worker --engine mlx --model smollm2 --master M:52416 --shard-rank 0 --shard-hosts ...  # rank 0

Rank 0 is an ordinary worker with one instance whose engine is a `ShardedEngine`: it registers
the instance with the master and serves its requests. Ranks > 0 only follow rank 0 (no master
link). Every rank gets the same --shard-hosts (index = rank), --sharding and --shard-layers.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from exo_worker.distributed.topology import ShardSpec, parse_hosts
from exo_worker.engine import Engine
from protocol.ids import InstanceId
from protocol.sharding import Sharding

if TYPE_CHECKING:
    from exo_worker.distributed.engine import ShardedEngine

EXIT_SHARD_LOST = 3  # rank 0 ended because its instance lost a rank (same code as a follower's)


def shard_spec(
    rank: int | None,
    hosts: str | None,
    sharding: Sharding,
    layers: str | None,
    control: str | None,
    loss_timeout: float,
) -> ShardSpec | None:
    """The spec from the flags; None when this worker is not a rank. typer.BadParameter on bad flags."""
    if rank is None and not hosts:
        return None
    if rank is None or not hosts:
        raise typer.BadParameter("--shard-rank and --shard-hosts go together", param_hint="--shard-rank")
    try:
        split = tuple(int(n) for n in layers.split(",")) if layers else ()
        return ShardSpec(
            rank=rank,
            hosts=parse_hosts(hosts),
            sharding=sharding,
            control=control or "",
            split=split,
            loss_timeout=loss_timeout,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--shard-hosts") from exc


class ShardedFactory:
    """The engine factory of rank 0: one ShardedEngine, kept so the daemon can watch and close it."""

    def __init__(
        self, model: str | Path, spec: ShardSpec, *, max_batch: int, prompt_cache_bytes: int | None
    ) -> None:
        self._model = model
        self._spec = spec
        self._max_batch = max_batch
        self._prompt_cache_bytes = prompt_cache_bytes
        self.engine: ShardedEngine | None = None

    def __call__(self, instance_id: InstanceId) -> Engine:
        from exo_worker.distributed.engine import ShardedEngine

        if self.engine is not None:
            raise typer.BadParameter("a sharded worker serves one instance", param_hint="--instances")
        self.engine = ShardedEngine(
            self._model,
            self._spec,
            label=str(self._model),
            max_batch=self._max_batch,
            prompt_cache_bytes=self._prompt_cache_bytes,
        )
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
