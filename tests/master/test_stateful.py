"""Random interleavings of everything that can happen to the core, against a simulated cluster.

Three simulated workers hold the truth (which tasks each instance runs) and talk to the core through
lossy, reorderable channels: the core's AssignTask/CancelTask land in per-node inboxes delivered in
any order, duplicated or dropped; worker events may be lost or replayed late; nodes crash, fall
silent and come back; instances flip between ready, loading and failed, and disappear. After every
step the core's incremental bookkeeping must match a recount, and every request must be accounted
for exactly once. At the end everything is healed and every request must reach exactly one end.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from exo_master.core import CoreConfig, MasterCore
from exo_master.core.events import (
    CancelRequest,
    Effect,
    NodeSubscribed,
    NodeUnsubscribed,
    SubmitTask,
    TaskCompleted,
    TaskErrored,
    TaskOutput,
    TaskPlaced,
    TaskQueued,
    TaskRejected,
)
from exo_master.core.invariants import check_pools
from protocol.cluster_view import TaskStatus
from protocol.ids import InstanceId, ModelId, NodeId, TaskId
from protocol.messages import (
    AssignTask,
    CancelTask,
    FetchOutput,
    FinishReason,
    InstanceReport,
    InstanceStatus,
    TaskAccepted,
    TaskAck,
    TaskChunk,
    TaskFailed,
    TaskFinished,
    TaskKind,
    WorkerHeartbeat,
    WorkerMessage,
)
from tests.master.cluster import ALL_KINDS, MODEL, loads, node_of, params, recount_loads

TEXT, IMAGE = TaskKind.TEXT_GENERATION, TaskKind.IMAGE_GENERATION
# node -> its instances: (kinds, max_concurrency, capacity)
LAYOUT: dict[int, list[tuple[tuple[TaskKind, ...], int, float]]] = {
    0: [(ALL_KINDS, 2, 1.0), ((TEXT,), 1, 2.0)],
    1: [(ALL_KINDS, 1, 1.0)],
    2: [((TEXT, IMAGE), 2, 4.0)],
}
CONFIG = CoreConfig(queue_limit=3, max_attempts=3)
FinalMessage = TaskFinished | TaskFailed
maybe_lost = st.sampled_from([False, False, False, True])


@dataclass
class SimInstance:
    """One instance as its worker knows it; behaves like exo_worker.runner.Runner towards the bus."""

    instance_id: InstanceId
    kinds: tuple[TaskKind, ...]
    max_concurrency: int
    capacity: float
    status: InstanceStatus = InstanceStatus.READY
    present: bool = True
    active: dict[TaskId, int] = field(default_factory=dict)  # task -> next chunk index
    finals: OrderedDict[TaskId, FinalMessage] = field(default_factory=OrderedDict)
    # Like the Runner's output log: each task's chunks until the master acknowledges its end.
    outputs: dict[TaskId, int] = field(default_factory=dict)  # task -> chunks produced
    unacked: set[TaskId] = field(default_factory=set)

    def report(self) -> InstanceReport:
        return InstanceReport(
            instance_id=self.instance_id,
            model=MODEL,
            kinds=self.kinds,
            status=self.status,
            max_concurrency=self.max_concurrency,
            capacity=self.capacity,
            active_tasks=tuple(self.active),
            finished_tasks=tuple(sorted(self.unacked)),
        )


@dataclass
class SimWorker:
    node_id: NodeId
    instances: dict[InstanceId, SimInstance]
    up: bool = True
    inbox: list[AssignTask | CancelTask | FetchOutput | TaskAck] = field(default_factory=list)

    def heartbeat(self) -> WorkerHeartbeat:
        reports = tuple(i.report() for i in self.instances.values() if i.present)
        return WorkerHeartbeat(node_id=self.node_id, instances=reports)

    def receive(self, msg: AssignTask | CancelTask | FetchOutput | TaskAck) -> list[WorkerMessage]:
        if isinstance(msg, TaskAck | FetchOutput):
            inst = self.instances.get(msg.instance_id)
            if inst is None:
                return []
            if isinstance(msg, TaskAck):
                inst.unacked.discard(msg.task_id)
                inst.outputs.pop(msg.task_id, None)
                return []
            return self.resend(inst, msg)
        if isinstance(msg, CancelTask):  # like RunnerGroup: the named instance, else wherever it runs
            named = self.instances.get(msg.instance_id)
            targets = (
                [named] if named and named.present else [i for i in self.instances.values() if i.present]
            )
            return [m for inst in targets for m in self._cancel(inst, msg.task_id)]
        inst = self.instances.get(msg.instance_id)
        if inst is None or not inst.present:
            refusal = TaskFailed(
                node_id=self.node_id,
                task_id=msg.task_id,
                instance_id=msg.instance_id,
                reason="?",
                refused=True,
            )
            return [refusal]
        final = inst.finals.get(msg.task_id)
        if final is not None and not _cancelled(final):
            return [final]
        inst.finals.pop(msg.task_id, None)  # like the Runner: a cancelled task assigned again runs anew
        if msg.task_id not in inst.active:
            if inst.status is not InstanceStatus.READY or msg.kind not in inst.kinds:
                return [self.end(inst, msg.task_id, None, refused=True)]
            inst.active[msg.task_id] = 0
            inst.outputs[msg.task_id] = 0
        return [TaskAccepted(node_id=self.node_id, task_id=msg.task_id, instance_id=inst.instance_id)]

    def resend(self, inst: SimInstance, msg: FetchOutput) -> list[WorkerMessage]:
        if msg.task_id not in inst.outputs:
            reason = "output no longer held"
            return [
                TaskFailed(
                    node_id=self.node_id, task_id=msg.task_id, instance_id=inst.instance_id, reason=reason
                )
            ]
        again: list[WorkerMessage] = [
            self.chunk_message(inst, msg.task_id, i) for i in range(msg.from_index, inst.outputs[msg.task_id])
        ]
        final = inst.finals.get(msg.task_id)
        if msg.final and final is not None:
            again.append(final)
        return again

    def chunk_message(self, inst: SimInstance, task_id: TaskId, index: int) -> TaskChunk:
        # Deterministic text per (task, index), like the sim engine: any attempt yields the same text.
        return TaskChunk(
            node_id=self.node_id, task_id=task_id, instance_id=inst.instance_id, index=index, text=f"{index} "
        )

    def _cancel(self, inst: SimInstance, task_id: TaskId) -> list[WorkerMessage]:
        return [self.end(inst, task_id, FinishReason.CANCELLED)] if task_id in inst.active else []

    def end(
        self, inst: SimInstance, task_id: TaskId, reason: FinishReason | None, refused: bool = False
    ) -> FinalMessage:
        inst.active.pop(task_id, None)
        final: FinalMessage
        if reason is None:
            final = TaskFailed(
                node_id=self.node_id,
                task_id=task_id,
                instance_id=inst.instance_id,
                reason="x",
                refused=refused,
            )
        else:
            final = TaskFinished(
                node_id=self.node_id,
                task_id=task_id,
                instance_id=inst.instance_id,
                finish_reason=reason,
                chunks=inst.outputs.get(task_id, 0),
            )
        inst.finals[task_id] = final
        if not refused and reason is not FinishReason.CANCELLED:
            inst.unacked.add(task_id)
        else:
            inst.outputs.pop(task_id, None)
        return final

    def crash(self) -> None:
        self.inbox.clear()
        for inst in self.instances.values():
            inst.active.clear()
            inst.finals.clear()
            inst.outputs.clear()
            inst.unacked.clear()


def _cancelled(final: FinalMessage) -> bool:
    return isinstance(final, TaskFinished) and final.finish_reason is FinishReason.CANCELLED


@dataclass
class Told:
    """What the master has been told, kept apart from the core: the oracle for eligibility."""

    subscribed: dict[NodeId, bool] = field(default_factory=dict)
    reports: dict[InstanceId, InstanceReport] = field(default_factory=dict)  # from the last snapshot
    last_heard: dict[NodeId, float] = field(default_factory=dict)
    dead: set[NodeId] = field(default_factory=set)

    def event(self, event: object, now: float) -> None:
        if isinstance(event, NodeSubscribed | NodeUnsubscribed):
            self.subscribed[event.node_id] = isinstance(event, NodeSubscribed)
        elif isinstance(event, WorkerHeartbeat):
            prefix = f"{event.node_id}/"
            self.reports = {i: r for i, r in self.reports.items() if not i.startswith(prefix)}
            self.reports.update((r.instance_id, r) for r in event.instances)
            self.dead.discard(event.node_id)
            self.last_heard[event.node_id] = now
        elif isinstance(event, TaskAccepted | TaskChunk | TaskFinished | TaskFailed) and (
            event.node_id not in self.dead  # a dead node comes back only with a snapshot
        ):
            self.last_heard[event.node_id] = now

    def tick(self, now: float) -> None:
        for node, heard in self.last_heard.items():
            if heard < now - CONFIG.node_timeout:
                self.dead.add(node)

    def may_take(self, instance_id: InstanceId, kind: TaskKind) -> bool:
        node = NodeId(instance_id.split("/")[0])
        r = self.reports.get(instance_id)
        return (
            node not in self.dead
            and self.subscribed.get(node, False)
            and r is not None
            and r.status is InstanceStatus.READY
            and kind in r.kinds
        )


class ClusterMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.core = MasterCore(CONFIG)
        self.now = 0.0
        self.workers = {
            n: SimWorker(
                node_id=node_of(n),
                instances={
                    InstanceId(f"node{n}/{j}"): SimInstance(InstanceId(f"node{n}/{j}"), kinds, conc, cap)
                    for j, (kinds, conc, cap) in enumerate(specs)
                },
            )
            for n, specs in LAYOUT.items()
        }
        self.max_concurrency = {
            iid: i.max_concurrency for w in self.workers.values() for iid, i in w.instances.items()
        }
        self.history: list[WorkerMessage] = []
        self.next_id = 0
        self.submitted: list[TaskId] = []
        self.rejected: set[TaskId] = set()
        self.client_cancelled: set[TaskId] = set()
        self.finals: Counter[TaskId] = Counter()
        self.final_kind: dict[TaskId, type] = {}
        self.last_output: dict[TaskId, int] = {}
        self.delivered: dict[TaskId, str] = {}
        self.told = Told()
        self.kind_of: dict[TaskId, TaskKind] = {}
        self.attempts: Counter[TaskId] = Counter()
        for n, worker in self.workers.items():
            self.feed(NodeSubscribed(node_id=node_of(n)))
            self.feed(worker.heartbeat())

    # ---- plumbing ------------------------------------------------------------------------------

    def feed(self, event: object) -> list[Effect]:
        self.told.event(event, self.now)
        effects = self.core.handle(event, self.now)  # type: ignore[arg-type]
        self.route(effects)
        return effects

    def route(self, effects: list[Effect]) -> None:
        placed = [e for e in effects if isinstance(e, TaskPlaced)]
        per_task = Counter(p.task_id for p in placed)
        assert all(n == 1 for n in per_task.values()), f"a task placed twice in one step: {per_task}"
        for p in placed:
            kind = self.kind_of[p.task_id]
            assert self.told.may_take(p.instance_id, kind), (
                f"{p.task_id} placed on ineligible {p.instance_id}"
            )
            self.attempts[p.task_id] += 1
            assert p.attempt == self.attempts[p.task_id], f"an attempt lost without a placement: {p}"
        self.check_age_order(placed)
        for e in effects:
            if isinstance(e, AssignTask | CancelTask | FetchOutput | TaskAck):
                worker = self.workers[int(e.node_id.removeprefix("node"))]
                if worker.up:
                    worker.inbox.append(e)
            elif isinstance(e, TaskCompleted | TaskErrored):
                assert self.finals[e.task_id] == 0, f"second final effect for {e.task_id}: {e}"
                if isinstance(e, TaskCompleted):  # a normal end means exactly the engine's text
                    n = self.last_output.get(e.task_id, -1) + 1
                    assert self.delivered.get(e.task_id, "") == "".join(f"{i} " for i in range(n))
                cancelled = isinstance(e, TaskErrored) and e.cancelled
                assert cancelled == (e.task_id in self.client_cancelled), f"cancel mismatch: {e}"
                self.finals[e.task_id] += 1
                self.final_kind[e.task_id] = type(e)
            elif isinstance(e, TaskOutput):
                assert self.finals[e.task_id] == 0, f"output after the end of {e.task_id}"
                assert e.index == self.last_output.get(e.task_id, -1) + 1, f"output out of order: {e}"
                self.last_output[e.task_id] = e.index
                self.delivered[e.task_id] = self.delivered.get(e.task_id, "") + e.text
            elif isinstance(e, TaskPlaced):
                assert self.finals[e.task_id] == 0 and e.attempt <= CONFIG.max_attempts

    def send(self, worker: SimWorker, msgs: list[WorkerMessage], lost: bool = False) -> None:
        """A worker publishes: recorded for later replay; delivered unless lost or the node is cut off."""
        self.history.extend(msgs)
        del self.history[:-60]
        if worker.up and not lost:
            for m in msgs:
                self.feed(m)

    def tick(self) -> None:
        self.told.tick(self.now)
        self.route(self.core.tick(self.now))

    def check_age_order(self, placed: list[TaskPlaced]) -> None:
        """No request placed in this step may have overtaken an older one still waiting that its
        instance could have served (across kinds; admission order is submission order)."""
        if not placed:
            return
        waiting = self.core.view(self.now, task_limit=10**6, status=TaskStatus.QUEUED).tasks
        for p in placed:
            report = self.told.reports[p.instance_id]
            for w in waiting:
                older = int(w.task_id[1:]) < int(p.task_id[1:])
                kind = self.kind_of[TaskId(w.task_id)]
                assert not (older and kind in report.kinds), f"{p.task_id} overtook waiting {w.task_id}"

    def running(self) -> list[tuple[SimWorker, SimInstance, TaskId]]:
        return [
            (w, inst, t)
            for w in self.workers.values()
            if w.up
            for inst in w.instances.values()
            if inst.present
            for t in sorted(inst.active)
        ]

    def all_instances(self) -> list[tuple[SimWorker, SimInstance]]:
        return [(w, i) for w in self.workers.values() for i in w.instances.values()]

    # ---- clients -------------------------------------------------------------------------------

    @rule(
        requests=st.lists(
            st.tuples(st.sampled_from(ALL_KINDS), st.sampled_from([True] * 7 + [False])),
            min_size=1,
            max_size=4,
        )
    )
    def submit(self, requests: list[tuple[TaskKind, bool]]) -> None:
        """A few clients arrive at once (known_model False: a model nobody serves)."""
        for kind, known_model in requests:
            task_id = TaskId(f"t{self.next_id}")
            self.next_id += 1
            self.kind_of[task_id] = kind
            model = MODEL if known_model else ModelId("unknown")
            effects = self.feed(SubmitTask(task_id=task_id, params=params(kind, model)))
            outcomes = [e for e in effects if isinstance(e, TaskPlaced | TaskQueued | TaskRejected)]
            assert [e.task_id for e in outcomes] == [task_id], effects
            self.submitted.append(task_id)
            if isinstance(outcomes[0], TaskRejected):
                self.rejected.add(task_id)

    @precondition(lambda self: self.submitted)
    @rule(data=st.data())
    def client_cancel(self, data: st.DataObject) -> None:
        task_id = data.draw(st.sampled_from(self.submitted))
        if task_id in self.core.book.live:
            self.client_cancelled.add(task_id)
        self.feed(CancelRequest(task_id=task_id))

    # ---- workers -------------------------------------------------------------------------------

    @precondition(lambda self: any(w.up and w.inbox for w in self.workers.values()))
    @rule(data=st.data(), duplicate=st.booleans(), lost=maybe_lost)
    def deliver(self, data: st.DataObject, duplicate: bool, lost: bool) -> None:
        worker = data.draw(st.sampled_from([w for w in self.workers.values() if w.up and w.inbox]))
        index = data.draw(st.integers(0, len(worker.inbox) - 1))  # any order
        msg = worker.inbox[index] if duplicate else worker.inbox.pop(index)
        self.send(worker, worker.receive(msg), lost)

    @precondition(lambda self: any(w.inbox for w in self.workers.values()))
    @rule(data=st.data())
    def drop_message(self, data: st.DataObject) -> None:
        worker = data.draw(st.sampled_from([w for w in self.workers.values() if w.inbox]))
        worker.inbox.pop(data.draw(st.integers(0, len(worker.inbox) - 1)))

    @precondition(lambda self: self.running())
    @rule(data=st.data(), lost=maybe_lost)
    def chunk(self, data: st.DataObject, lost: bool) -> None:
        worker, inst, task_id = data.draw(st.sampled_from(self.running()))
        index = inst.active[task_id]
        inst.active[task_id] = inst.outputs[task_id] = index + 1
        self.send(worker, [worker.chunk_message(inst, task_id, index)], lost)

    @precondition(lambda self: self.running())
    @rule(data=st.data(), failed=st.booleans(), lost=maybe_lost)
    def end_task(self, data: st.DataObject, failed: bool, lost: bool) -> None:
        worker, inst, task_id = data.draw(st.sampled_from(self.running()))
        self.send(worker, [worker.end(inst, task_id, None if failed else FinishReason.STOP)], lost)

    @rule(data=st.data(), lost=maybe_lost)
    def heartbeat(self, data: st.DataObject, lost: bool) -> None:
        worker = data.draw(st.sampled_from(list(self.workers.values())))
        self.send(worker, [worker.heartbeat()], lost)

    @precondition(lambda self: self.history)
    @rule(data=st.data())
    def replay_old_event(self, data: st.DataObject) -> None:
        self.feed(data.draw(st.sampled_from(self.history)))

    # ---- time, nodes, instances ----------------------------------------------------------------

    @rule(dt=st.sampled_from([0.1, 0.3, 1.0, 2.5, 6.0]))
    def advance(self, dt: float) -> None:
        """Time passes; every node that is up heartbeats each half second."""
        end = self.now + dt
        while self.now < end:
            self.now = min(end, self.now + 0.5)
            for worker in self.workers.values():
                self.send(worker, [worker.heartbeat()])
            self.tick()

    @rule(dt=st.sampled_from([0.5, 1.0, 1.0, 3.5]))
    def silence(self, dt: float) -> None:
        """Time passes with no heartbeat at all (a partition of the master, a stalled bus)."""
        self.now += dt
        self.tick()

    @precondition(lambda self: any(w.up for w in self.workers.values()))
    @rule(data=st.data(), crash=st.booleans())
    def take_node_down(self, data: st.DataObject, crash: bool) -> None:
        worker = data.draw(st.sampled_from([w for w in self.workers.values() if w.up]))
        worker.up = False
        if crash:
            worker.crash()

    @precondition(lambda self: any(not w.up for w in self.workers.values()))
    @rule(data=st.data())
    def bring_node_up(self, data: st.DataObject) -> None:
        worker = data.draw(st.sampled_from([w for w in self.workers.values() if not w.up]))
        worker.up = True
        self.send(worker, [worker.heartbeat()])

    @rule(data=st.data(), status=st.sampled_from(list(InstanceStatus)))
    def set_instance_status(self, data: st.DataObject, status: InstanceStatus) -> None:
        _, inst = data.draw(st.sampled_from(self.all_instances()))
        inst.status = status

    @rule(data=st.data())
    def toggle_instance_presence(self, data: st.DataObject) -> None:
        _, inst = data.draw(st.sampled_from(self.all_instances()))
        inst.present = not inst.present
        inst.active.clear()  # unloaded, or freshly loaded: nothing runs on it

    @rule(data=st.data(), subscribed=st.booleans())
    def subscription(self, data: st.DataObject, subscribed: bool) -> None:
        node_id = node_of(data.draw(st.sampled_from(list(self.workers))))
        self.feed(NodeSubscribed(node_id=node_id) if subscribed else NodeUnsubscribed(node_id=node_id))

    # ---- invariants ----------------------------------------------------------------------------

    @invariant()
    def bookkeeping_matches_a_recount(self) -> None:
        core = self.core
        core.check_invariants()
        check_pools(core)
        counted = loads(core)
        assert counted == recount_loads(core)
        for iid, inst in core.state.instances.items():
            # Placed tasks never overfill; an engine's unowned work is the worker's to report.
            load = core.book.load(inst)
            assert 0 <= load <= self.max_concurrency[iid], f"{iid} holds {load} tasks"

    @invariant()
    def every_live_task_is_counted_in_exactly_one_place(self) -> None:
        core = self.core
        places: Counter[TaskId] = Counter()
        for key in core.book.queues.queue_keys():
            places.update(core.book.queues.tasks(key))
        for inst in core.state.instances.values():
            places.update(inst.confirmed)
            places.update(core.book.ledger.tasks_on(inst.instance_id))
        assert set(places) == set(core.book.live) and all(n == 1 for n in places.values())
        for iid in core.state.instances:
            for task_id in core.book.ledger.tasks_on(iid):
                task = core.book.live[task_id]  # no ledger entry outlives its task
                assert task.status is TaskStatus.PENDING and task.instance_id == iid

    @invariant()
    def waiting_requests_wait_only_for_a_reason(self) -> None:
        core = self.core
        for key in core.book.queues.queue_keys():
            assert core.has_live_candidate(key), f"{key} queue is stranded"
            pool = core.pool(*key)
            for inst in pool.members.values() if pool else ():
                assert core.load(inst) >= inst.max_concurrency, f"{inst.instance_id} idles while {key} waits"

    @invariant()
    def every_request_is_accounted_for_once(self) -> None:
        core = self.core
        for task_id in self.submitted:
            if task_id in self.rejected:
                assert core.task(task_id) is None and self.finals[task_id] == 0
            elif task_id in core.book.live:
                assert self.finals[task_id] == 0
            elif task_id in self.client_cancelled:
                assert self.finals[task_id] == 1 and core.book.recent[task_id].status is TaskStatus.CANCELLED
            else:
                assert self.finals[task_id] == 1, f"{task_id} ended without telling its client"
                ended_as = (
                    TaskStatus.FINISHED if self.final_kind[task_id] is TaskCompleted else TaskStatus.FAILED
                )
                assert core.book.recent[task_id].status is ended_as

    def teardown(self) -> None:
        """Heal everything and let the cluster run dry: every request must reach its end."""
        for n, worker in self.workers.items():
            worker.up = True
            for inst in worker.instances.values():
                inst.present, inst.status = True, InstanceStatus.READY
            self.feed(NodeSubscribed(node_id=node_of(n)))
        for _ in range(200):
            if not self.core.book.live:
                break
            for worker in self.workers.values():
                while worker.inbox:
                    self.send(worker, worker.receive(worker.inbox.pop(0)))
            for worker, inst, task_id in self.running():
                self.send(worker, [worker.end(inst, task_id, FinishReason.STOP)])
            self.advance(0.5)
        assert not self.core.book.live, f"stuck: {list(self.core.book.live.values())[:3]}"
        self.every_request_is_accounted_for_once()
        self.bookkeeping_matches_a_recount()


TestCluster = ClusterMachine.TestCase
TestCluster.settings = settings(
    max_examples=500,
    stateful_step_count=50,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
