"""Liveness and loss: nodes that fall silent, instances that go away, assignments nobody confirmed,
and what happens to their tasks.

First phase only: these functions make instances ineligible and displace or fail tasks; they never
place anything. `Scheduler.settle`, called once the whole event has been applied, re-places.
"""

from __future__ import annotations

from exo_master.core.candidates import Candidates
from exo_master.core.config import CoreConfig
from exo_master.core.events import Step
from exo_master.core.instance_state import PhaseTrigger, move
from exo_master.core.lifecycle import Fail, TaskRecord, TaskStatus, Unbind, permits
from exo_master.core.records import ClusterState, InstanceRecord, NodeRecord
from exo_master.core.tasks import TaskBook
from protocol.ids import InstanceId, NodeId, TaskId
from protocol.messages import CancelTask, NodeRefused


def established(node: NodeRecord) -> bool:
    return node.subscribed or bool(node.instances)


class Liveness:
    def __init__(self, config: CoreConfig, book: TaskBook, candidates: Candidates) -> None:
        self.config = config
        self.state: ClusterState = book.state
        self.book = book
        self.candidates = candidates
        self.subscribed: set[NodeId] = set()  # XPUB subscriptions seen, also for nodes not yet known

    # ---- the node table: bounded, and no peer crowds out a worker that subscribes ----------------
    # A node is established once it subscribed to its topic or reported an instance. One that never
    # did (a heartbeat with a made-up id, say) is forgotten as soon as it falls silent, and gives
    # its row up to a subscribed newcomer when the table is full. Only a table full of established
    # nodes refuses a subscribed newcomer, and then it says so (NodeRefused: the worker exits 2).

    def make_room(self, node_id: NodeId, step: Step) -> bool:
        """Whether a newcomer's heartbeat may add a row (evicting an unestablished node if need be)."""
        if len(self.state.nodes) < self.config.max_nodes:
            return True
        self.book.stats.refused_nodes += 1
        if node_id not in self.subscribed:
            return False  # silently: it cannot hear a refusal, and may get a row once it subscribes
        idle = [n for n in self.state.nodes.values() if not established(n)]
        if idle:
            del self.state.nodes[min(idle, key=lambda n: n.last_seen).node_id]
            return True
        reason = (
            f"the master's node table is full ({self.config.max_nodes} nodes, exo-master --max-nodes): "
            f"node {node_id} was not admitted"
        )
        step.emit(NodeRefused(node_id=node_id, incarnation="", reason=reason))
        return False

    # ---- nodes (their link: instance_state.Link) ------------------------------------------------

    def check_nodes(self, step: Step) -> None:
        now = step.now
        deadline = now - self.config.node_timeout
        forget_before = now - self.config.forget_dead_after
        dying = [n for n in self.state.nodes.values() if n.alive and n.last_seen < deadline]
        for node in [n for n in dying if not established(n)]:
            del self.state.nodes[node.node_id]  # never subscribed nor reported anything: no dead row
        dying = [n for n in dying if established(n)]
        for node in dying:  # every dying node ineligible before any task moves
            node.alive = False
            self._reindex(node)
        for node in dying:
            why = f"node {node.node_id} stopped responding (no heartbeat for {now - node.last_seen:.1f} s)"
            for iid in sorted(node.instances):
                self.evacuate(self.state.instances[iid], why, step)
        for node in [n for n in self.state.nodes.values() if not n.alive and n.last_seen < forget_before]:
            why = f"node {node.node_id} has been dead too long"
            self.retire(dict.fromkeys(sorted(node.instances), why), step)
            del self.state.nodes[node.node_id]

    def seen(self, node_id: NodeId, now: float) -> None:
        """Any message from a live node proves it still alive. A node already declared dead comes
        back only with a full snapshot (its heartbeat), since its work was moved meanwhile."""
        node = self.state.nodes.get(node_id)
        if node is not None and node.alive:
            node.last_seen = now

    def revive(self, node: NodeRecord, now: float) -> None:
        node.last_seen = now
        if not node.alive:
            node.alive = True
            self._reindex(node)

    def set_subscribed(self, node_id: NodeId, subscribed: bool) -> None:
        if subscribed:
            if len(self.subscribed) >= 4 * self.config.max_nodes and node_id not in self.state.nodes:
                return  # bounded: a subscriber with no row yet is remembered while there is room
            self.subscribed.add(node_id)
        else:
            self.subscribed.discard(node_id)
        node = self.state.nodes.get(node_id)
        if node is None:
            return
        node.subscribed = subscribed
        self._reindex(node)

    def _reindex(self, node: NodeRecord) -> None:
        """The node's link changed: so did the availability of each of its instances."""
        for iid in sorted(node.instances):
            self.candidates.reindex(self.state.instances[iid])

    # ---- instances ------------------------------------------------------------------------------

    def retire(self, leaving: dict[InstanceId, str], step: Step) -> None:
        """Instances are going away (id -> why): all of them ineligible first, then their tasks move."""
        insts = [self.state.instances[iid] for iid in leaving]
        for inst in insts:
            move(inst, PhaseTrigger.RETIRE)
            self.candidates.reindex(inst)
        for inst in insts:
            self.evacuate(inst, leaving[inst.instance_id], step)
            self.state.remove_instance(inst.instance_id)

    def evacuate(self, inst: InstanceRecord, why: str, step: Step) -> None:
        """The instance is lost: what it had not started is displaced, what it ran is lost too."""
        self.evacuate_pending(inst, why, step)
        for task_id in sorted(inst.confirmed):
            self.lose_attempt(self.book.live[task_id], why, step)

    def evacuate_pending(self, inst: InstanceRecord, why: str, step: Step) -> None:
        for task_id in self.book.ledger.tasks_on(inst.instance_id):
            self.book.advance(self.book.live[task_id], Unbind(why), step)
            self.cancel_copy(task_id, inst.instance_id, step)

    # ---- tasks ----------------------------------------------------------------------------------

    def lose_attempt(self, task: TaskRecord, why: str, step: Step) -> None:
        """The task's instance lost it: run it again elsewhere if the table allows (no output reached
        the client yet: `lifecycle.nothing_delivered`), otherwise the task fails."""
        assert task.status in (TaskStatus.PENDING, TaskStatus.RUNNING), f"{task.task_id} has no attempt"
        if permits(task, Unbind):
            self.book.advance(task, Unbind(why), step)
        else:
            self.book.advance(task, Fail(why, unavailable=True), step)

    def expire_unconfirmed(self, step: Step) -> list[tuple[TaskId, InstanceId]]:
        """Assignments no worker confirmed within the ledger TTL are displaced; returns where each
        was, so the old copy can be cancelled once it is known whether the task moved."""
        expired = []
        for entry in self.book.ledger.expire(step.now):
            task = self.book.live[entry.task_id]
            assert task.status is TaskStatus.PENDING and task.instance_id == entry.instance_id
            self.book.advance(task, Unbind("not confirmed in time"), step)
            expired.append((entry.task_id, entry.instance_id))
        return expired

    def cancel_copy(self, task_id: TaskId, instance_id: InstanceId, step: Step) -> None:
        inst = self.state.instances.get(instance_id)
        if inst is not None:
            step.emit(CancelTask(task_id=task_id, node_id=inst.node_id, instance_id=instance_id))
