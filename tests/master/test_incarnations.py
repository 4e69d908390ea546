"""The incarnation guard: restarts are admitted, a second live process with one node id refused."""

from __future__ import annotations

from exo_master.bus.incarnations import IncarnationGuard, Verdict


def test_the_first_process_of_a_node_is_admitted_and_stays_admitted() -> None:
    guard = IncarnationGuard(grace=2.0)
    assert [guard.observe("n", "a", t) for t in (0.0, 1.0, 2.0)] == [Verdict.ADMIT] * 3


def test_a_restart_is_admitted_once_the_old_process_stays_silent() -> None:
    guard = IncarnationGuard(grace=2.0)
    guard.observe("n", "old", 0.0)
    assert guard.observe("n", "new", 0.5) is Verdict.HOLD  # the old one may still be alive
    assert guard.observe("n", "new", 1.5) is Verdict.HOLD
    assert guard.observe("n", "new", 2.5) is Verdict.ADMIT  # silent for 2.5 s: it was a restart
    assert guard.observe("n", "new", 3.0) is Verdict.ADMIT


def test_a_restart_after_a_long_silence_is_admitted_at_once() -> None:
    guard = IncarnationGuard(grace=2.0)
    guard.observe("n", "old", 0.0)
    assert guard.observe("n", "new", 10.0) is Verdict.ADMIT


def test_a_second_live_process_is_refused_for_good() -> None:
    guard = IncarnationGuard(grace=2.0)
    guard.observe("n", "first", 0.0)
    assert guard.observe("n", "second", 0.3) is Verdict.HOLD
    assert guard.observe("n", "first", 1.0) is Verdict.ADMIT  # the first is alive: conflict
    assert guard.observe("n", "second", 1.2) is Verdict.REFUSE
    assert guard.observe("n", "second", 60.0) is Verdict.REFUSE
    assert guard.observe("n", "first", 60.0) is Verdict.ADMIT


def test_nodes_are_independent() -> None:
    guard = IncarnationGuard(grace=2.0)
    guard.observe("a", "x", 0.0)
    assert guard.observe("b", "y", 0.1) is Verdict.ADMIT
