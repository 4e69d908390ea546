"""A from-scratch recount of everything the core keeps incrementally; tests call it after every
step. Any difference is a bug in the core, so each check is an assertion."""

from __future__ import annotations

from typing import TYPE_CHECKING

from exo_master.core.pool import score
from protocol.cluster_view import TaskStatus
from protocol.ids import InstanceId, TaskId

if TYPE_CHECKING:
    from exo_master.core.master import MasterCore


def check_invariants(core: MasterCore) -> None:
    book, state = core.book, core.state
    running: dict[InstanceId, set[TaskId]] = {}
    pending: dict[InstanceId, set[TaskId]] = {}
    queued: set[TaskId] = set()
    assert not book.displaced, "displaced tasks left after an event was settled"
    for task in book.live.values():
        assert not task.status.is_final, f"final task {task.task_id} is still live"
        if task.status is TaskStatus.RUNNING:
            assert task.instance_id is not None
            running.setdefault(task.instance_id, set()).add(task.task_id)
        elif task.status is TaskStatus.PENDING:
            assert task.instance_id is not None
            pending.setdefault(task.instance_id, set()).add(task.task_id)
            assert task.task_id in book.resend
        else:
            assert task.instance_id is None
            queued.add(task.task_id)
    queues = book.queues
    assert queued == {t for k in queues.queue_keys() for t in queues.tasks(k)}, "queue drift"
    for key in queues.queue_keys():
        ages = [book.live[t].admission for t in queues.tasks(key)]
        assert ages == sorted(ages), f"queue {key} is out of age order"
    assert len(book.ledger) == sum(len(s) for s in pending.values()), "ledger drift"
    assert set(book.resend) == {t for s in pending.values() for t in s}, "resend drift"
    for iid, inst in state.instances.items():
        assert inst.confirmed == running.get(iid, set()), f"confirmed drift on {iid}"
        assert book.ledger.pending(iid) == len(pending.get(iid, ())), f"pending drift on {iid}"
        assert set(book.ledger.tasks_on(iid)) == pending.get(iid, set())
    unknown = (set(running) | set(pending)) - set(state.instances)
    assert not unknown, f"tasks bound to unknown instances {unknown}"
    for task_id in book.recent:
        assert task_id not in book.live
    check_pools(core)


def check_pools(core: MasterCore) -> None:
    """Each candidate pool holds exactly the eligible instances of its (model, kind), and offers each
    member with a free slot at its current score (and no member that is full)."""
    for (model, kind), pool in core.candidates.pools.items():
        eligible = {
            iid
            for iid, inst in core.state.by_model.get(model, {}).items()
            if kind in inst.kinds and core.candidates.eligible(inst)
        }
        assert set(pool.members) == eligible, f"pool {model}/{kind} drift"
        offered = pool.offered()
        for iid, inst in pool.members.items():
            load = core.load(inst)
            if load < inst.max_concurrency:
                assert offered.get(iid) == score(load, inst.capacity), f"stale score for {iid} in {kind}"
            else:
                assert iid not in offered, f"full instance {iid} is still offered for {kind}"
