"""The instance controller's window on the scheduling core (the `CoreSide` it is given).

Draining is the one thing it changes there: a draining instance is ineligible for new tasks while
its node still runs the ones it has (the DRAINING phase of `core.instance_state`, whose availability
rows make it UNAVAILABLE; the candidate pools follow through `Candidates.reindex`).
"""

from __future__ import annotations

from exo_master.core.candidates import Candidates
from exo_master.core.instance_state import Phase, PhaseTrigger, move
from exo_master.core.records import ClusterState
from protocol.ids import InstanceId, ModelId, NodeId


class SchedulerSide:
    def __init__(self, state: ClusterState, candidates: Candidates) -> None:
        self.state = state
        self.candidates = candidates
        # Instances broken under their tasks (a sharded instance that lost a rank), with why: the
        # core takes no new task there at once and, at the end of the step, loses the ones it has
        # (re-placed without output, else a 503 naming `why`), before the worker even says so.
        self.broken_instances: dict[InstanceId, str] = {}

    def node_alive(self, node_id: NodeId) -> bool | None:
        node = self.state.nodes.get(node_id)
        return None if node is None else node.alive

    def in_flight(self, instance_id: InstanceId) -> int:
        inst = self.state.instances.get(instance_id)
        return 0 if inst is None else self.candidates.load(inst)

    def set_draining(self, instance_id: InstanceId) -> None:
        inst = self.state.instances.get(instance_id)
        if inst is not None and inst.phase not in (Phase.DRAINING, Phase.RETIRED):
            move(inst, PhaseTrigger.DRAIN)
            self.candidates.reindex(inst)

    def broken(self, instance_id: InstanceId, why: str) -> None:
        self.set_draining(instance_id)
        if instance_id in self.state.instances:
            self.broken_instances[instance_id] = why

    def set_coming(self, models: frozenset[ModelId]) -> None:
        gone = self.state.coming_models - models
        self.state.coming_models = models
        self.candidates.touched.update(gone)  # requests that waited for them may be stranded now
