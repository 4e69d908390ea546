"""Sharded instances in the controller: the ranks of one instance are created together, as one
replica record per rank sharing rank 0's instance id as their group, and hold their ring ports
until their records are gone, and an instance is counted once, by its rank 0 (a whole instance is its
own rank 0). (Their shared fate is `InstanceController._follow_group`.)"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from exo_master.core.instances.desired import PlacementSpec
from exo_master.core.instances.lifecycle import ReplicaState
from exo_master.core.instances.records import Replica
from exo_master.core.instances.rule import RankPlace
from protocol.ids import InstanceId, ModelId
from protocol.sharding import ShardAssignment, Sharding


def group_replicas(
    spec: PlacementSpec, index: int, group: tuple[RankPlace, ...], now: float
) -> list[Replica]:
    """One replica per rank of the placement's instance number `index`. Every id lives in its own
    node's namespace (the bus accepts a node's reports of its own instances only); rank 0's is the
    instance's id, the one the scheduling core sees."""
    base = f"{spec.placement_id}.{index}"
    leader = InstanceId(f"{group[0].node_id}/{base}")
    pipeline = spec.sharding is Sharding.PIPELINE
    replicas = []
    for place in group:
        assignment = ShardAssignment(
            group=leader,
            rank=place.rank,
            hosts=tuple(p.address for p in group),
            sharding=spec.sharding,
            control=group[0].control,
            split=tuple(p.layers[1] - p.layers[0] for p in group) if pipeline else (),
            memory_bytes=place.need,
        )
        replicas.append(
            Replica(
                instance_id=leader
                if place.rank == 0
                else InstanceId(f"{place.node_id}/{base}.r{place.rank}"),
                placement_id=spec.placement_id,
                model=spec.model_id,
                node_id=place.node_id,
                need=place.need,
                state=ReplicaState.PLACING,
                since=now,
                shard=assignment,
            )
        )
    return replicas


def ports_taken(replicas: Iterable[Replica]) -> dict[str, set[int]]:
    """The ring and control ports each host's ranks hold (until their records are gone: a failed
    rank's process may still be exiting)."""
    taken: dict[str, set[int]] = {}
    for replica in replicas:
        shard = replica.shard
        if shard is None:
            continue
        for address in (shard.hosts[shard.rank], shard.control if shard.rank == 0 else ""):
            host, _, port = address.rpartition(":")
            if port.isdigit():
                taken.setdefault(host, set()).add(int(port))
    return taken


def live_instances(replicas: Iterable[Replica], placement_id: str) -> Iterator[Replica]:
    """The placement's live instances (a sharded one counts once: its rank 0)."""
    return (r for r in replicas if r.placement_id == placement_id and r.state.live and r.rank == 0)


def models_coming(replicas: Iterable[Replica]) -> frozenset[ModelId]:
    """Models with an instance being placed or loaded (requests for them wait instead of failing)."""
    loading = (ReplicaState.PLACING, ReplicaState.LOADING)
    return frozenset(r.model for r in replicas if r.rank == 0 and r.state in loading)
