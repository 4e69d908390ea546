"""MasterCore: the deterministic scheduling core. No sockets, no clock reads, no randomness.

Shells feed it events with the current time (`handle(event, now)`, `tick(now)`) and send what it
returns; they read it only through its public queries (`view`, `counters`, `loads_of`, `is_live`).
Each event is applied in two phases: the event's own changes first (which may make instances
ineligible and displace tasks), then one `Scheduler.settle` that re-places and drains by age.

    lifecycle       the task statuses and the one transition table, with each move's guard and effects
    tasks           TaskBook: the live tasks and every count that depends on their status
    instance_state  instance phases, node links, and what they make an instance eligible for
    candidates      the candidate pools: eligible instances of each (model, kind) and their loads
    scheduling      placement and settling (re-place, drain, fail what is stranded)
    output          a task's text to its client whole and in order (reorder, fetch again)
    reconcile       heartbeats: the worker's snapshot made true in the projection
    instances/      where models live: desired placements, LoadInstance / UnloadInstance, healing
    liveness        silent nodes, instances that go away, unconfirmed assignments
    view            the read-only rows served on /v1/cluster/state

The parts are built in dependency order, each given what it uses, nothing patched in afterwards.
Every call makes one `Step` (the time and the effects emitted so far); the parts that may emit take
it as an argument, and the call returns its effects.
"""

from __future__ import annotations

from dataclasses import asdict
from itertools import islice

from exo_master.core.candidates import Candidates
from exo_master.core.config import CoreConfig, CoreStats
from exo_master.core.events import (
    CancelRequest,
    CoreInput,
    Effect,
    NodeSubscribed,
    NodeUnsubscribed,
    RejectReason,
    Step,
    SubmitTask,
    TaskQueued,
    TaskRejected,
)
from exo_master.core.instances.controller import InstanceController
from exo_master.core.instances.core_side import SchedulerSide
from exo_master.core.instances.desired import PlacementSpec
from exo_master.core.instances.records import ControllerConfig
from exo_master.core.instances.rule import Plan
from exo_master.core.invariants import check_invariants
from exo_master.core.ledger import PendingLedger
from exo_master.core.lifecycle import CONFIRM, Cancel, Fail, TaskRecord, TaskStatus
from exo_master.core.liveness import Liveness
from exo_master.core.output import OutputRelay
from exo_master.core.placement import make_policy
from exo_master.core.pool import InstancePool
from exo_master.core.queue import QueueKey
from exo_master.core.reconcile import Reconciler
from exo_master.core.records import ClusterState, InstanceRecord
from exo_master.core.scheduling import Scheduler, assign_message, make_affinity
from exo_master.core.tasks import TaskBook
from exo_master.core.view import CoreCounters, build_view
from protocol.cluster_view import ClusterView
from protocol.ids import InstanceId, ModelId, TaskId
from protocol.messages import (
    INSTANCE_LOST,
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
    def __init__(self, config: CoreConfig | None = None, instances: ControllerConfig | None = None) -> None:
        self.config = config or CoreConfig()
        self.stats = CoreStats()
        self.state = ClusterState()
        self.policy = make_policy(self.config.policy, self.config.seed)
        affinity = make_affinity(self.config)
        ledger = PendingLedger(self.config.ledger_ttl)  # read by the pools (load), written by moves
        self.candidates = Candidates(self.state, ledger)
        self.book = TaskBook(self.config, self.state, self.stats, self.candidates, affinity)
        self.scheduler = Scheduler(self.config, self.book, self.candidates, self.policy, affinity)
        self.liveness = Liveness(self.config, self.book, self.candidates)
        self.output = OutputRelay(self.config, self.book, affinity)
        self.reconciler = Reconciler(self.config, self.book, self.candidates, self.liveness, self.output)
        # Where models live (exo_master.core.instances): fed heartbeats and ticks, below.
        self._scheduler_side = SchedulerSide(self.state, self.candidates)
        self.instances = InstanceController(self._scheduler_side, instances)
        self._next_heartbeat = float("-inf")

    # ---- entry points ---------------------------------------------------------------------------

    def handle(self, event: CoreInput, now: float) -> list[Effect]:
        step = Step(now)
        match event:
            case SubmitTask():
                self._submit(event, step)
            case CancelRequest():
                self._cancel(event, step)
            case NodeSubscribed():
                self.liveness.set_subscribed(event.node_id, True)
            case NodeUnsubscribed():
                self.liveness.set_subscribed(event.node_id, False)
            case WorkerHeartbeat():
                self.reconciler.heartbeat(event, step)
                self.instances.heartbeat(event, now)  # observed now; acted on at the next tick
                self._lose_broken(step)
            case TaskAccepted():
                self.liveness.seen(event.node_id, now)
                self._accepted(event, step)
            case TaskChunk():
                self.liveness.seen(event.node_id, now)
                self._chunk(event, step)
            case TaskFinished() | TaskFailed():
                self.liveness.seen(event.node_id, now)
                self._worker_ended(event, step)
            case _:
                raise AssertionError(f"the core cannot handle {type(event).__name__}")
        self.scheduler.settle(step)
        return step.effects

    def tick(self, now: float) -> list[Effect]:
        """Time-driven work: master heartbeat, node liveness, ledger TTL, assignment re-sends."""
        step = Step(now)
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.config.heartbeat_interval
            step.emit(MasterHeartbeat(session=self.config.session, interval=self.config.heartbeat_interval))
        self.liveness.check_nodes(step)
        self._instance_commands(step)
        expired = self.liveness.expire_unconfirmed(step)
        self.output.tick(step)
        self.scheduler.expire_waiting(step)
        self.scheduler.settle(step)
        for task_id, old in expired:
            # Cancel the old copy only if the task moved: a CancelTask followed by an AssignTask to
            # the same instance could cancel the new assignment (workers replay a recent final).
            task = self.book.get(task_id)
            if task is None or task.status is TaskStatus.QUEUED or task.instance_id != old:
                self.liveness.cancel_copy(task_id, old, step)
        resend = self.book.resend
        while resend:
            task_id, due = next(iter(resend.items()))
            if due > now:
                break
            del resend[task_id]
            task = self.book.live[task_id]
            assert task.status is TaskStatus.PENDING
            step.emit(assign_message(task))
            resend[task_id] = now + self.config.assign_resend
        return step.effects

    # ---- instance placement (the controller's commands, with their effects) ---------------------

    def place_instances(self, spec: PlacementSpec, now: float) -> tuple[Plan, list[Effect]]:
        """Place a model's replicas if they all fit (else the plan says why, per node)."""
        step = Step(now)
        result = self.instances.place(spec, now)
        self._instance_commands(step)
        return result, step.effects

    def delete_instances(self, placement_id: str, now: float) -> tuple[bool, list[Effect]]:
        """Drain and unload a placement's replicas; False when no such placement exists."""
        step = Step(now)
        found = self.instances.delete(placement_id, now)
        self._instance_commands(step)
        self.scheduler.settle(step)
        return found, step.effects

    def _instance_commands(self, step: Step) -> None:
        """The controller's reconciling pass: its LoadInstance / UnloadInstance and logged steps."""
        for effect in self.instances.reconcile(step.now):
            step.emit(effect)
        self._lose_broken(step)

    def _lose_broken(self, step: Step) -> None:
        """Tasks of instances the controller found broken (a sharded one lost a rank) are lost now,
        with the cause: re-placed if no output reached the client, else failed (503)."""
        broken = self._scheduler_side.broken_instances
        while broken:
            instance_id, why = broken.popitem()
            inst = self.state.instances.get(instance_id)
            if inst is not None:
                self.liveness.evacuate(inst, why, step)

    # ---- public queries (what the shells and tests may read) ------------------------------------

    def load(self, inst: InstanceRecord) -> int:
        return self.candidates.load(inst)

    def task(self, task_id: TaskId) -> TaskRecord | None:
        return self.book.get(task_id)

    def is_live(self, task_id: TaskId) -> bool:
        return task_id in self.book.live

    def loads_of(self, model: ModelId, limit: int = 16) -> dict[InstanceId, int]:
        """The first `limit` instances of a model and their loads (for the placement log line)."""
        members = self.state.by_model.get(model, {})
        return {iid: self.candidates.load(inst) for iid, inst in islice(members.items(), limit)}

    def pool(self, model: ModelId, kind: object) -> InstancePool | None:
        return self.candidates.pools.get((model, kind))  # type: ignore[arg-type]

    def has_live_candidate(self, key: QueueKey) -> bool:
        return self.candidates.has_live_candidate(key)

    def eligible(self, inst: InstanceRecord) -> bool:
        return self.candidates.eligible(inst)

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

    def _submit(self, event: SubmitTask, step: Step) -> None:
        task_id, params = event.task_id, event.params
        if self.book.get(task_id) is not None:
            self._reject(task_id, RejectReason.DUPLICATE_TASK, f"task id {task_id} is already in use", step)
            return
        instances = self.state.by_model.get(params.model)
        if not instances and params.model not in self.state.coming_models:
            self._reject(task_id, RejectReason.UNKNOWN_MODEL, f"model {params.model!r} is not served", step)
            return
        key = (params.model, params.KIND)
        # A non-empty candidate pool proves the kind is served without scanning every instance.
        if (
            instances
            and not self.candidates.pools.get(key)
            and not any(params.KIND in i.kinds for i in instances.values())
        ):
            message = f"model {params.model!r} does not serve {params.KIND} requests"
            self._reject(task_id, RejectReason.UNSUPPORTED_KIND, message, step)
            return
        task = self.book.admit(task_id, params, step.now)
        # Requests already waiting go first: a newcomer may not overtake the queue.
        if self.book.queues.depth(key) == 0 and self.scheduler.place(task, step):
            return
        if not self.candidates.has_live_candidate(key):
            self.book.withdraw(task)
            message = f"no live instance of model {params.model!r} can take {params.KIND} requests"
            self._reject(task_id, RejectReason.NO_LIVE_INSTANCE, message, step)
            return
        position = self.book.enqueue(task, step.now)
        if position is None:
            self.book.withdraw(task)
            message = (
                f"all instances of {params.model!r} are busy and {self.book.queues.limit} requests are "
                "already waiting; retry later"
            )
            self._reject(task_id, RejectReason.QUEUE_FULL, message, step)
            return
        step.emit(TaskQueued(task_id=task_id, position=position))

    def _cancel(self, event: CancelRequest, step: Step) -> None:
        task = self.book.live.get(event.task_id)
        if task is None:
            return  # unknown or already over: cancelling is idempotent
        if task.instance_id is not None:
            self.liveness.cancel_copy(task.task_id, task.instance_id, step)
            if task.status is TaskStatus.RUNNING:  # the engine has it: its slot is not free yet
                self.candidates.hold(self.state.instances[task.instance_id], task.task_id)
        self.book.advance(task, Cancel(event.reason), step)

    def _reject(self, task_id: TaskId, reason: RejectReason, message: str, step: Step) -> None:
        self.stats.rejections[reason] = self.stats.rejections.get(reason, 0) + 1
        step.emit(TaskRejected(task_id=task_id, reason=reason, message=message))

    # ---- worker results -------------------------------------------------------------------------

    def _bound(
        self, task_id: TaskId, msg: TaskAccepted | TaskChunk | TaskFinished | TaskFailed
    ) -> TaskRecord | None:
        """The live task this message speaks for: bound to the instance and node that sent it."""
        task = self.book.live.get(task_id)
        if task is None or task.instance_id != msg.instance_id or task.node_id != msg.node_id:
            return None
        return task

    def _accepted(self, msg: TaskAccepted, step: Step) -> None:
        task = self._bound(msg.task_id, msg)
        if task is not None:
            if task.status is TaskStatus.PENDING:
                self.book.advance(task, CONFIRM, step)
            return
        # Unknown, over, queued, or bound elsewhere since (re-placed): nobody wants this copy.
        self.stats.orphan_cancels += 1
        step.emit(CancelTask(task_id=msg.task_id, node_id=msg.node_id, instance_id=msg.instance_id))

    def _chunk(self, msg: TaskChunk, step: Step) -> None:
        task = self._bound(msg.task_id, msg)
        if task is None:
            self.stats.late_events += 1
            return
        if task.status is TaskStatus.PENDING:
            self.book.advance(task, CONFIRM, step)  # the TaskAccepted was lost; output proves it
        self.output.chunk(task, msg.index, msg.text, step)

    def _worker_ended(self, msg: TaskFinished | TaskFailed, step: Step) -> None:
        task = self._bound(msg.task_id, msg)
        if task is None:
            self.stats.late_events += 1
            return
        if isinstance(msg, TaskFailed):
            if msg.refused:
                # Refused before it started ("shutting down", "not ready", unknown instance): the
                # attempt is lost, the request is not; it goes to another instance.
                self.liveness.lose_attempt(task, f"{msg.instance_id} refused the task: {msg.reason}", step)
            elif msg.code == INSTANCE_LOST:
                # The instance broke under it (a sharded instance lost a rank): like a dead node,
                # the task runs again elsewhere unless output already reached the client (503).
                self.liveness.lose_attempt(task, msg.reason or f"instance {msg.instance_id} was lost", step)
            else:
                self.book.advance(task, Fail(msg.reason or "the worker failed the task", code=msg.code), step)
        elif msg.finish_reason is FinishReason.CANCELLED:
            # The master did not cancel this live task (it would be over or moved): the worker
            # gave it up (shutting down, or a stale cancel). That is a lost attempt, not a result.
            self.liveness.lose_attempt(task, f"instance {msg.instance_id} gave the task up", step)
        else:
            if task.status is TaskStatus.PENDING:
                self.book.advance(task, CONFIRM, step)
            self.output.finished(task, msg, step)
