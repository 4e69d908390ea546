"""The instance controller: reconciles desired placements with what the nodes report.

Level-triggered and idempotent, like a Kubernetes controller: every `reconcile(now)` compares the
desired replicas of each placement with the live ones and acts on the difference, whatever
happened in between; commands (LoadInstance, UnloadInstance) are re-sent until the nodes' heartbeats
show them done. Pure: time comes in as `now`; the node facts the core owns (alive, tasks in flight,
eligibility) are read and written through `CoreSide`.

Healing: a placement with fewer live replicas than desired gets new ones placed by the rule on
other nodes. A failed load puts that node in backoff for the placement (doubling up to a cap) and
delays the next attempt; after `max_failures` failures in a row the placement stops retrying and
says why, until a node it never failed on has room. A ready replica is never moved, and a replica
found beyond the desired count is drained, so nothing flaps. After a restart, placements wait
`adopt_grace` for the nodes to report what they already hold (adopted, not reloaded) before
anything is placed.
"""

from __future__ import annotations

from collections import deque

from exo_master.core.instances.desired import PlacementSpec
from exo_master.core.instances.groups import group_replicas, live_instances, models_coming, ports_taken
from exo_master.core.instances.lifecycle import ReplicaEvent, ReplicaState, advance, allowed
from exo_master.core.instances.nodes import node_views
from exo_master.core.instances.records import (
    ControllerConfig,
    CoreSide,
    InstanceEvent,
    NodeInfo,
    PlacementRecord,
    Replica,
)
from exo_master.core.instances.rule import NodeView, Plan, RankPlace, plan
from exo_master.core.instances.shard_rule import PortBook, plan_sharded
from protocol.ids import InstanceId, NodeId
from protocol.messages import InstanceReport, InstanceStatus, LoadInstance, UnloadInstance, WorkerHeartbeat

Command = LoadInstance | UnloadInstance


class InstanceController:
    def __init__(self, core: CoreSide, config: ControllerConfig | None = None) -> None:
        self.core = core
        self.config = config or ControllerConfig()
        self.nodes: dict[NodeId, NodeInfo] = {}
        self.placements: dict[str, PlacementRecord] = {}
        self.replicas: dict[InstanceId, Replica] = {}
        self.events: deque[InstanceEvent] = deque(maxlen=self.config.max_events)
        self.revision = 0  # +1 whenever desired state changes: the shell saves it then
        self._hold_until = float("-inf")
        self._next_prune = float("-inf")
        self.port_cursor: dict[str, int] = {}  # ring host -> where the next port search starts
        self._out: list[Command | InstanceEvent] = []

    # ---- desired state --------------------------------------------------------------------------

    def preview(self, spec: PlacementSpec) -> Plan:
        return self._plan(spec, spec.replicas, frozenset(), dict(self.port_cursor))

    def _plan(
        self, spec: PlacementSpec, wanted: int, avoid: frozenset[NodeId], cursor: dict[str, int]
    ) -> Plan:
        views, context = self.node_views(), self.config.context_tokens
        if spec.shards == 1:
            return plan(spec, wanted, views, avoid, context)
        return plan_sharded(
            spec, wanted, views, PortBook(ports_taken(self.replicas.values()), cursor), avoid, context
        )

    def _start_all(self, record: PlacementRecord, result: Plan, now: float) -> None:
        for group in result.groups:
            self._start_group(record, group, now)
        if not result.groups:
            for node_id in result.chosen:
                self._start(record, node_id, result.need, now)

    def place(self, spec: PlacementSpec, now: float) -> Plan:
        """Add a placement if every replica fits now; the plan says where, or why not per node."""
        assert spec.placement_id not in self.placements, f"placement {spec.placement_id} exists"
        result = self._plan(spec, spec.replicas, frozenset(), self.port_cursor)
        if result.complete:
            record = self.placements[spec.placement_id] = PlacementRecord(spec=spec)
            self.revision += 1
            self._event(now, spec.placement_id, "placed", detail=spec.describe())
            self._start_all(record, result, now)
        return result

    def delete(self, placement_id: str, now: float) -> bool:
        record = self.placements.get(placement_id)
        if record is None:
            return False
        if not record.deleting:
            record.deleting = True
            self.revision += 1
            self._event(now, placement_id, "deleting")
            self._converge(record, now)  # drains now; the commands go out with the next reconcile
        return True

    def restore(self, specs: tuple[PlacementSpec, ...], now: float) -> None:
        """Desired state from the state file: adopt what nodes report before placing anything."""
        for spec in specs:
            self.placements[spec.placement_id] = PlacementRecord(spec=spec)
            self._event(now, spec.placement_id, "restored", detail=spec.describe())
        self._hold_until = now + self.config.adopt_grace

    def specs(self) -> tuple[PlacementSpec, ...]:
        return tuple(r.spec for r in self.placements.values() if not r.deleting)

    # ---- actual state ---------------------------------------------------------------------------

    def heartbeat(self, msg: WorkerHeartbeat, now: float) -> None:
        if self.core.node_alive(msg.node_id) is None:
            return  # the core refused the node (too many): so do we, and our table stays bounded
        info = self.nodes.get(msg.node_id)
        if info is None:
            info = self.nodes[msg.node_id] = NodeInfo(node_id=msg.node_id)
        info.memory_total, info.memory_available = msg.memory_total, msg.memory_available
        info.backend, info.host = msg.backend, msg.host or msg.address
        info.ring = msg.ring
        info.models = {m.model: m for m in msg.models}
        info.reports = {r.instance_id: r for r in msg.instances}
        for report in msg.instances:
            replica = self.replicas.get(report.instance_id)
            if replica is None:
                self._unknown(info, report, now)
            elif replica.node_id == msg.node_id:
                self._observe(replica, report, now)
        for replica in [r for r in self.replicas.values() if r.node_id == msg.node_id]:
            if replica.instance_id not in info.reports:
                self._vanished(replica, now)
        self.core.set_coming(models_coming(self.replicas.values()))

    def _observe(self, replica: Replica, report: InstanceReport, now: float) -> None:
        replica.progress = 1.0 if report.status is InstanceStatus.READY else report.progress
        replica.memory_bytes = report.memory_bytes
        event = {
            InstanceStatus.LOADING: ReplicaEvent.REPORTED_LOADING,
            InstanceStatus.READY: ReplicaEvent.REPORTED_READY,
            InstanceStatus.FAILED: ReplicaEvent.REPORTED_FAILED,
        }[report.status]
        if allowed(replica.state, event):  # a report is an observation: a stale one is ignored
            self._move(replica, event, now, report.error or "")

    def _vanished(self, replica: Replica, now: float) -> None:
        if replica.state is ReplicaState.PLACING:
            return  # the node has not started it yet: re-sent, or timed out
        if replica.state in (ReplicaState.UNLOADING, ReplicaState.FAILED):
            self._move(replica, ReplicaEvent.UNLOADED, now)
        else:
            self._move(replica, ReplicaEvent.LOST, now, f"{replica.node_id} no longer reports it")

    def _unknown(self, info: NodeInfo, report: InstanceReport, now: float) -> None:
        """A node reports an instance the controller does not track: adopt it, or unload it."""
        if not report.placement:
            return  # declared by the worker itself (--model): unmanaged, never touched
        record = self.placements.get(report.placement)
        live = sum(1 for _ in live_instances(self.replicas.values(), report.placement))
        follower = report.shard is not None and report.shard.rank > 0
        if (
            record is not None
            and not record.deleting
            and record.spec.model == report.model
            and report.status is not InstanceStatus.FAILED
            and (follower or live < record.spec.replicas)
        ):
            # A follower is adopted with its instance; if rank 0 never shows up, _check unloads it.
            replica = self.replicas[report.instance_id] = Replica.adopted(info.node_id, report, now)
            if replica.index is not None:
                record.next_index = max(record.next_index, replica.index + 1)
            what = replica.state.value
            self._event(now, report.placement, "adopted", report.instance_id, info.node_id, what)
            return
        if now < self._hold_until and record is None:
            return  # the state file may not be restored yet: decide after the grace period
        self._out.append(UnloadInstance(node_id=info.node_id, instance_id=report.instance_id))
        self._event(now, report.placement, "unload-stray", report.instance_id, info.node_id)

    # ---- the reconcile step ---------------------------------------------------------------------

    def reconcile(self, now: float) -> list[Command | InstanceEvent]:
        if now >= self._next_prune:  # O(nodes): once a resend period, not on every heartbeat
            self._next_prune = now + self.config.resend
            for node_id in [n for n in self.nodes if self.core.node_alive(n) is None]:
                del self.nodes[node_id]  # the core forgot it (dead too long): so do we
        for replica in list(self.replicas.values()):
            self._check(replica, now)
        for record in list(self.placements.values()):
            self._converge(record, now)
        self.core.set_coming(models_coming(self.replicas.values()))
        out = self._out[:]
        self._out.clear()
        return out

    def _check(self, replica: Replica, now: float) -> None:
        alive = self.core.node_alive(replica.node_id)
        state = replica.state
        if replica.rank > 0 and replica.group not in self.replicas and state.live and now >= self._hold_until:
            self._move(replica, ReplicaEvent.LOST, now, f"its rank 0 ({replica.group}) is gone")
            return
        if not alive:
            why = f"node {replica.node_id} is not alive"
            self._move(replica, ReplicaEvent.LOST, now, why)
            if replica.state is ReplicaState.FAILED:  # nothing to unload on a dead node: forget it
                self._move(replica, ReplicaEvent.LOST, now, why)
            return
        if state is ReplicaState.PLACING:
            if now - replica.since >= self.config.start_timeout:
                self._move(replica, ReplicaEvent.TIMED_OUT, now, "the node did not start loading it")
            elif now - replica.sent_at >= self.config.resend:
                self._send_load(replica, now)
        elif state is ReplicaState.LOADING and now - replica.since >= self.config.load_timeout:
            self._move(
                replica, ReplicaEvent.TIMED_OUT, now, f"not loaded in {self.config.load_timeout:.0f} s"
            )
        elif state is ReplicaState.DRAINING:
            if self.core.in_flight(replica.instance_id) == 0 or now >= replica.drain_until:
                self._move(replica, ReplicaEvent.DRAINED, now)
        elif state in (ReplicaState.UNLOADING, ReplicaState.FAILED):
            reported = replica.instance_id in self._reports_of(replica.node_id)
            if reported and now - replica.sent_at >= self.config.resend:
                replica.sent_at = now
                self._out.append(UnloadInstance(node_id=replica.node_id, instance_id=replica.instance_id))

    def _converge(self, record: PlacementRecord, now: float) -> None:
        spec = record.spec
        live = list(live_instances(self.replicas.values(), spec.placement_id))
        if record.deleting:
            for replica in live:
                self._drain(replica, now)
            if not any(r.placement_id == spec.placement_id for r in self.replicas.values()):
                del self.placements[spec.placement_id]
                self._event(now, spec.placement_id, "deleted")
            return
        if len(live) > spec.replicas:  # adopted or returned beyond the count: newest go first
            ranked = sorted(live, key=lambda r: (r.state is ReplicaState.READY, -r.since, r.instance_id))
            for replica in ranked[: len(live) - spec.replicas]:
                self._drain(replica, now)
            return
        missing = spec.replicas - len(live)
        if missing <= 0:
            record.reason = ""
            return
        if now < self._hold_until or now < record.retry_at:
            return
        if record.failures >= self.config.max_failures:
            # Stopped: only a node this placement never failed on (one that joined, or freed
            # memory since) starts it again, there first.
            result = self._plan(spec, missing, frozenset(record.backoff), self.port_cursor)
            if not result.chosen:
                record.retry_at = now + self.config.backoff_initial  # looked again now and then
                return
            record.failures = 0
            self._event(now, spec.placement_id, "retrying", detail=f"room on {', '.join(result.chosen)}")
        else:
            avoid = frozenset(n for n, until in record.backoff.items() if until > now)
            result = self._plan(spec, missing, avoid, self.port_cursor)
        self._start_all(record, result, now)
        if not result.complete:
            reason = f"{missing - len(result.chosen)} replica(s) do not fit: {result.why()}"
            record.retry_at = now + self.config.backoff_initial
            if reason != record.reason:  # a step when the situation changes, not every retry
                record.reason = reason
                self._event(now, spec.placement_id, "waiting", detail=reason)

    # ---- transitions and commands ---------------------------------------------------------------

    def _start(self, record: PlacementRecord, node_id: NodeId, need: int, now: float) -> None:
        spec = record.spec
        # In the node's namespace (NODE/...): the bus accepts reports of a node's own instances only.
        instance_id = InstanceId(f"{node_id}/{spec.placement_id}.{record.next_index}")
        record.next_index += 1
        replica = Replica(
            instance_id=instance_id,
            placement_id=spec.placement_id,
            model=spec.model_id,
            node_id=node_id,
            need=need,
            state=ReplicaState.PLACING,
            since=now,
        )
        self.replicas[instance_id] = replica
        self._event(now, spec.placement_id, "load", instance_id, node_id)
        self._send_load(replica, now)

    def _start_group(self, record: PlacementRecord, group: tuple[RankPlace, ...], now: float) -> None:
        for replica in group_replicas(record.spec, record.next_index, group, now):
            self.replicas[replica.instance_id] = replica
            shard = replica.shard
            assert shard is not None
            what = f"rank {shard.rank} of {shard.size} at {shard.hosts[shard.rank]}"
            self._event(now, replica.placement_id, "load", replica.instance_id, replica.node_id, what)
            self._send_load(replica, now)
        record.next_index += 1

    def _send_load(self, replica: Replica, now: float) -> None:
        spec = self.placements[replica.placement_id].spec
        replica.sent_at = now
        self._out.append(
            LoadInstance(
                node_id=replica.node_id,
                instance_id=replica.instance_id,
                model=replica.model,
                placement=replica.placement_id,
                max_concurrency=spec.max_concurrency,
                capacity=spec.capacity,
                shard=replica.shard,
            )
        )

    def _drain(self, replica: Replica, now: float) -> None:
        self._move(replica, ReplicaEvent.DRAIN, now)
        if replica.state is ReplicaState.DRAINING:
            replica.drain_until = now + self.config.drain_grace
            self.core.set_draining(replica.instance_id)

    def _move(
        self, replica: Replica, event: ReplicaEvent, now: float, reason: str = "", cascade: bool = False
    ) -> None:
        before = replica.state
        replica.state = advance(before, event)
        if replica.state is before:
            return
        replica.since = now
        if reason:
            replica.reason = reason
        self._event(
            now, replica.placement_id, replica.state.value, replica.instance_id, replica.node_id, reason
        )
        record = self.placements.get(replica.placement_id)
        if replica.state is ReplicaState.UNLOADING:
            self.core.set_draining(replica.instance_id)
            replica.sent_at = now
            self._out.append(UnloadInstance(node_id=replica.node_id, instance_id=replica.instance_id))
        elif replica.state is ReplicaState.READY and record is not None:
            record.failures, record.retry_at, record.reason = 0, float("-inf"), ""
        elif (
            replica.state is ReplicaState.FAILED
            and record is not None
            and before is not ReplicaState.READY
            and not cascade  # a rank failed because another one did: only that one counts
        ):
            # A load that failed (or whose node died loading it) backs off; a ready replica lost
            # with its node is replaced at once. A failed replica on a dead node is dropped by the
            # next check (LOST again: gone); on a live one it is unloaded first.
            self._failed_load(record, replica, now)
        elif replica.state is ReplicaState.GONE:
            del self.replicas[replica.instance_id]
        if replica.shard is not None and not cascade:
            self._follow_group(replica, before, now)

    def _follow_group(self, replica: Replica, before: ReplicaState, now: float) -> None:
        """The ranks of a sharded instance share one fate: one failed fails them all (and rank 0
        takes no new tasks at once); rank 0 leaving takes its followers with it. Only the rank that
        moved first acts (the others move as a cascade), so each names the one cause."""
        members = [m for m in self.replicas.values() if m.group == replica.group and m is not replica]
        if replica.state is ReplicaState.FAILED or (replica.state is ReplicaState.GONE and before.live):
            why = f"rank {replica.rank} ({replica.instance_id}) failed: {replica.reason}"
            self.core.broken(replica.group, f"sharded instance {replica.group} lost a rank: {why}")
            for member in members:
                if member.state.live:
                    self._move(member, ReplicaEvent.LOST, now, why, cascade=True)
                elif member.state is ReplicaState.DRAINING:
                    self._move(member, ReplicaEvent.DRAINED, now, why, cascade=True)
            record = self.placements.get(replica.placement_id)
            if record is not None:
                self._converge(record, now)  # placed again now: requests wait for it, not fail
        elif replica.rank == 0 and replica.state in (ReplicaState.UNLOADING, ReplicaState.GONE):
            for member in members:
                if member.state.live:
                    self._move(member, ReplicaEvent.DRAIN, now, cascade=True)
                if member.state is ReplicaState.DRAINING:
                    self._move(member, ReplicaEvent.DRAINED, now, cascade=True)

    def _failed_load(self, record: PlacementRecord, replica: Replica, now: float) -> None:
        # The placement tries again soon, on another node if one has room; the node that failed
        # waits longer, doubling with each failure in a row (capped).
        record.failures += 1
        delay = min(self.config.backoff_max, self.config.backoff_initial * 2**record.failures)
        record.backoff[replica.node_id] = now + delay
        record.retry_at = now + self.config.backoff_initial
        if record.failures >= self.config.max_failures:
            record.reason = f"stopped after {record.failures} failed loads; last: {replica.reason}"
            self._event(now, record.spec.placement_id, "gave-up", detail=record.reason)

    def _event(
        self,
        now: float,
        placement_id: str,
        what: str,
        instance_id: str = "",
        node_id: str = "",
        detail: str = "",
    ) -> None:
        event = InstanceEvent(now, placement_id, what, instance_id, node_id, detail)
        self.events.append(event)
        self._out.append(event)

    # ---- queries --------------------------------------------------------------------------------

    def _reports_of(self, node_id: NodeId) -> dict[InstanceId, InstanceReport]:
        info = self.nodes.get(node_id)
        return info.reports if info is not None else {}

    def node_views(self) -> list[NodeView]:
        return node_views(self.nodes.values(), self.replicas.values(), self.core.node_alive)
