"""The core's read-only face: the cluster rows served on /v1/cluster/state (and read by exoctl and
/metrics), and the counters. Built on demand; the shells never read the core's records directly."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import chain, islice
from typing import TYPE_CHECKING, Any

import msgspec

from exo_master.core.instance_state import Phase
from exo_master.core.lifecycle import TaskRecord, TaskStatus
from protocol.cluster_view import ClusterView, InstanceRow, ModelRow, NodeRow, TaskRow
from protocol.ids import NodeId

SHORT_PROMPT_CHARS = 100  # the request the view's first_token_wait is estimated for

if TYPE_CHECKING:
    from exo_master.core.master import MasterCore


class CoreCounters(msgspec.Struct, frozen=True, kw_only=True):
    """Monotonic counters and live gauges of the core, for /metrics."""

    placements: int
    replacements: int
    rejections: dict[str, int]
    finals: dict[str, int]
    orphan_cancels: int
    late_events: int
    duplicate_chunks: int
    chunks_out_of_order: int
    chunks_beyond_window: int
    output_fetches: int
    outputs_lost: int
    queue_timeouts: int
    refused_nodes: int
    affinity_lookups: int
    affinity_hits: int
    ledger: dict[str, int]  # reserved, confirmed, released, expired
    queued: int
    pending: int
    running: int


def build_view(
    core: MasterCore, now: float, task_limit: int, gaps: dict[str, int], status: TaskStatus | None
) -> ClusterView:
    state, book = core.state, core.book
    nodes = [
        NodeRow(
            node_id=n.node_id,
            address=n.address,
            alive=n.alive,
            subscribed=n.subscribed,
            last_heartbeat_age=max(0.0, now - n.last_seen),
            instances=sorted(n.instances),
            sequence_gaps=gaps.get(n.node_id, 0),
            **_facts(core, n.node_id),
        )
        for n in sorted(state.nodes.values(), key=lambda n: n.node_id)
    ]
    instances = [
        InstanceRow(
            instance_id=inst.instance_id,
            node_id=inst.node_id,
            model=inst.model,
            kinds=[str(k) for k in inst.kinds],
            status=str(inst.phase) if state.node_alive(inst) else "dead",
            in_flight=len(inst.confirmed),
            pending=book.ledger.pending(inst.instance_id),
            queued=book.queues.depth_for_model(inst.model),
            capacity=inst.capacity,
            max_concurrency=inst.max_concurrency,
            completed=inst.completed,
            failed=inst.failed,
            error=inst.error,
            prompt_cache_hits=inst.prompt_cache.hits if inst.prompt_cache else 0,
            prompt_cache_misses=inst.prompt_cache.misses if inst.prompt_cache else 0,
            prompt_cache_bytes=inst.prompt_cache.size_bytes if inst.prompt_cache else 0,
            prompt_cache_reused_tokens=inst.prompt_cache.reused_tokens if inst.prompt_cache else 0,
            prompt_tokens=inst.prompt_cache.prompt_tokens if inst.prompt_cache else 0,
            prefill_tokens=inst.work.prefill_tokens if inst.work else 0,
            decoding=inst.work.decoding if inst.work else 0,
            engine_waiting=inst.work.waiting if inst.work else 0,
            unowned=len(inst.unowned),
            prefill_rate=inst.work.prefill_rate if inst.work else 0.0,
            decode_rate=inst.work.decode_rate if inst.work else 0.0,
            chars_per_token=inst.work.chars_per_token if inst.work else 0.0,
            context_length=inst.context_length,
            first_token_wait=round(core.candidates.first_token_wait(inst, SHORT_PROMPT_CHARS), 3),
        )
        for inst in sorted(state.instances.values(), key=lambda i: i.instance_id)
    ]
    models = [
        ModelRow(
            model=model,
            instances=len(members),
            ready=sum(1 for i in members.values() if i.phase is Phase.READY and state.node_alive(i)),
            queued=book.queues.depth_for_model(model),
        )
        for model, members in sorted(state.by_model.items())
    ]
    # Live tasks first, then the recently ended ones, newest first; only `task_limit` rows built.
    candidates: Iterator[TaskRecord] = chain(book.live.values(), reversed(book.recent.values()))
    if status is not None:
        candidates = (t for t in candidates if t.status == status)
    tasks = [
        TaskRow(
            task_id=t.task_id,
            kind=str(t.kind),
            model=t.model,
            status=str(t.status),
            instance_id=t.instance_id,
            node_id=t.node_id,
            age=max(0.0, now - t.submitted_at),
            attempts=t.attempts,
            error=t.error,
        )
        for t in islice(candidates, max(0, task_limit))
    ]
    return ClusterView(
        policy=core.policy.name,
        session=core.config.session,
        nodes=nodes,
        instances=instances,
        models=models,
        tasks=tasks,
        prefix_affinity=core.scheduler.affinity is not None,
        affinity_lookups=core.stats.affinity_lookups,
        affinity_hits=core.stats.affinity_hits,
    )


def _facts(core: MasterCore, node_id: NodeId) -> dict[str, Any]:
    """Memory and backend, as the node's last heartbeat told the instance controller."""
    info = core.instances.nodes.get(node_id)
    if info is None:
        return {}
    return {
        "memory_total": info.memory_total,
        "memory_available": info.memory_available,
        "backend": info.backend,
    }
