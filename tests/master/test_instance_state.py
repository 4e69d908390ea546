"""The instance-state tables (`instance_state`): every (phase, link) has an availability, only a
ready instance on a subscribed node is eligible, retirement is final, and the core's candidate
pools follow the table for every combination a cluster can reach."""

from __future__ import annotations

import itertools

import pytest

from exo_master.core import CoreConfig, MasterCore
from exo_master.core.events import NodeSubscribed, NodeUnsubscribed
from exo_master.core.instance_state import (
    AVAILABILITY,
    PHASE_MOVES,
    REPORTED,
    Availability,
    IllegalInstanceMove,
    Link,
    Phase,
    PhaseTrigger,
    move,
    phase_of,
    stops_taking_work,
)
from protocol.messages import InstanceStatus, TaskKind
from tests.master.cluster import MODEL, heartbeat, instance_of, node_of, report


def test_every_phase_and_link_has_an_availability() -> None:
    assert set(AVAILABILITY) == set(itertools.product(Phase, Link))


def test_only_a_ready_instance_on_a_subscribed_node_is_eligible() -> None:
    eligible = [key for key, a in AVAILABILITY.items() if a is Availability.ELIGIBLE]
    assert eligible == [(Phase.READY, Link.SUBSCRIBED)]
    # Nobody waits for an instance whose node is silent, or that failed or is leaving.
    for (phase, link), a in AVAILABILITY.items():
        gone = link is Link.SILENT or phase in (Phase.FAILED, Phase.DRAINING, Phase.RETIRED)
        assert (a is Availability.UNAVAILABLE) == gone, (phase, link)


def test_every_reported_status_has_a_phase_and_a_trigger() -> None:
    for status in InstanceStatus:
        assert phase_of(status).value == status.value
        assert PHASE_MOVES[(Phase.LOADING, REPORTED[status])] is phase_of(status)


def test_retirement_is_final_and_every_other_phase_can_retire() -> None:
    for phase in Phase:
        assert ((phase, PhaseTrigger.RETIRE) in PHASE_MOVES) == (phase is not Phase.RETIRED)
    for trigger in PhaseTrigger:
        assert (Phase.RETIRED, trigger) not in PHASE_MOVES


def test_draining_holds_whatever_the_worker_reports_until_retired() -> None:
    for trigger in REPORTED.values():
        assert PHASE_MOVES[(Phase.DRAINING, trigger)] is Phase.DRAINING
    for phase in (Phase.LOADING, Phase.READY, Phase.FAILED):
        assert PHASE_MOVES[(phase, PhaseTrigger.DRAIN)] is Phase.DRAINING
    assert PHASE_MOVES[(Phase.DRAINING, PhaseTrigger.RETIRE)] is Phase.RETIRED


def test_a_draining_instance_leaves_the_pools_and_a_ready_report_does_not_bring_it_back() -> None:
    core = _core(InstanceStatus.READY, subscribed=True)
    inst = core.state.instances[instance_of(0)]
    assert core.eligible(inst)
    move(inst, PhaseTrigger.DRAIN)
    core.candidates.reindex(inst)
    assert not core.eligible(inst)
    core.handle(heartbeat(0, report(0, status=InstanceStatus.READY)), 1.0)
    assert inst.phase is Phase.DRAINING
    pool = core.pool(MODEL, TaskKind.TEXT_GENERATION)
    assert pool is None or inst.instance_id not in pool.members


def test_an_unlisted_move_raises_and_leaves_the_phase() -> None:
    core = _core(InstanceStatus.READY, subscribed=True)
    inst = core.state.instances[instance_of(0)]
    assert move(inst, PhaseTrigger.RETIRE) is Phase.RETIRED
    with pytest.raises(IllegalInstanceMove):
        move(inst, PhaseTrigger.REPORTED_READY)
    assert inst.phase is Phase.RETIRED


def test_only_leaving_ready_gives_back_unconfirmed_assignments() -> None:
    for was, now in itertools.product(Phase, Phase):
        assert stops_taking_work(was, now) == (was is Phase.READY and now is not Phase.READY)


def _core(status: InstanceStatus, *, subscribed: bool, silent: bool = False) -> MasterCore:
    core = MasterCore(CoreConfig())
    if subscribed:
        core.handle(NodeSubscribed(node_id=node_of(0)), 0.0)
    core.handle(heartbeat(0, report(0, status=status)), 0.0)
    if silent:
        core.tick(10.0)  # well past 3 missed heartbeats
    return core


@pytest.mark.parametrize("status", list(InstanceStatus))
@pytest.mark.parametrize("link", list(Link))
def test_the_core_follows_the_table(status: InstanceStatus, link: Link) -> None:
    core = _core(status, subscribed=link is Link.SUBSCRIBED, silent=link is Link.SILENT)
    inst = core.state.instances[instance_of(0)]
    expected = AVAILABILITY[(phase_of(status), link)]
    assert core.eligible(inst) == (expected is Availability.ELIGIBLE)
    pool = core.pool(MODEL, TaskKind.TEXT_GENERATION)
    assert (pool is not None and instance_of(0) in pool.members) == (expected is Availability.ELIGIBLE)
    key = (MODEL, TaskKind.TEXT_GENERATION)
    assert core.has_live_candidate(key) == (expected is not Availability.UNAVAILABLE)
    core.check_invariants()


def test_a_subscription_lost_and_found_moves_the_instance_out_of_and_back_into_its_pool() -> None:
    core = _core(InstanceStatus.READY, subscribed=True)
    inst = core.state.instances[instance_of(0)]
    core.handle(NodeUnsubscribed(node_id=node_of(0)), 1.0)
    assert not core.eligible(inst) and core.has_live_candidate((MODEL, TaskKind.TEXT_GENERATION))
    core.handle(NodeSubscribed(node_id=node_of(0)), 1.0)
    assert core.eligible(inst)
    core.check_invariants()
