"""Placement by work (`least-work`): when a request would get its first token decides, within one
short request of the best estimate; among the close ones the least-loaded rule keeps bursts even."""

from __future__ import annotations

import math
from collections import Counter

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from exo_master.core import MasterCore
from exo_master.core.events import CancelRequest, SubmitTask
from exo_master.core.work import SHORT_REQUEST_TOKENS
from protocol.ids import InstanceId, TaskId
from protocol.messages import ChatMessage, InstanceWork, TextGenerationParams
from tests.master.cluster import MODEL, accept, cluster, heartbeat, instance_of, placement_of, report


def chat(chars: int) -> TextGenerationParams:
    return TextGenerationParams(model=MODEL, messages=(ChatMessage(role="user", content="x" * chars),))


def place(core: MasterCore, task_id: str, chars: int, now: float = 0.0) -> InstanceId:
    placed = placement_of(core.handle(SubmitTask(task_id=TaskId(task_id), params=chat(chars)), now))
    assert placed is not None
    return placed.instance_id


def tell_work(
    core: MasterCore, i: int, work: InstanceWork, *, active: tuple[str, ...] = (), now: float = 0.0
) -> None:
    ids = tuple(TaskId(t) for t in active)
    core.handle(heartbeat(i, msgspec.structs.replace(report(i, active=ids), work=work)), now)


@settings(max_examples=40, derandomize=True)
@given(
    n=st.integers(1, 256),
    k=st.integers(1, 12),
    chars=st.integers(1, 5000),
    reported=st.one_of(st.none(), st.tuples(st.integers(0, 5000), st.floats(1.0, 1000.0))),
)
def test_equal_requests_on_equal_instances_keep_the_burst_within_ceil_n_over_k(
    n: int, k: int, chars: int, reported: tuple[int, float] | None
) -> None:
    core = cluster(k, policy="least-work")
    if reported is not None:  # every instance reports the same work and speed
        tokens, rate = reported
        for i in range(k):
            tell_work(core, i, InstanceWork(prefill_tokens=tokens, prefill_rate=rate, chars_per_token=3.5))
    counts: Counter[InstanceId] = Counter()
    for j in range(n):
        counts[place(core, f"t{j}", chars)] += 1
        assert max(counts.values()) == math.ceil((j + 1) / k)
    core.check_invariants()


works = st.builds(
    InstanceWork,
    prefill_tokens=st.integers(0, 50_000),
    decoding=st.integers(0, 8),
    prefill_rate=st.one_of(st.just(0.0), st.floats(2.0, 5000.0)),
    chars_per_token=st.one_of(st.just(0.0), st.floats(1.5, 8.0)),
)


@settings(max_examples=80, derandomize=True)
@given(
    instances=st.lists(st.tuples(works, st.sampled_from([0.5, 1.0, 2.0])), min_size=1, max_size=6),
    requests=st.lists(st.integers(1, 40_000), min_size=1, max_size=30),
)
def test_never_places_where_the_wait_exceeds_the_best_by_more_than_one_short_request(
    instances: list[tuple[InstanceWork, float]], requests: list[int]
) -> None:
    core = cluster(len(instances), policy="least-work", capacities=[c for _, c in instances])
    for i, (work, _) in enumerate(instances):
        tell_work(core, i, work)
    scheduler = core.candidates
    for j, chars in enumerate(requests):
        free = [core.state.instances[instance_of(i)] for i in range(len(instances))]
        waits = {inst.instance_id: scheduler.first_token_wait(inst, chars) for inst in free}
        best = min(free, key=lambda inst: waits[inst.instance_id])
        chosen = place(core, f"r{j}", chars)
        assert waits[chosen] <= waits[best.instance_id] + scheduler.short_wait(best) + 1e-9
    core.check_invariants()


def test_a_short_request_avoids_the_instance_prefilling_a_long_prompt() -> None:
    # Instance 0 prefills one long prompt; instance 1 decodes two short chats. By task count
    # instance 0 is the lighter one; by work, instance 1 answers a short chat far sooner.
    core = cluster(2, policy="least-work")
    placed = [
        placement_of(core.handle(SubmitTask(task_id=TaskId(t), params=chat(chars)), 0.0))
        for t, chars in (("long", 16_000), ("s0", 40), ("s1", 40))
    ]
    assert [p.instance_id for p in placed if p] == [instance_of(0), instance_of(1), instance_of(1)]
    for p in placed:
        assert p is not None
        accept(core, p)
    tell_work(core, 0, InstanceWork(prefill_tokens=4000, prefill_rate=10.0), active=("long",))
    tell_work(core, 1, InstanceWork(decoding=2, prefill_rate=10.0), active=("s0", "s1"))
    inst0, inst1 = (core.state.instances[instance_of(i)] for i in range(2))
    assert core.load(inst0) < core.load(inst1)  # least-loaded would pick instance 0
    assert place(core, "hi", 10) == instance_of(1)
    core.check_invariants()


def test_tasks_placed_since_the_last_report_count_by_their_estimated_prompt() -> None:
    core = cluster(2, policy="least-work")
    assert place(core, "long", 40_000) == instance_of(0)
    # No report yet lists "long": the master estimates its 10,000 tokens (4 chars per token) itself.
    ahead = core.candidates.work_ahead(core.state.instances[instance_of(0)])
    assert ahead == 10_000
    assert [place(core, f"s{i}", 20) for i in range(3)] == [instance_of(1)] * 3
    assert SHORT_REQUEST_TOKENS * 4 < 40_000  # the gap is far more than one short request
    core.check_invariants()


def test_cancelled_work_the_engine_still_holds_keeps_its_slot_and_its_wait() -> None:
    core = cluster(2, policy="least-work", max_concurrency=1)
    long = placement_of(core.handle(SubmitTask(task_id=TaskId("long"), params=chat(40_000)), 0.0))
    assert long is not None
    accept(core, long)
    tell_work(core, 0, InstanceWork(prefill_tokens=9000, prefill_rate=10.0), active=("long",))
    core.handle(CancelRequest(task_id=TaskId("long")), 1.0)
    inst0 = core.state.instances[instance_of(0)]
    assert core.load(inst0) == 1 and inst0.unowned == {TaskId("long")}
    assert place(core, "next", 10, now=1.1) == instance_of(1)  # not onto the busy engine
    tell_work(core, 0, InstanceWork(prefill_rate=10.0), now=1.5)  # the engine let go
    assert core.load(inst0) == 0
    core.check_invariants()
