"""Reconciliation: a worker's heartbeat is a full snapshot of its instances and their active tasks,
and the projection is made to agree with it (PUB/SUB may have lost any message in between: the
ZeroMQ guide's Clone pattern).

Applied in two phases like every event: first every instance change (gone, replaced, not ready any
more, fewer kinds) makes instances ineligible and displaces tasks; `Scheduler.settle` re-places
afterwards, so a task never lands on an instance that the same snapshot takes away.
"""

from __future__ import annotations

from exo_master.core.config import CoreConfig
from exo_master.core.events import Effect
from exo_master.core.liveness import Liveness
from exo_master.core.output import OutputRelay
from exo_master.core.records import ClusterState, InstanceRecord, NodeRecord
from exo_master.core.scheduling import Scheduler
from exo_master.core.tasks import TaskBook
from protocol.cluster_view import TaskStatus
from protocol.messages import CancelTask, InstanceReport, InstanceStatus, TaskAck, WorkerHeartbeat


class Reconciler:
    def __init__(
        self,
        config: CoreConfig,
        state: ClusterState,
        book: TaskBook,
        scheduler: Scheduler,
        liveness: Liveness,
        output: OutputRelay,
        out: list[Effect],
    ) -> None:
        self.config = config
        self.state = state
        self.book = book
        self.scheduler = scheduler
        self.liveness = liveness
        self.output = output
        self.stats = book.stats
        self.out = out

    def heartbeat(self, msg: WorkerHeartbeat, now: float) -> None:
        node = self.state.nodes.get(msg.node_id)
        if node is None:
            if len(self.state.nodes) >= self.config.max_nodes:
                self.stats.refused_nodes += 1  # bounded memory: a flood of fake nodes stops here
                return
            node = NodeRecord(
                node_id=msg.node_id, last_seen=now, subscribed=msg.node_id in self.liveness.subscribed
            )
            self.state.nodes[msg.node_id] = node
        node.address = msg.address
        node.master_session = msg.master_session
        self.liveness.revive(node, now)
        reported = {r.instance_id: r for r in msg.instances}
        # Instances no longer reported, or whose id now names another node's or model's instance.
        leaving = {
            iid: f"instance {iid} is no longer reported by {node.node_id}"
            for iid in sorted(node.instances - reported.keys())
        }
        for report in msg.instances:
            known = self.state.instances.get(report.instance_id)
            if known is not None and (known.node_id != node.node_id or known.model != report.model):
                leaving[report.instance_id] = f"instance {report.instance_id} changed"
        if leaving:
            self.liveness.retire(leaving, now)
        stopped = [inst for report in msg.instances if (inst := self._apply(node, report)) is not None]
        for inst in stopped:
            self.liveness.evacuate_pending(inst, f"instance {inst.instance_id} is {inst.status}")
        for report in msg.instances:
            self._reconcile(node, self.state.instances[report.instance_id], report, now)

    def _apply(self, node: NodeRecord, report: InstanceReport) -> InstanceRecord | None:
        """Create or update one instance; return it if it just stopped being ready."""
        inst = self.state.instances.get(report.instance_id)
        if inst is None:
            inst = InstanceRecord(
                instance_id=report.instance_id,
                node_id=node.node_id,
                model=report.model,
                kinds=report.kinds,
                status=report.status,
                max_concurrency=report.max_concurrency,
                capacity=report.capacity,
                error=report.error,
                prompt_cache=report.prompt_cache,
            )
            self.state.add_instance(inst)
            self.scheduler.reindex(inst)
            return None
        inst.error = report.error
        inst.prompt_cache = report.prompt_cache
        if (inst.kinds, inst.status, inst.max_concurrency, inst.capacity) == (
            report.kinds,
            report.status,
            report.max_concurrency,
            report.capacity,
        ):
            return None  # the usual heartbeat: nothing to re-index, so the placement heap stays small
        for dropped in set(inst.kinds) - set(report.kinds):
            self.scheduler.drop_kind(inst, dropped)
        was_ready = inst.status is InstanceStatus.READY
        inst.kinds = report.kinds
        inst.status = report.status
        inst.max_concurrency = report.max_concurrency
        inst.capacity = report.capacity
        self.scheduler.reindex(inst)
        return inst if was_ready and inst.status is not InstanceStatus.READY else None

    def _reconcile(self, node: NodeRecord, inst: InstanceRecord, report: InstanceReport, now: float) -> None:
        inst.context_length = report.context_length
        self.scheduler.observe(inst, report.work, frozenset(report.active_tasks))
        for task_id in report.active_tasks:
            task = self.book.live.get(task_id)
            if task is not None and task.instance_id == inst.instance_id:
                if task.status is TaskStatus.PENDING:
                    self.book.confirm(task)
                continue
            # Unknown, over, or bound elsewhere since: nobody wants this copy.
            self.stats.orphan_cancels += 1
            self.out.append(CancelTask(task_id=task_id, node_id=node.node_id, instance_id=inst.instance_id))
        ended = set(report.finished_tasks)
        for task_id in report.finished_tasks:
            task = self.book.live.get(task_id)
            if task is not None and task.instance_id == inst.instance_id:
                if task.status is TaskStatus.PENDING:
                    self.book.confirm(task)
                self.output.ended_on_worker(task, now)  # its final was lost: fetch it
            elif task is None:
                # Over here (its end arrived, or it failed): the worker may let it go.
                self.out.append(TaskAck(task_id=task_id, node_id=node.node_id, instance_id=inst.instance_id))
        # A worker sends TaskFinished before its next snapshot, so a confirmed task in neither list
        # was lost by the worker (it restarted).
        for task_id in sorted(inst.confirmed - set(report.active_tasks) - ended):
            why = f"{node.node_id} no longer runs the task"
            self.liveness.lose_attempt(self.book.live[task_id], why, now)
