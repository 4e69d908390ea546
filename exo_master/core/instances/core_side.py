"""The instance controller's window on the scheduling core (the `CoreSide` it is given).

Draining is the one thing it changes there: a draining instance is ineligible for new tasks while
its node still runs the ones it has (`InstanceRecord.draining`, checked by the eligibility rule).
"""

from __future__ import annotations

from exo_master.core.records import ClusterState
from exo_master.core.scheduling import Scheduler
from exo_master.core.tasks import TaskBook
from protocol.ids import InstanceId, NodeId


class SchedulerSide:
    def __init__(self, state: ClusterState, book: TaskBook, scheduler: Scheduler) -> None:
        self.state = state
        self.book = book
        self.scheduler = scheduler

    def node_alive(self, node_id: NodeId) -> bool | None:
        node = self.state.nodes.get(node_id)
        return None if node is None else node.alive

    def in_flight(self, instance_id: InstanceId) -> int:
        inst = self.state.instances.get(instance_id)
        return 0 if inst is None else self.book.load(inst)

    def set_draining(self, instance_id: InstanceId) -> None:
        inst = self.state.instances.get(instance_id)
        if inst is not None and not inst.draining:
            inst.draining = True
            self.scheduler.reindex(inst)
