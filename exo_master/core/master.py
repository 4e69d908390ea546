"""MasterCore: the deterministic scheduling core. No sockets, no clock reads, no randomness.

Shells feed it events with the current time (`handle(event, now)`, `tick(now)`) and send what it
returns; they read it only through its public queries (`view`, `counters`, `loads_of`, `is_live`).
Each event is applied in two phases: the event's own changes first (which may make instances
ineligible and displace tasks), then one `Scheduler.settle` that re-places and drains by age.

    lifecycle   the task statuses and the one transition table
    tasks       TaskBook: every count that depends on a task's status, changed in one place
    scheduling  eligibility, candidate pools, placement, settling (re-place, drain, strand)
    reconcile   heartbeats: the worker's snapshot made true in the projection
    liveness    silent nodes, instances that go away, unconfirmed assignments
    view        the read-only rows served on /v1/cluster/state
"""

from __future__ import annotations

from dataclasses import asdict
from itertools import islice

from exo_master.core.config import CoreConfig, CoreStats
from exo_master.core.events import (
    CancelRequest,
    CoreInput,
    Effect,
    NodeSubscribed,
    NodeUnsubscribed,
    RejectReason,
    SubmitTask,
    TaskQueued,
    TaskRejected,
)
from exo_master.core.invariants import check_invariants
from exo_master.core.lifecycle import TaskRecord, TaskStatus
from exo_master.core.liveness import Liveness
from exo_master.core.output import OutputRelay
from exo_master.core.placement import make_policy
from exo_master.core.pool import InstancePool
from exo_master.core.queue import QueueKey
from exo_master.core.reconcile import Reconciler
from exo_master.core.records import ClusterState, InstanceRecord
from exo_master.core.scheduling import Scheduler, assign_message
from exo_master.core.tasks import TaskBook
from exo_master.core.view import CoreCounters, build_view
from protocol.cluster_view import ClusterView
from protocol.ids import InstanceId, ModelId, TaskId
from protocol.messages import (
    CancelTask,
    FinishReason,
    MasterHeartbeat,
    TaskAccepted,
    TaskChunk,
    TaskFailed,
    TaskFinished,
    WorkerHeartbeat,
)


class MasterCore:
    def __init__(self, config: CoreConfig | None = None) -> None:
        self.config = config or CoreConfig()
        self.stats = CoreStats()
        self.state = ClusterState()
        self._out: list[Effect] = []
        self.book = TaskBook(self.config, self.state, self.stats, self._out)
        self.policy = make_policy(self.config.policy, self.config.seed)
        self.scheduler = Scheduler(self.config, self.state, self.book, self.policy, self.stats, self._out)
        self.liveness = Liveness(self.config, self.state, self.book, self.scheduler, self._out)
        self.output = OutputRelay(self.config, self.book, self.stats, self._out, self.scheduler.affinity)
        self.book.on_bind = self.output.reset
        self.reconciler = Reconciler(
            self.config, self.state, self.book, self.scheduler, self.liveness, self.output, self._out
        )
        self._next_heartbeat = float("-inf")

    # ---- entry points ---------------------------------------------------------------------------

    def handle(self, event: CoreInput, now: float) -> list[Effect]:
        match event:
            case SubmitTask():
                self._submit(event, now)
            case CancelRequest():
                self._cancel(event, now)
            case NodeSubscribed():
                self.liveness.set_subscribed(event.node_id, True)
            case NodeUnsubscribed():
                self.liveness.set_subscribed(event.node_id, False)
            case WorkerHeartbeat():
                self.reconciler.heartbeat(event, now)
            case TaskAccepted():
                self.liveness.seen(event.node_id, now)
                self._accepted(event)
            case TaskChunk():
                self.liveness.seen(event.node_id, now)
                self._chunk(event, now)
            case TaskFinished() | TaskFailed():
                self.liveness.seen(event.node_id, now)
                self._worker_ended(event, now)
            case _:
                raise AssertionError(f"the core cannot handle {type(event).__name__}")
        self.scheduler.settle(now)
        return self._flush()

    def tick(self, now: float) -> list[Effect]:
        """Time-driven work: master heartbeat, node liveness, ledger TTL, assignment re-sends."""
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.config.heartbeat_interval
            self._out.append(
                MasterHeartbeat(session=self.config.session, interval=self.config.heartbeat_interval)
            )
        self.liveness.check_nodes(now)
        expired = self.liveness.expire_unconfirmed(now)
        self.output.tick(now)
        self.scheduler.expire_waiting(now)
        self.scheduler.settle(now)
        for task_id, old in expired:
            # Cancel the old copy only if the task moved: a CancelTask followed by an AssignTask to
            # the same instance could cancel the new assignment (workers replay a recent final).
            task = self.book.get(task_id)
            if task is None or task.status is TaskStatus.QUEUED or task.instance_id != old:
                self.liveness.cancel_copy(task_id, old)
        resend = self.book.resend
        while resend:
            task_id, due = next(iter(resend.items()))
            if due > now:
                break
            del resend[task_id]
            task = self.book.live[task_id]
            assert task.status is TaskStatus.PENDING
            self._out.append(assign_message(task))
            resend[task_id] = now + self.config.assign_resend
        return self._flush()

    # ---- public queries (what the shells and tests may read) ------------------------------------

    def load(self, inst: InstanceRecord) -> int:
        return self.scheduler.load(inst)

    def task(self, task_id: TaskId) -> TaskRecord | None:
        return self.book.get(task_id)

    def is_live(self, task_id: TaskId) -> bool:
        return task_id in self.book.live

    def loads_of(self, model: ModelId, limit: int = 16) -> dict[InstanceId, int]:
        """The first `limit` instances of a model and their loads (for the placement log line)."""
        members = self.state.by_model.get(model, {})
        return {iid: self.scheduler.load(inst) for iid, inst in islice(members.items(), limit)}

    def pool(self, model: ModelId, kind: object) -> InstancePool | None:
        return self.scheduler.pools.get((model, kind))  # type: ignore[arg-type]

    def has_live_candidate(self, key: QueueKey) -> bool:
        return self.scheduler.has_live_candidate(key)

    def eligible(self, inst: InstanceRecord) -> bool:
        return self.scheduler.eligible(inst)

    def counters(self) -> CoreCounters:
        book = self.book
        return CoreCounters(
            **asdict(self.stats),
            ledger=asdict(book.ledger.stats),
            queued=len(book.queues),
            pending=len(book.ledger),
            running=sum(len(inst.confirmed) for inst in self.state.instances.values()),
        )

    def view(
        self,
        now: float,
        task_limit: int = 500,
        gaps: dict[str, int] | None = None,
        status: TaskStatus | None = None,
    ) -> ClusterView:
        return build_view(self, now, task_limit, gaps or {}, status)

    def check_invariants(self) -> None:
        """Recount everything from scratch and compare with the incremental counters."""
        check_invariants(self)

    # ---- client requests ------------------------------------------------------------------------

    def _submit(self, event: SubmitTask, now: float) -> None:
        task_id, params = event.task_id, event.params
        if self.book.get(task_id) is not None:
            self._reject(task_id, RejectReason.DUPLICATE_TASK, f"task id {task_id} is already in use")
            return
        instances = self.state.by_model.get(params.model)
        if not instances:
            self._reject(task_id, RejectReason.UNKNOWN_MODEL, f"model {params.model!r} is not served")
            return
        key = (params.model, params.KIND)
        # A non-empty candidate pool proves the kind is served without scanning every instance.
        if not self.scheduler.pools.get(key) and not any(params.KIND in i.kinds for i in instances.values()):
            message = f"model {params.model!r} does not serve {params.KIND} requests"
            self._reject(task_id, RejectReason.UNSUPPORTED_KIND, message)
            return
        task = self.book.admit(task_id, params, now)
        # Requests already waiting go first: a newcomer may not overtake the queue.
        if self.book.queues.depth(key) == 0 and self.scheduler.place(task, now):
            return
        if not self.scheduler.has_live_candidate(key):
            self.book.withdraw(task)
            message = f"no live instance of model {params.model!r} can take {params.KIND} requests"
            self._reject(task_id, RejectReason.NO_LIVE_INSTANCE, message)
            return
        position = self.book.enqueue(task, now)
        if position is None:
            self.book.withdraw(task)
            message = (
                f"all instances of {params.model!r} are busy and {self.book.queues.limit} requests are "
                "already waiting; retry later"
            )
            self._reject(task_id, RejectReason.QUEUE_FULL, message)
            return
        self._out.append(TaskQueued(task_id=task_id, position=position))

    def _cancel(self, event: CancelRequest, now: float) -> None:
        task = self.book.live.get(event.task_id)
        if task is None:
            return  # unknown or already over: cancelling is idempotent
        if task.instance_id is not None:
            self.liveness.cancel_copy(task.task_id, task.instance_id)
            if task.status is TaskStatus.RUNNING:  # the engine has it: its slot is not free yet
                self.scheduler.hold(self.state.instances[task.instance_id], task.task_id)
        self.book.cancel(task, now, event.reason)

    def _reject(self, task_id: TaskId, reason: RejectReason, message: str) -> None:
        self.stats.rejections[reason] = self.stats.rejections.get(reason, 0) + 1
        self._out.append(TaskRejected(task_id=task_id, reason=reason, message=message))

    # ---- worker results -------------------------------------------------------------------------

    def _bound(
        self, task_id: TaskId, msg: TaskAccepted | TaskChunk | TaskFinished | TaskFailed
    ) -> TaskRecord | None:
        """The live task this message speaks for: bound to the instance and node that sent it."""
        task = self.book.live.get(task_id)
        if task is None or task.instance_id != msg.instance_id or task.node_id != msg.node_id:
            return None
        return task

    def _accepted(self, msg: TaskAccepted) -> None:
        task = self._bound(msg.task_id, msg)
        if task is not None:
            if task.status is TaskStatus.PENDING:
                self.book.confirm(task)
            return
        # Unknown, over, queued, or bound elsewhere since (re-placed): nobody wants this copy.
        self.stats.orphan_cancels += 1
        self._out.append(CancelTask(task_id=msg.task_id, node_id=msg.node_id, instance_id=msg.instance_id))

    def _chunk(self, msg: TaskChunk, now: float) -> None:
        task = self._bound(msg.task_id, msg)
        if task is None:
            self.stats.late_events += 1
            return
        if task.status is TaskStatus.PENDING:
            self.book.confirm(task)  # the TaskAccepted was lost; output proves the worker has it
        self.output.chunk(task, msg.index, msg.text, now)

    def _worker_ended(self, msg: TaskFinished | TaskFailed, now: float) -> None:
        task = self._bound(msg.task_id, msg)
        if task is None:
            self.stats.late_events += 1
            return
        if isinstance(msg, TaskFailed):
            if msg.refused:
                # Refused before it started ("shutting down", "not ready", unknown instance): the
                # attempt is lost, the request is not; it goes to another instance.
                self.liveness.lose_attempt(task, f"{msg.instance_id} refused the task: {msg.reason}", now)
            else:
                self.book.fail(task, now, msg.reason or "the worker failed the task", code=msg.code)
        elif msg.finish_reason is FinishReason.CANCELLED:
            # The master did not cancel this live task (it would be over or moved): the worker
            # gave it up (shutting down, or a stale cancel). That is a lost attempt, not a result.
            self.liveness.lose_attempt(task, f"instance {msg.instance_id} gave the task up", now)
        else:
            if task.status is TaskStatus.PENDING:
                self.book.confirm(task)
            self.output.finished(task, msg, now)

    def _flush(self) -> list[Effect]:
        out = self._out[:]
        self._out.clear()  # the parts share this list: it must stay the same object
        return out
