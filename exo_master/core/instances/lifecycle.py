"""The replica lifecycle, in one table (like the task lifecycle in core/lifecycle.py).

A replica is one instance of a placement on one node. Every status change goes through `advance`,
and a transition not in the table is a bug that fails loudly.

    placing    LoadInstance sent; the node has not reported the instance yet
    loading    the node reports it loading (with progress)
    ready      loaded: eligible for requests (the core's own eligibility rule still applies)
    draining   being removed: no new requests, the ones in flight finish (up to a grace period)
    unloading  UnloadInstance sent; waiting for the node to stop reporting it
    gone       unloaded or vanished while being removed: the record is dropped
    failed     could not load, or was lost (node dead, instance vanished): the placement heals
"""

from __future__ import annotations

import enum


class ReplicaState(enum.StrEnum):
    PLACING = "placing"
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    UNLOADING = "unloading"
    GONE = "gone"
    FAILED = "failed"

    @property
    def live(self) -> bool:
        """Counts toward the placement's replicas (it serves, or will once loaded)."""
        return self in _LIVE


_LIVE = frozenset({ReplicaState.PLACING, ReplicaState.LOADING, ReplicaState.READY})


class ReplicaEvent(enum.StrEnum):
    REPORTED_LOADING = "reported_loading"  # the node's heartbeat shows it loading
    REPORTED_READY = "reported_ready"
    REPORTED_FAILED = "reported_failed"  # the load failed on the node
    TIMED_OUT = "timed_out"  # no report (or no progress) within the load timeout
    LOST = "lost"  # its node died, or its node stopped reporting it
    DRAIN = "drain"  # deleted, or one replica too many
    DRAINED = "drained"  # nothing in flight any more, or the grace period is over
    UNLOADED = "unloaded"  # the node no longer reports it after UnloadInstance


class IllegalTransition(AssertionError):
    pass


S, E = ReplicaState, ReplicaEvent

TRANSITIONS: dict[tuple[ReplicaState, ReplicaEvent], ReplicaState] = {
    (S.PLACING, E.REPORTED_LOADING): S.LOADING,
    (S.PLACING, E.REPORTED_READY): S.READY,
    (S.PLACING, E.REPORTED_FAILED): S.FAILED,
    (S.PLACING, E.TIMED_OUT): S.FAILED,
    (S.PLACING, E.LOST): S.FAILED,
    (S.PLACING, E.DRAIN): S.UNLOADING,  # nothing runs on it yet: no drain needed
    (S.LOADING, E.REPORTED_LOADING): S.LOADING,
    (S.LOADING, E.REPORTED_READY): S.READY,
    (S.LOADING, E.REPORTED_FAILED): S.FAILED,
    (S.LOADING, E.TIMED_OUT): S.FAILED,
    (S.LOADING, E.LOST): S.FAILED,
    (S.LOADING, E.DRAIN): S.UNLOADING,
    (S.READY, E.REPORTED_READY): S.READY,
    (S.READY, E.REPORTED_FAILED): S.FAILED,
    (S.READY, E.LOST): S.FAILED,
    (S.READY, E.DRAIN): S.DRAINING,
    (S.DRAINING, E.REPORTED_READY): S.DRAINING,
    (S.DRAINING, E.REPORTED_FAILED): S.UNLOADING,
    (S.DRAINING, E.DRAINED): S.UNLOADING,
    (S.DRAINING, E.LOST): S.GONE,
    (S.UNLOADING, E.REPORTED_LOADING): S.UNLOADING,
    (S.UNLOADING, E.REPORTED_READY): S.UNLOADING,
    (S.UNLOADING, E.REPORTED_FAILED): S.UNLOADING,
    (S.UNLOADING, E.UNLOADED): S.GONE,
    (S.UNLOADING, E.LOST): S.GONE,
    # A failed replica the node still reports is unloaded (its memory freed) and then forgotten.
    (S.FAILED, E.REPORTED_LOADING): S.FAILED,
    (S.FAILED, E.REPORTED_READY): S.FAILED,
    (S.FAILED, E.REPORTED_FAILED): S.FAILED,
    (S.FAILED, E.UNLOADED): S.GONE,
    (S.FAILED, E.LOST): S.GONE,
    (S.FAILED, E.DRAIN): S.FAILED,
}


def advance(state: ReplicaState, event: ReplicaEvent) -> ReplicaState:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(f"replica cannot go from {state} on {event}") from None


def allowed(state: ReplicaState, event: ReplicaEvent) -> bool:
    return (state, event) in TRANSITIONS
