"""The replica lifecycle table: every (state, event) pair is either a listed transition or fails
loudly, `gone` is the end, and every state is reachable from `placing`."""

from __future__ import annotations

import itertools

import pytest

from exo_master.core.instances.lifecycle import (
    TRANSITIONS,
    IllegalTransition,
    ReplicaEvent,
    ReplicaState,
    advance,
)

S, E = ReplicaState, ReplicaEvent


@pytest.mark.parametrize(("state", "event"), list(itertools.product(S, E)))
def test_each_pair_is_a_listed_transition_or_illegal(state: ReplicaState, event: ReplicaEvent) -> None:
    if (state, event) in TRANSITIONS:
        assert advance(state, event) is TRANSITIONS[(state, event)]
    else:
        with pytest.raises(IllegalTransition):
            advance(state, event)


def test_gone_is_final() -> None:
    assert not [key for key in TRANSITIONS if key[0] is S.GONE]


def test_every_state_is_reachable_from_placing() -> None:
    seen, frontier = {S.PLACING}, [S.PLACING]
    while frontier:
        state = frontier.pop()
        for (origin, _), target in TRANSITIONS.items():
            if origin is state and target not in seen:
                seen.add(target)
                frontier.append(target)
    assert seen == set(S)


@pytest.mark.parametrize(
    ("path", "end"),
    [
        ([E.REPORTED_LOADING, E.REPORTED_READY, E.DRAIN, E.DRAINED, E.UNLOADED], S.GONE),
        ([E.REPORTED_LOADING, E.REPORTED_FAILED, E.UNLOADED], S.GONE),
        ([E.TIMED_OUT], S.FAILED),
        ([E.REPORTED_READY, E.LOST, E.LOST], S.GONE),
        ([E.DRAIN, E.UNLOADED], S.GONE),  # deleted before it loaded: nothing to drain
        ([E.REPORTED_READY, E.DRAIN, E.LOST], S.GONE),
    ],
)
def test_lifecycles(path: list[ReplicaEvent], end: ReplicaState) -> None:
    state = S.PLACING
    for event in path:
        state = advance(state, event)
    assert state is end


def test_only_placing_loading_and_ready_count_as_replicas() -> None:
    assert {s for s in S if s.live} == {S.PLACING, S.LOADING, S.READY}


def test_a_ready_replica_never_goes_back_to_loading_or_placing() -> None:
    assert all(
        target not in (S.PLACING, S.LOADING)
        for (origin, _), target in TRANSITIONS.items()
        if origin is S.READY
    )
