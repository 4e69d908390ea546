"""The pending-assignment ledger on its own: reserve, confirm, release, expire, drop_instance."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exo_master.core.ledger import PendingLedger, Reservation
from protocol.ids import InstanceId, TaskId

A, B = InstanceId("a"), InstanceId("b")


def t(i: int) -> TaskId:
    return TaskId(f"t{i}")


def test_reserve_counts_the_task_on_its_instance_at_once() -> None:
    ledger = PendingLedger(ttl=5.0)
    entry = ledger.reserve(t(1), A, now=10.0)
    assert entry == Reservation(t(1), A, reserved_at=10.0, expires_at=15.0)
    assert ledger.pending(A) == 1 and ledger.pending(B) == 0
    assert t(1) in ledger and len(ledger) == 1
    assert ledger.get(t(1)) == entry
    assert ledger.tasks_on(A) == [t(1)]


def test_reserving_a_task_twice_is_a_programming_error() -> None:
    ledger = PendingLedger()
    ledger.reserve(t(1), A, now=0.0)
    with pytest.raises(AssertionError, match="already reserved"):
        ledger.reserve(t(1), B, now=0.0)
    assert ledger.pending(A) == 1 and ledger.pending(B) == 0


def test_ttl_must_be_positive() -> None:
    with pytest.raises(AssertionError):
        PendingLedger(ttl=0.0)


def test_confirm_is_idempotent() -> None:
    ledger = PendingLedger()
    entry = ledger.reserve(t(1), A, now=0.0)
    assert ledger.confirm(t(1)) == entry
    assert ledger.confirm(t(1)) is None
    assert ledger.pending(A) == 0 and len(ledger) == 0
    assert ledger.stats.confirmed == 1


def test_release_is_idempotent() -> None:
    ledger = PendingLedger()
    entry = ledger.reserve(t(1), A, now=0.0)
    assert ledger.release(t(1)) == entry
    assert ledger.release(t(1)) is None
    assert ledger.confirm(t(1)) is None
    assert ledger.pending(A) == 0
    assert (ledger.stats.released, ledger.stats.confirmed) == (1, 0)


def test_confirming_or_releasing_an_unknown_task_changes_nothing() -> None:
    ledger = PendingLedger()
    ledger.reserve(t(1), A, now=0.0)
    assert ledger.confirm(t(9)) is None and ledger.release(t(9)) is None
    assert ledger.pending(A) == 1 and len(ledger) == 1


def test_a_released_task_can_be_reserved_again_elsewhere() -> None:
    ledger = PendingLedger()
    ledger.reserve(t(1), A, now=0.0)
    ledger.release(t(1))
    ledger.reserve(t(1), B, now=1.0)
    assert (ledger.pending(A), ledger.pending(B)) == (0, 1)


def test_expire_returns_entries_due_at_or_before_now_oldest_first() -> None:
    ledger = PendingLedger(ttl=5.0)
    for i, at in enumerate([0.0, 1.0, 1.0, 2.0, 3.0]):
        ledger.reserve(t(i), A if i % 2 else B, now=at)
    assert ledger.expire(4.99) == []
    assert [e.task_id for e in ledger.expire(5.0)] == [t(0)]  # expires_at == now counts as due
    assert [e.task_id for e in ledger.expire(6.5)] == [t(1), t(2)]
    assert [e.task_id for e in ledger.expire(100.0)] == [t(3), t(4)]
    assert len(ledger) == 0 and ledger.pending(A) == ledger.pending(B) == 0
    assert ledger.stats.expired == 5


def test_drop_instance_releases_only_that_instances_entries() -> None:
    ledger = PendingLedger()
    ledger.reserve(t(1), A, now=0.0)
    ledger.reserve(t(2), B, now=0.0)
    ledger.reserve(t(3), A, now=0.0)
    dropped = ledger.drop_instance(A)
    assert sorted(e.task_id for e in dropped) == [t(1), t(3)]
    assert all(e.instance_id == A for e in dropped)
    assert (ledger.pending(A), ledger.pending(B), len(ledger)) == (0, 1, 1)
    assert ledger.drop_instance(A) == []
    assert ledger.expire(1e9) == [Reservation(t(2), B, reserved_at=0.0, expires_at=5.0)]


# ---- against a model ----------------------------------------------------------------------------

INSTANCES = [InstanceId(f"i{n}") for n in range(3)]
op = st.one_of(
    st.tuples(st.just("reserve"), st.integers(0, 11), st.sampled_from(INSTANCES)),
    st.tuples(st.just("confirm"), st.integers(0, 11), st.none()),
    st.tuples(st.just("release"), st.integers(0, 11), st.none()),
    st.tuples(st.just("expire"), st.none(), st.none()),
    st.tuples(st.just("drop"), st.none(), st.sampled_from(INSTANCES)),
    st.tuples(st.just("wait"), st.none(), st.none()),
)


@settings(max_examples=300, derandomize=True)
@given(ops=st.lists(op, max_size=60), step=st.sampled_from([0.5, 1.0, 2.5]))
def test_ledger_matches_a_brute_force_model(
    ops: list[tuple[str, int | None, InstanceId | None]], step: float
) -> None:
    ttl = 3.0
    ledger = PendingLedger(ttl=ttl)
    model: dict[TaskId, tuple[InstanceId, float]] = {}  # task -> (instance, expires_at)
    now = 0.0
    for name, n, inst in ops:
        if name == "reserve":
            assert n is not None and inst is not None
            if t(n) in model:
                continue  # double reservation is a caller bug, tested above
            ledger.reserve(t(n), inst, now)
            model[t(n)] = (inst, now + ttl)
        elif name in ("confirm", "release"):
            assert n is not None
            entry = getattr(ledger, name)(t(n))
            expected = model.pop(t(n), None)
            assert (entry is None) == (expected is None)
            if entry is not None and expected is not None:
                assert (entry.instance_id, entry.expires_at) == expected
        elif name == "expire":
            expired = ledger.expire(now)
            due = [task for task, (_, at) in model.items() if at <= now]  # dicts keep insertion order
            assert [e.task_id for e in expired] == due
            assert all(e.expires_at <= now for e in expired)
            for task in due:
                del model[task]
        elif name == "drop":
            assert inst is not None
            dropped = ledger.drop_instance(inst)
            gone = sorted(task for task, (i, _) in model.items() if i == inst)
            assert sorted(e.task_id for e in dropped) == gone
            for task in gone:
                del model[task]
        else:
            now += step
        assert len(ledger) == len(model)
        for i in INSTANCES:
            count = sum(1 for (where, _) in model.values() if where == i)
            assert ledger.pending(i) == count >= 0
            assert ledger.tasks_on(i) == sorted(task for task, (where, _) in model.items() if where == i)
        for task in model:
            assert task in ledger
    stats = ledger.stats
    assert stats.reserved == stats.confirmed + stats.released + stats.expired + len(ledger)
