"""Instance state: the phases an instance goes through at the master, and what its phase and its
node's link make it good for, in tables (the machines' counterpart of `lifecycle.TRANSITIONS`).

Two facts decide what an instance may do:
- its phase (`Phase`): what its worker last reported (loading, ready, failed), or RETIRED once the
  master is removing it (no longer reported, its id changed hands, its node forgotten). Every change
  goes through `move`, along `PHASE_MOVES`; RETIRED is final.
- its node's link (`Link`): SUBSCRIBED when heartbeats arrive and the master's XPUB has seen the
  node's subscription (an AssignTask reaches it), UNSUBSCRIBED when heartbeats arrive but no live
  subscription is known, SILENT when the node missed `heartbeat_liveness` heartbeats (or is unknown).
  The node record keeps the two facts apart (`alive`, `subscribed`): a subscription seen while the
  node is silent still counts once it is heard again.

`AVAILABILITY` maps every (phase, link) to what follows:
- ELIGIBLE: may receive an AssignTask now; only these instances are in the candidate pools;
- AWAITED: not now, but soon (loading, or its subscription is not live yet): requests wait for it
  in the queue rather than fail;
- UNAVAILABLE: failed, retired, or its node is silent: no request waits for it.
And an instance whose phase stops taking work (`TAKES_WORK`) gives back the assignments it has not
confirmed, so they go elsewhere; what it confirmed stays until its heartbeat says otherwise.

DRAINING is the first master-placed phase (`exo_master.core.instances` drains a replica it unloads).
Extending it (master-placed instances: placing, unloading, gone...): add the phases, their
rows in `PHASE_MOVES` and `AVAILABILITY` (the test checks every pair is listed), and the trigger
that moves them; eligibility and the pools follow without another change.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from protocol.messages import InstanceStatus

if TYPE_CHECKING:
    from exo_master.core.records import InstanceRecord, NodeRecord


class Phase(enum.StrEnum):
    LOADING = "loading"  # its worker is loading the model
    READY = "ready"  # loaded: takes work
    FAILED = "failed"  # its worker could not load it (or it broke): no work, kept for display
    # The master's instance controller is unloading it: no new work, what it runs finishes (its
    # worker still reports it ready until it is unloaded, so a report does not bring it back).
    DRAINING = "draining"
    RETIRED = "retired"  # the master is removing it: never eligible again, gone by the event's end


class PhaseTrigger(enum.StrEnum):
    REPORTED_LOADING = "reported-loading"  # a heartbeat lists it as loading
    REPORTED_READY = "reported-ready"
    REPORTED_FAILED = "reported-failed"
    RETIRE = "retire"  # no longer reported, changed hands, or its node was forgotten
    DRAIN = "drain"  # the instance controller unloads it (a deleted placement, a stray replica)


class Link(enum.StrEnum):
    SUBSCRIBED = "subscribed"  # heard from, and its subscription is live: messages reach it
    UNSUBSCRIBED = "unsubscribed"  # heard from, but an AssignTask would not reach it (yet)
    SILENT = "silent"  # declared dead (or unknown): comes back with its next heartbeat


class Availability(enum.StrEnum):
    ELIGIBLE = "eligible"  # may receive an AssignTask now
    AWAITED = "awaited"  # may take work soon: requests for it wait in the queue
    UNAVAILABLE = "unavailable"  # no request waits for it


REPORTED: dict[InstanceStatus, PhaseTrigger] = {
    InstanceStatus.LOADING: PhaseTrigger.REPORTED_LOADING,
    InstanceStatus.READY: PhaseTrigger.REPORTED_READY,
    InstanceStatus.FAILED: PhaseTrigger.REPORTED_FAILED,
}

_LIVE_PHASES = (Phase.LOADING, Phase.READY, Phase.FAILED)
# A heartbeat states the worker's view, so any reported status is taken as is (a ready instance
# may be reloading, a failed one retried); only retirement is final.
PHASE_MOVES: dict[tuple[Phase, PhaseTrigger], Phase] = {
    **{(p, PhaseTrigger.REPORTED_LOADING): Phase.LOADING for p in _LIVE_PHASES},
    **{(p, PhaseTrigger.REPORTED_READY): Phase.READY for p in _LIVE_PHASES},
    **{(p, PhaseTrigger.REPORTED_FAILED): Phase.FAILED for p in _LIVE_PHASES},
    **{(p, PhaseTrigger.RETIRE): Phase.RETIRED for p in (*_LIVE_PHASES, Phase.DRAINING)},
    **{(p, PhaseTrigger.DRAIN): Phase.DRAINING for p in (*_LIVE_PHASES, Phase.DRAINING)},
    # Draining is final until the instance is gone: whatever its worker reports meanwhile.
    **{(Phase.DRAINING, t): Phase.DRAINING for t in REPORTED.values()},
}

E, A, U = Availability.ELIGIBLE, Availability.AWAITED, Availability.UNAVAILABLE
AVAILABILITY: dict[tuple[Phase, Link], Availability] = {
    (Phase.READY, Link.SUBSCRIBED): E,
    (Phase.READY, Link.UNSUBSCRIBED): A,  # its subscription shows up within a heartbeat or two
    (Phase.LOADING, Link.SUBSCRIBED): A,
    (Phase.LOADING, Link.UNSUBSCRIBED): A,
    **{(p, Link.SILENT): U for p in Phase},
    **{(Phase.FAILED, link): U for link in (Link.SUBSCRIBED, Link.UNSUBSCRIBED)},
    **{(Phase.RETIRED, link): U for link in (Link.SUBSCRIBED, Link.UNSUBSCRIBED)},
    **{(Phase.DRAINING, link): U for link in (Link.SUBSCRIBED, Link.UNSUBSCRIBED)},
}

TAKES_WORK = frozenset({Phase.READY})


class IllegalInstanceMove(AssertionError):
    """The core tried a phase change the table does not allow: a bug, never an input error."""


def phase_of(status: InstanceStatus) -> Phase:
    """The phase of an instance first seen in a heartbeat with `status`."""
    return Phase(status.value)


def move(inst: InstanceRecord, trigger: PhaseTrigger) -> Phase:
    """Move `inst` along `PHASE_MOVES` and return its new phase; an unlisted move raises."""
    new = PHASE_MOVES.get((inst.phase, trigger))
    if new is None:
        raise IllegalInstanceMove(f"instance {inst.instance_id}: no move from {inst.phase} on {trigger}")
    inst.phase = new
    return new


def link(node: NodeRecord | None) -> Link:
    if node is None or not node.alive:
        return Link.SILENT
    return Link.SUBSCRIBED if node.subscribed else Link.UNSUBSCRIBED


def availability(inst: InstanceRecord, node: NodeRecord | None) -> Availability:
    return AVAILABILITY[(inst.phase, link(node))]


def stops_taking_work(was: Phase, now: Phase) -> bool:
    """The change gives back the instance's unconfirmed assignments (they are placed elsewhere)."""
    return was in TAKES_WORK and now not in TAKES_WORK
