"""Reconciliation: a worker's heartbeat is a full snapshot of its instances and their active tasks,
and the projection is made to agree with it (PUB/SUB may have lost any message in between: the
ZeroMQ guide's Clone pattern).

Applied in two phases like every event: first every instance change (gone, replaced, not ready any
more, fewer kinds) makes instances ineligible and displaces tasks; `Scheduler.settle` re-places
afterwards, so a task never lands on an instance that the same snapshot takes away.
"""

from __future__ import annotations

from exo_master.core.candidates import Candidates
from exo_master.core.config import CoreConfig
from exo_master.core.events import Step
from exo_master.core.instance_state import PHASE_MOVES, REPORTED, move, phase_of, stops_taking_work
from exo_master.core.lifecycle import CONFIRM
from exo_master.core.liveness import Liveness
from exo_master.core.output import OutputRelay
from exo_master.core.records import ClusterState, InstanceRecord, NodeRecord
from exo_master.core.tasks import TaskBook
from protocol.cluster_view import TaskStatus
from protocol.messages import CancelTask, InstanceReport, TaskAck, WorkerHeartbeat


class Reconciler:
    def __init__(
        self,
        config: CoreConfig,
        book: TaskBook,
        candidates: Candidates,
        liveness: Liveness,
        output: OutputRelay,
    ) -> None:
        self.config = config
        self.state: ClusterState = book.state
        self.book = book
        self.candidates = candidates
        self.liveness = liveness
        self.output = output
        self.stats = book.stats

    def heartbeat(self, msg: WorkerHeartbeat, step: Step) -> None:
        now = step.now
        node = self.state.nodes.get(msg.node_id)
        if node is None:
            if not self.liveness.make_room(msg.node_id, step):
                return
            node = NodeRecord(
                node_id=msg.node_id, last_seen=now, subscribed=msg.node_id in self.liveness.subscribed
            )
            self.state.nodes[msg.node_id] = node
        node.address = msg.address
        node.master_session = msg.master_session
        self.liveness.revive(node, now)
        # A rank > 0 of a sharded instance takes no requests: only the instance controller sees it.
        serving = [r for r in msg.instances if r.takes_tasks]
        reported = {r.instance_id: r for r in serving}
        # Instances no longer reported, or whose id now names another node's or model's instance.
        leaving = {
            iid: f"instance {iid} is no longer reported by {node.node_id}"
            for iid in sorted(node.instances - reported.keys())
        }
        for report in serving:
            known = self.state.instances.get(report.instance_id)
            if known is not None and (known.node_id != node.node_id or known.model != report.model):
                leaving[report.instance_id] = f"instance {report.instance_id} changed"
        if leaving:
            self.liveness.retire(leaving, step)
        stopped = [inst for report in serving if (inst := self._apply(node, report)) is not None]
        for inst in stopped:
            self.liveness.evacuate_pending(inst, f"instance {inst.instance_id} is {inst.phase}", step)
        for report in serving:
            self._reconcile(node, self.state.instances[report.instance_id], report, step)

    def _apply(self, node: NodeRecord, report: InstanceReport) -> InstanceRecord | None:
        """Create or update one instance; return it if it just stopped taking work."""
        inst = self.state.instances.get(report.instance_id)
        if inst is None:
            inst = InstanceRecord(
                instance_id=report.instance_id,
                node_id=node.node_id,
                model=report.model,
                kinds=report.kinds,
                phase=phase_of(report.status),
                max_concurrency=report.max_concurrency,
                capacity=report.capacity,
                error=report.error,
                prompt_cache=report.prompt_cache,
            )
            self.state.add_instance(inst)
            self.candidates.reindex(inst)
            return None
        inst.error = report.error
        inst.prompt_cache = report.prompt_cache
        if (inst.kinds, inst.phase, inst.max_concurrency, inst.capacity) == (
            report.kinds,
            PHASE_MOVES.get((inst.phase, REPORTED[report.status])),
            report.max_concurrency,
            report.capacity,
        ):
            return None  # the usual heartbeat: nothing to re-index, so the placement heap stays small
        for dropped in set(inst.kinds) - set(report.kinds):
            self.candidates.drop_kind(inst, dropped)
        was = inst.phase
        move(inst, REPORTED[report.status])
        inst.kinds = report.kinds
        inst.max_concurrency = report.max_concurrency
        inst.capacity = report.capacity
        self.candidates.reindex(inst)
        return inst if stops_taking_work(was, inst.phase) else None

    def _reconcile(self, node: NodeRecord, inst: InstanceRecord, report: InstanceReport, step: Step) -> None:
        inst.context_length = report.context_length
        self.candidates.observe(inst, report.work, frozenset(report.active_tasks))
        for task_id in report.active_tasks:
            task = self.book.live.get(task_id)
            if task is not None and task.instance_id == inst.instance_id:
                if task.status is TaskStatus.PENDING:
                    self.book.advance(task, CONFIRM, step)
                continue
            # Unknown, over, or bound elsewhere since: nobody wants this copy.
            self.stats.orphan_cancels += 1
            step.emit(CancelTask(task_id=task_id, node_id=node.node_id, instance_id=inst.instance_id))
        ended = set(report.finished_tasks)
        for task_id in report.finished_tasks:
            task = self.book.live.get(task_id)
            if task is not None and task.instance_id == inst.instance_id:
                if task.status is TaskStatus.PENDING:
                    self.book.advance(task, CONFIRM, step)
                self.output.ended_on_worker(task, step.now)  # its final was lost: fetch it
            elif task is None:
                # Over here (its end arrived, or it failed): the worker may let it go.
                step.emit(TaskAck(task_id=task_id, node_id=node.node_id, instance_id=inst.instance_id))
        # A worker sends TaskFinished before its next snapshot, so a confirmed task in neither list
        # was lost by the worker (it restarted).
        for task_id in sorted(inst.confirmed - set(report.active_tasks) - ended):
            why = f"{node.node_id} no longer runs the task"
            self.liveness.lose_attempt(self.book.live[task_id], why, step)
