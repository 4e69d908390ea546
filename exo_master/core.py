"""MasterCore: the deterministic scheduling core. No sockets, no clock reads, no randomness.

Shells feed it events with the current time (`handle(event, now)`, `tick(now)`) and send what it
returns. Everything the master decides happens here: the state projection from worker events,
the pending-assignment ledger, placement through one policy for every task kind, the wait
queues, assignment re-sends, TTL re-placement and node liveness.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import chain, islice

from exo_master.events import (
    CancelRequest,
    CoreInput,
    Effect,
    NodeSubscribed,
    NodeUnsubscribed,
    RejectReason,
    SubmitTask,
    TaskCompleted,
    TaskErrored,
    TaskOutput,
    TaskPlaced,
    TaskQueued,
    TaskRejected,
)
from exo_master.ledger import PendingLedger
from exo_master.placement import make_policy
from exo_master.pool import InstancePool
from exo_master.queue import QueueKey, WaitQueues
from exo_master.state import ClusterState, InstanceView, NodeView, TaskRecord, TaskStatus
from exo_master.views import ClusterView, InstanceRow, ModelRow, NodeRow, TaskRow
from protocol.ids import InstanceId, NodeId, TaskId
from protocol.messages import (
    AssignTask,
    CancelTask,
    FinishReason,
    InstanceReport,
    InstanceStatus,
    MasterHeartbeat,
    TaskAccepted,
    TaskChunk,
    TaskFailed,
    TaskFinished,
    Usage,
    WorkerHeartbeat,
)


@dataclass(frozen=True, slots=True)
class CoreConfig:
    policy: str = "least-loaded"
    seed: int = 0
    session: str = "master"
    heartbeat_interval: float = 1.0
    heartbeat_liveness: int = 3  # missed heartbeats before a node is dead
    ledger_ttl: float = 5.0  # well above liveness x interval: a silent node is declared dead first
    assign_resend: float = 0.25  # AssignTask is re-sent this often until the worker confirms
    queue_limit: int = 256  # per (model, kind)
    max_attempts: int = 3  # placements per task before it fails
    # A dead node stays visible (exoctl shows it "dead") this long, then it is forgotten: workers
    # that restart under a new node id must not pile up as dead rows forever.
    forget_dead_after: float = 300.0

    @property
    def node_timeout(self) -> float:
        return self.heartbeat_interval * self.heartbeat_liveness


@dataclass(slots=True)
class CoreStats:
    placements: int = 0
    replacements: int = 0
    rejections: dict[str, int] = field(default_factory=dict)
    finals: dict[str, int] = field(default_factory=dict)
    orphan_cancels: int = 0
    chunk_gaps: int = 0
    late_events: int = 0


class MasterCore:
    def __init__(self, config: CoreConfig | None = None) -> None:
        self.config = config or CoreConfig()
        self.policy = make_policy(self.config.policy, self.config.seed)
        self.state = ClusterState()
        self.ledger = PendingLedger(self.config.ledger_ttl)
        self.queues = WaitQueues(self.config.queue_limit)
        self.stats = CoreStats()
        self._pools: dict[QueueKey, InstancePool] = {}
        self._subscribed: set[NodeId] = set()
        # PENDING tasks -> when their AssignTask is next re-sent; ordered by that time.
        self._resend: OrderedDict[TaskId, float] = OrderedDict()
        self._next_heartbeat = float("-inf")
        self._admitted = 0  # admission numbers order the wait queues by request age
        self._out: list[Effect] = []

    # ---- entry points ---------------------------------------------------------------------------

    def handle(self, event: CoreInput, now: float) -> list[Effect]:
        match event:
            case SubmitTask():
                self._submit(event, now)
            case CancelRequest():
                self._cancel(event, now)
            case NodeSubscribed():
                self._set_subscribed(event.node_id, True, now)
            case NodeUnsubscribed():
                self._set_subscribed(event.node_id, False, now)
            case WorkerHeartbeat():
                self._heartbeat(event, now)
            case TaskAccepted():
                self._accepted(event, now)
            case TaskChunk():
                self._chunk(event)
            case TaskFinished():
                self._worker_ended(event.task_id, event.instance_id, now, event.finish_reason, event.usage)
            case TaskFailed():
                self._worker_ended(event.task_id, event.instance_id, now, None, None, event.reason)
            case _:
                raise AssertionError(f"the core cannot handle {type(event).__name__}")
        return self._flush()

    def tick(self, now: float) -> list[Effect]:
        """Time-driven work: master heartbeat, node liveness, ledger TTL, assignment re-sends."""
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.config.heartbeat_interval
            self._out.append(
                MasterHeartbeat(session=self.config.session, interval=self.config.heartbeat_interval)
            )
        deadline = now - self.config.node_timeout
        forget_before = now - self.config.forget_dead_after
        for node in list(self.state.nodes.values()):
            if node.alive and node.last_seen < deadline:
                self._node_died(node, now)
            elif not node.alive and node.last_seen < forget_before:
                self._forget_node(node, now)
        for entry in self.ledger.expire(now):
            task = self.state.tasks[entry.task_id]
            assert task.status is TaskStatus.PENDING and task.instance_id == entry.instance_id
            self._unbind_pending(task, now, release=False)
            self._replace(task, now, exclude=frozenset({entry.instance_id}), why="not confirmed in time")
            # Cancel the old copy only if the task moved: a CancelTask followed by an AssignTask to
            # the same instance could cancel the new assignment (workers replay a recent final).
            if task.instance_id != entry.instance_id:
                self._emit_cancel(task.task_id, entry.instance_id)
        while self._resend:
            task_id, due = next(iter(self._resend.items()))
            if due > now:
                break
            del self._resend[task_id]
            task = self.state.tasks[task_id]
            assert task.status is TaskStatus.PENDING
            self._out.append(self._assign_message(task))
            self._resend[task_id] = now + self.config.assign_resend
        return self._flush()

    # ---- loads (LoadView for the policies) ------------------------------------------------------

    def load(self, inst: InstanceView) -> int:
        return len(inst.confirmed) + self.ledger.pending(inst.instance_id)

    def confirmed(self, inst: InstanceView) -> int:
        return len(inst.confirmed)

    # ---- client requests ------------------------------------------------------------------------

    def _submit(self, event: SubmitTask, now: float) -> None:
        task_id, params = event.task_id, event.params
        if self.state.task(task_id) is not None:
            self._reject(task_id, RejectReason.DUPLICATE_TASK, f"task id {task_id} is already in use")
            return
        instances = self.state.by_model.get(params.model)
        if not instances:
            self._reject(task_id, RejectReason.UNKNOWN_MODEL, f"model {params.model!r} is not served")
            return
        # A non-empty candidate pool proves the kind is served without scanning every instance.
        key = (params.model, params.KIND)
        if not self._pools.get(key) and not any(params.KIND in inst.kinds for inst in instances.values()):
            self._reject(
                task_id,
                RejectReason.UNSUPPORTED_KIND,
                f"model {params.model!r} does not serve {params.KIND} requests",
            )
            return
        self._admitted += 1
        task = TaskRecord(task_id=task_id, params=params, submitted_at=now, admission=self._admitted)
        self.state.tasks[task_id] = task
        # Requests already waiting go first: a newcomer may not overtake the queue.
        if self.queues.depth(key) == 0 and self._place(task, now):
            return
        if not self._has_live_candidate(key):
            del self.state.tasks[task_id]
            self._reject(
                task_id,
                RejectReason.NO_LIVE_INSTANCE,
                f"no live instance of model {params.model!r} can take {params.KIND} requests",
            )
            return
        position = self.queues.push(key, task_id, task.admission)
        if position is None:
            del self.state.tasks[task_id]
            self._reject(
                task_id,
                RejectReason.QUEUE_FULL,
                f"all instances of {params.model!r} are busy and {self.queues.limit} requests are "
                "already waiting; retry later",
            )
            return
        self._out.append(TaskQueued(task_id=task_id, position=position))

    def _cancel(self, event: CancelRequest, now: float) -> None:
        task = self.state.tasks.get(event.task_id)
        if task is None:
            return  # unknown or already over: cancelling is idempotent
        if task.instance_id is not None:
            self._emit_cancel(task.task_id, task.instance_id)
        self._end(task, TaskStatus.CANCELLED, now, error=event.reason)
        # Whoever still waits on the task (not a client that went away) learns why it ended.
        self._out.append(TaskErrored(task_id=task.task_id, message=event.reason, cancelled=True))

    # ---- worker events --------------------------------------------------------------------------

    def _accepted(self, msg: TaskAccepted, now: float) -> None:
        task = self.state.tasks.get(msg.task_id)
        if task is not None and task.instance_id == msg.instance_id:
            if task.status is TaskStatus.PENDING:
                self._confirm(task)
            return
        # Unknown, over, queued, or bound elsewhere since (re-placed): nobody wants this copy.
        self.stats.orphan_cancels += 1
        self._out.append(CancelTask(task_id=msg.task_id, node_id=msg.node_id, instance_id=msg.instance_id))

    def _chunk(self, msg: TaskChunk) -> None:
        task = self.state.tasks.get(msg.task_id)
        if task is None or task.instance_id != msg.instance_id:
            self.stats.late_events += 1
            return
        if task.status is TaskStatus.PENDING:
            self._confirm(task)  # the TaskAccepted was lost; output proves the worker has it
        if msg.index < task.next_chunk:
            return  # duplicate
        self.stats.chunk_gaps += msg.index - task.next_chunk
        task.next_chunk = msg.index + 1
        self._out.append(TaskOutput(task_id=task.task_id, index=msg.index, text=msg.text))

    def _worker_ended(
        self,
        task_id: TaskId,
        instance_id: InstanceId,
        now: float,
        finish_reason: FinishReason | None,
        usage: Usage | None,
        error: str | None = None,
    ) -> None:
        task = self.state.tasks.get(task_id)
        if task is None or task.instance_id != instance_id:
            self.stats.late_events += 1
            return
        if finish_reason is FinishReason.CANCELLED:
            # The master did not cancel this live task (it would be over or moved): the worker
            # gave it up (shutting down, or a stale cancel). That is a lost attempt, not a result.
            self._lose_attempt(task, now, f"instance {instance_id} gave the task up")
        elif finish_reason is not None:
            task.finish_reason = finish_reason
            task.usage = usage
            self._end(task, TaskStatus.FINISHED, now)
            self._out.append(
                TaskCompleted(task_id=task_id, finish_reason=finish_reason, usage=usage or Usage())
            )
        else:
            self._end(task, TaskStatus.FAILED, now, error=error)
            self._out.append(TaskErrored(task_id=task_id, message=error or "the worker failed the task"))

    def _heartbeat(self, msg: WorkerHeartbeat, now: float) -> None:
        node = self.state.nodes.get(msg.node_id)
        if node is None:
            node = NodeView(node_id=msg.node_id, last_seen=now, subscribed=msg.node_id in self._subscribed)
            self.state.nodes[msg.node_id] = node
        node.last_seen = now
        node.address = msg.address
        node.master_session = msg.master_session
        node.alive = True
        reported = {r.instance_id: r for r in msg.instances}
        # Reported instances first: an instance that replaces a gone one (same model, new id) must be
        # a candidate before the gone one's tasks and its model's queue look for a live instance.
        for report in msg.instances:
            self._apply_report(node, report, now)
        for gone in sorted(node.instances - reported.keys()):
            self._remove_instance(gone, now, why=f"instance {gone} is no longer reported by {node.node_id}")

    def _apply_report(self, node: NodeView, report: InstanceReport, now: float) -> None:
        inst = self.state.instances.get(report.instance_id)
        if inst is not None and (inst.node_id != node.node_id or inst.model != report.model):
            self._remove_instance(inst.instance_id, now, why=f"instance {inst.instance_id} changed")
            inst = None
        stranding = False
        if inst is None:
            inst = InstanceView(
                instance_id=report.instance_id,
                node_id=node.node_id,
                model=report.model,
                kinds=report.kinds,
                status=report.status,
                max_concurrency=report.max_concurrency,
                capacity=report.capacity,
                error=report.error,
            )
            self.state.add_instance(inst)
        else:
            dropped_kinds = set(inst.kinds) - set(report.kinds)
            for dropped_kind in dropped_kinds:
                self._pool((inst.model, dropped_kind)).update(inst, False, 0)
            # A failed instance, or one that stopped serving a kind, may have been the last candidate
            # for requests waiting in its model's queues.
            stranding = bool(dropped_kinds) or (
                report.status is InstanceStatus.FAILED and inst.status is not InstanceStatus.FAILED
            )
            was_ready = inst.status is InstanceStatus.READY
            inst.kinds = report.kinds
            inst.status = report.status
            inst.max_concurrency = report.max_concurrency
            inst.capacity = report.capacity
            inst.error = report.error
            if was_ready and inst.status is not InstanceStatus.READY:
                self._evacuate_pending(inst, now, why=f"instance {inst.instance_id} is {inst.status}")
        self._reconcile(node, inst, frozenset(report.active_tasks), now)
        self._slot_changed(inst, now)
        if stranding:
            self._fail_stranded_queues(inst.model, now)

    def _reconcile(self, node: NodeView, inst: InstanceView, active: frozenset[TaskId], now: float) -> None:
        """Heal the projection from the worker's snapshot (messages on PUB/SUB may have been lost)."""
        for task_id in active:
            task = self.state.tasks.get(task_id)
            if task is not None and task.instance_id == inst.instance_id:
                if task.status is TaskStatus.PENDING:
                    self._confirm(task)
                continue
            self.stats.orphan_cancels += 1
            self._out.append(CancelTask(task_id=task_id, node_id=node.node_id, instance_id=inst.instance_id))
        # A worker sends TaskFinished before its next snapshot, so a confirmed task missing from the
        # snapshot was lost by the worker (restart, or the finish message was dropped).
        for task_id in sorted(inst.confirmed - active):
            task = self.state.tasks[task_id]
            self._lose_running(task, now, why=f"{node.node_id} no longer runs the task")

    def _set_subscribed(self, node_id: NodeId, subscribed: bool, now: float) -> None:
        if subscribed:
            self._subscribed.add(node_id)
        else:
            self._subscribed.discard(node_id)
        node = self.state.nodes.get(node_id)
        if node is None:
            return
        node.subscribed = subscribed
        for iid in sorted(node.instances):
            self._slot_changed(self.state.instances[iid], now)

    # ---- liveness and loss ----------------------------------------------------------------------

    def _node_died(self, node: NodeView, now: float) -> None:
        node.alive = False
        why = f"node {node.node_id} stopped responding (no heartbeat for {now - node.last_seen:.1f} s)"
        affected = set()
        for iid in sorted(node.instances):
            inst = self.state.instances[iid]
            self._slot_changed(inst, now)  # now ineligible
            self._evacuate(inst, now, why)
            affected.add(inst.model)
        for model in sorted(affected):
            self._fail_stranded_queues(model, now)

    def _forget_node(self, node: NodeView, now: float) -> None:
        for iid in sorted(node.instances):
            self._remove_instance(iid, now, why=f"node {node.node_id} has been dead too long")
        del self.state.nodes[node.node_id]

    def _remove_instance(self, instance_id: InstanceId, now: float, why: str) -> None:
        inst = self.state.instances[instance_id]
        inst.retired = True
        self._slot_changed(inst, now)
        self._evacuate(inst, now, why)
        self.state.remove_instance(instance_id)
        self._fail_stranded_queues(inst.model, now)

    def _evacuate(self, inst: InstanceView, now: float, why: str) -> None:
        """The instance is gone: re-place what it had not started, fail what it was running."""
        self._evacuate_pending(inst, now, why)
        for task_id in sorted(inst.confirmed):
            self._lose_running(self.state.tasks[task_id], now, why)

    def _evacuate_pending(self, inst: InstanceView, now: float, why: str) -> None:
        exclude = frozenset({inst.instance_id})
        for entry in self.ledger.drop_instance(inst.instance_id):
            task = self.state.tasks[entry.task_id]
            self._unbind_pending(task, now, release=False)
            self._emit_cancel(task.task_id, inst.instance_id)
            self._replace(task, now, exclude, why)

    def _lose_attempt(self, task: TaskRecord, now: float, why: str) -> None:
        assert task.instance_id is not None
        if task.status is TaskStatus.PENDING:
            lost_on = frozenset({task.instance_id})
            self._unbind_pending(task, now)
            self._replace(task, now, lost_on, why)
        else:
            self._lose_running(task, now, why)

    def _lose_running(self, task: TaskRecord, now: float, why: str) -> None:
        assert task.status is TaskStatus.RUNNING and task.instance_id is not None
        inst = self.state.instances[task.instance_id]
        if task.next_chunk == 0:
            # No output reached the client yet, so running it elsewhere is invisible to them.
            inst.confirmed.discard(task.task_id)
            self._clear_binding(task)
            self._replace(task, now, frozenset({inst.instance_id}), why)
            self._slot_changed(inst, now)
            return
        self._end(task, TaskStatus.FAILED, now, error=why)
        self._out.append(TaskErrored(task_id=task.task_id, message=why, unavailable=True))

    def _fail_stranded_queues(self, model: str, now: float) -> None:
        for key in self.queues.queue_keys():
            if key[0] != model or self._has_live_candidate(key):
                continue
            for task_id in self.queues.tasks(key):
                task = self.state.tasks[task_id]
                message = f"no live instance of model {model!r} is left"
                self._end(task, TaskStatus.FAILED, now, error=message)
                self._out.append(TaskErrored(task_id=task_id, message=message, unavailable=True))

    # ---- placement ------------------------------------------------------------------------------

    def _place(self, task: TaskRecord, now: float, exclude: frozenset[InstanceId] = frozenset()) -> bool:
        pool = self._pools.get((task.model, task.kind))
        if pool is None or not pool.members:
            return False
        inst = self.policy.choose(pool, self, exclude)
        if inst is None and exclude:
            inst = self.policy.choose(pool, self, frozenset())  # better the same instance than none
        if inst is None:
            return False
        load_before = self.load(inst)
        self.ledger.reserve(task.task_id, inst.instance_id, now)
        task.status = TaskStatus.PENDING
        task.instance_id = inst.instance_id
        task.node_id = inst.node_id
        task.assigned_at = now
        task.attempts += 1
        task.next_chunk = 0
        self._slot_changed(inst, now, drain=False)
        self.stats.placements += 1
        self._resend[task.task_id] = now + self.config.assign_resend
        self._out.append(
            TaskPlaced(
                task_id=task.task_id,
                instance_id=inst.instance_id,
                node_id=inst.node_id,
                policy=self.policy.name,
                attempt=task.attempts,
                load_before=load_before,
                waited=now - task.submitted_at,
            )
        )
        self._out.append(self._assign_message(task))
        return True

    def _replace(self, task: TaskRecord, now: float, exclude: frozenset[InstanceId], why: str) -> None:
        """Place an unbound task again (its instance was lost or never confirmed)."""
        assert task.status is TaskStatus.QUEUED and task.instance_id is None
        self.stats.replacements += 1
        if task.attempts >= self.config.max_attempts:
            message = f"task not accepted after {task.attempts} attempts (last: {why})"
            self._end(task, TaskStatus.FAILED, now, error=message)
            self._out.append(TaskErrored(task_id=task.task_id, message=message, unavailable=True))
            return
        key = (task.model, task.kind)
        if self._place(task, now, exclude):
            return
        if self._has_live_candidate(key):
            self.queues.requeue(key, task.task_id, task.admission)
            return
        message = f"{why}; no live instance of model {task.model!r} is left"
        self._end(task, TaskStatus.FAILED, now, error=message)
        self._out.append(TaskErrored(task_id=task.task_id, message=message, unavailable=True))

    def _drain(self, key: QueueKey, now: float) -> None:
        while (head := self.queues.peek(key)) is not None:
            task = self.state.tasks[head[0]]
            if not self._place(task, now):
                return
            self.queues.remove(task.task_id)

    def _slot_changed(self, inst: InstanceView, now: float, drain: bool = True) -> None:
        """An instance's load or eligibility changed: re-index it, and let waiting requests in."""
        node = self.state.nodes.get(inst.node_id)
        eligible = (
            node is not None
            and node.alive
            and node.subscribed
            and inst.status is InstanceStatus.READY
            and not inst.retired
        )
        load = self.load(inst)
        keys = [(inst.model, kind) for kind in inst.kinds]
        # Re-index under every kind before draining any queue: a drain places tasks, which changes
        # the load this loop would otherwise write into the remaining kinds' pools.
        for key in keys:
            self._pool(key).update(inst, eligible, load)
        if drain and eligible and load < inst.max_concurrency:
            for key in keys:
                self._drain(key, now)

    def _has_live_candidate(self, key: QueueKey) -> bool:
        """Is there an instance that will take this key's requests, now or once loaded?"""
        model, kind = key
        for inst in self.state.by_model.get(model, {}).values():
            node = self.state.nodes[inst.node_id]
            if (
                node.alive
                and kind in inst.kinds
                and inst.status is not InstanceStatus.FAILED
                and not inst.retired
            ):
                return True
        return False

    def _pool(self, key: QueueKey) -> InstancePool:
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = InstancePool()
        return pool

    # ---- task bookkeeping -----------------------------------------------------------------------

    def _confirm(self, task: TaskRecord) -> None:
        assert task.status is TaskStatus.PENDING and task.instance_id is not None
        entry = self.ledger.confirm(task.task_id)
        assert entry is not None, f"pending task {task.task_id} has no ledger entry"
        self._resend.pop(task.task_id, None)
        task.status = TaskStatus.RUNNING
        self.state.instances[task.instance_id].confirmed.add(task.task_id)
        # Load is unchanged (pending -1, confirmed +1): nothing to re-index.

    def _unbind_pending(self, task: TaskRecord, now: float, release: bool = True) -> None:
        assert task.status is TaskStatus.PENDING and task.instance_id is not None
        if release:
            self.ledger.release(task.task_id)
        self._resend.pop(task.task_id, None)
        inst = self.state.instances.get(task.instance_id)
        self._clear_binding(task)
        if inst is not None:
            self._slot_changed(inst, now)

    def _clear_binding(self, task: TaskRecord) -> None:
        task.status = TaskStatus.QUEUED
        task.instance_id = None
        task.node_id = None

    def _end(self, task: TaskRecord, status: TaskStatus, now: float, error: str | None = None) -> None:
        """Every way a task can end goes through here, so no count is ever left behind."""
        assert status.is_final
        inst = self.state.instances.get(task.instance_id) if task.instance_id else None
        if task.status is TaskStatus.PENDING:
            self.ledger.release(task.task_id)
            self._resend.pop(task.task_id, None)
        elif task.status is TaskStatus.RUNNING:
            assert inst is not None
            inst.confirmed.discard(task.task_id)
        elif task.status is TaskStatus.QUEUED:
            self.queues.remove(task.task_id)
        task.status = status
        task.error = error
        task.ended_at = now
        self.state.finalize(task)
        self.stats.finals[status] = self.stats.finals.get(status, 0) + 1
        if inst is not None:
            if status is TaskStatus.FINISHED:
                inst.completed += 1
            elif status is TaskStatus.FAILED:
                inst.failed += 1
            self._slot_changed(inst, now)

    def _reject(self, task_id: TaskId, reason: RejectReason, message: str) -> None:
        self.stats.rejections[reason] = self.stats.rejections.get(reason, 0) + 1
        self._out.append(TaskRejected(task_id=task_id, reason=reason, message=message))

    def _emit_cancel(self, task_id: TaskId, instance_id: InstanceId) -> None:
        inst = self.state.instances.get(instance_id)
        if inst is not None:
            self._out.append(CancelTask(task_id=task_id, node_id=inst.node_id, instance_id=instance_id))

    def _assign_message(self, task: TaskRecord) -> AssignTask:
        assert task.instance_id is not None and task.node_id is not None
        return AssignTask(
            task_id=task.task_id, node_id=task.node_id, instance_id=task.instance_id, params=task.params
        )

    def _flush(self) -> list[Effect]:
        out, self._out = self._out, []
        return out

    # ---- views and checks -----------------------------------------------------------------------

    def view(
        self,
        now: float,
        task_limit: int = 500,
        gaps: dict[str, int] | None = None,
        status: TaskStatus | None = None,
    ) -> ClusterView:
        gaps = gaps or {}
        nodes = [
            NodeRow(
                node_id=n.node_id,
                address=n.address,
                alive=n.alive,
                subscribed=n.subscribed,
                last_heartbeat_age=max(0.0, now - n.last_seen),
                instances=sorted(n.instances),
                sequence_gaps=gaps.get(n.node_id, 0),
            )
            for n in sorted(self.state.nodes.values(), key=lambda n: n.node_id)
        ]
        instances = []
        for inst in sorted(self.state.instances.values(), key=lambda i: i.instance_id):
            alive = self.state.nodes[inst.node_id].alive
            instances.append(
                InstanceRow(
                    instance_id=inst.instance_id,
                    node_id=inst.node_id,
                    model=inst.model,
                    kinds=[str(k) for k in inst.kinds],
                    status=str(inst.status) if alive else "dead",
                    in_flight=len(inst.confirmed),
                    pending=self.ledger.pending(inst.instance_id),
                    queued=self.queues.depth_for_model(inst.model),
                    capacity=inst.capacity,
                    max_concurrency=inst.max_concurrency,
                    completed=inst.completed,
                    failed=inst.failed,
                    error=inst.error,
                )
            )
        models = [
            ModelRow(
                model=model,
                instances=len(members),
                ready=sum(
                    1
                    for i in members.values()
                    if i.status is InstanceStatus.READY and self.state.nodes[i.node_id].alive
                ),
                queued=self.queues.depth_for_model(model),
            )
            for model, members in sorted(self.state.by_model.items())
        ]
        # Live tasks first, then the recently ended ones, newest first; only `task_limit` rows built.
        candidates: Iterator[TaskRecord] = chain(
            self.state.tasks.values(), reversed(self.state.recent.values())
        )
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
                age=max(0.0, (t.ended_at if t.ended_at is not None else now) - t.submitted_at),
                attempts=t.attempts,
                error=t.error,
            )
            for t in islice(candidates, max(0, task_limit))
        ]
        return ClusterView(
            policy=self.policy.name,
            session=self.config.session,
            nodes=nodes,
            instances=instances,
            models=models,
            tasks=tasks,
        )

    def check_invariants(self) -> None:
        """Recount everything from scratch and compare with the incremental counters."""
        running: dict[InstanceId, set[TaskId]] = {}
        pending: dict[InstanceId, set[TaskId]] = {}
        queued: set[TaskId] = set()
        for task in self.state.tasks.values():
            assert not task.status.is_final, f"final task {task.task_id} is still live"
            if task.status is TaskStatus.RUNNING:
                assert task.instance_id is not None
                running.setdefault(task.instance_id, set()).add(task.task_id)
            elif task.status is TaskStatus.PENDING:
                assert task.instance_id is not None
                pending.setdefault(task.instance_id, set()).add(task.task_id)
                assert task.task_id in self._resend
            else:
                assert task.instance_id is None
                queued.add(task.task_id)
        assert queued == {t for k in self.queues.queue_keys() for t in self.queues.tasks(k)}, "queue drift"
        for key in self.queues.queue_keys():
            ages = [self.state.tasks[t].admission for t in self.queues.tasks(key)]
            assert ages == sorted(ages), f"queue {key} is out of age order"
        assert len(self.ledger) == sum(len(s) for s in pending.values()), "ledger drift"
        assert set(self._resend) == {t for s in pending.values() for t in s}, "resend drift"
        for iid, inst in self.state.instances.items():
            assert inst.confirmed == running.get(iid, set()), f"confirmed drift on {iid}"
            assert self.ledger.pending(iid) == len(pending.get(iid, ())), f"pending drift on {iid}"
            assert set(self.ledger.tasks_on(iid)) == pending.get(iid, set())
        unknown = (set(running) | set(pending)) - set(self.state.instances)
        assert not unknown, f"tasks bound to unknown instances {unknown}"
        for task_id in self.state.recent:
            assert task_id not in self.state.tasks
