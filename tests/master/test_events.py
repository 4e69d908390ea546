"""`/v1/events` without processes: the diffs it sends, its bounds (clients, per-client queues, slow
readers dropped), and the chart points computed from the master's own metrics."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest

from exo_master.core.events import TaskPlaced
from exo_master.http import events as events_module
from exo_master.http.errors import ApiError
from exo_master.http.events import QUEUE_EVENTS, Client, EventHub, changes, snapshot
from exo_master.http.inference_metrics import InferenceMetrics
from exo_master.http.live_stats import LiveStats
from protocol.cluster_view import ClusterView, InstanceRow, ModelRow, NodeRow, TaskRow
from protocol.ids import InstanceId, NodeId, TaskId
from protocol.messages import Usage


def view(nodes: dict[str, bool], instances: dict[str, str], age: float = 0.5) -> ClusterView:
    return ClusterView(
        policy="least-loaded",
        session="s1",
        nodes=[
            NodeRow(
                node_id=n, address="a", alive=alive, subscribed=True, last_heartbeat_age=age, instances=[]
            )
            for n, alive in nodes.items()
        ],
        instances=[
            InstanceRow(
                instance_id=i,
                node_id=i.split("/")[0],
                model="m",
                kinds=["TextGeneration"],
                status=status,
                in_flight=0,
                pending=0,
                queued=0,
                capacity=1,
                max_concurrency=4,
                completed=0,
                failed=0,
            )
            for i, status in instances.items()
        ],
        models=[ModelRow(model="m", instances=len(instances), ready=0, queued=0)],
        tasks=[
            TaskRow(
                task_id="t1",
                kind="TextGeneration",
                model="m",
                status="running",
                instance_id="n1/0",
                node_id="n1",
                age=age,
                attempts=1,
            ),
            TaskRow(
                task_id="t0",
                kind="TextGeneration",
                model="m",
                status="finished",
                instance_id="n1/0",
                node_id="n1",
                age=age,
                attempts=1,
            ),
        ],
    )


@dataclass
class FakeCore:
    current: ClusterView

    def view(self, now: float, task_limit: int = 500, **_: Any) -> ClusterView:
        return self.current


@dataclass
class FakeRuntime:
    core: FakeCore
    effect_observers: list[Any] = field(default_factory=list)

    def clock(self) -> float:
        return 0.0


def hub_for(first: ClusterView) -> tuple[EventHub, FakeCore]:
    core = FakeCore(first)
    return EventHub(FakeRuntime(core), LiveStats(None)), core  # type: ignore[arg-type]


def drain(client: Client) -> list[tuple[str, Any]]:
    found = []
    while not client.queue.empty():
        item = client.queue.get_nowait()
        assert item is not None
        name, data = item.decode().strip().split("\n")
        found.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return found


def test_a_snapshot_keeps_only_live_requests() -> None:
    state = snapshot(view({"n1": True}, {"n1/0": "ready"}))
    assert [t["task_id"] for t in state["in_flight"]] == ["t1"] and state["in_flight_total"] == 1


def test_changes_name_every_node_and_instance_transition() -> None:
    before = snapshot(view({"n1": True, "n2": True}, {"n1/0": "loading", "n2/0": "ready"}))
    after = snapshot(view({"n1": True, "n2": False, "n3": True}, {"n1/0": "ready", "n2/0": "dead"}))
    assert changes(None, after) == []
    assert sorted(changes(before, after), key=lambda c: (c["kind"], c["id"])) == [
        {"kind": "instance", "id": "n1/0", "from": "loading", "to": "ready"},
        {"kind": "instance", "id": "n2/0", "from": "ready", "to": "dead"},
        {"kind": "node", "id": "n2", "from": "alive", "to": "dead"},
        {"kind": "node", "id": "n3", "from": "", "to": "joined"},
    ]
    gone = snapshot(view({"n1": True}, {}))
    assert {"kind": "instance", "id": "n1/0", "from": "ready", "to": "gone"} in changes(after, gone)
    assert {"kind": "node", "id": "n3", "from": "alive", "to": "gone"} in changes(after, gone)


def test_a_state_goes_out_on_a_change_not_on_a_heartbeat_age_unless_refreshing() -> None:
    hub, core = hub_for(view({"n1": True}, {"n1/0": "ready"}))
    client = Client()
    hub.clients.add(client)
    hub.step(refresh=False)
    assert [name for name, _ in drain(client)] == ["state"]
    core.current = view({"n1": True}, {"n1/0": "ready"}, age=0.9)  # only ages moved
    hub.step(refresh=False)
    assert drain(client) == []
    hub.step(refresh=True)
    assert [name for name, _ in drain(client)] == ["state"]
    core.current = view({"n1": False}, {"n1/0": "dead"}, age=3.0)
    hub.step(refresh=False)
    got = drain(client)
    assert [name for name, _ in got] == ["change", "change", "state"]
    assert got[-1][1]["nodes"][0]["alive"] is False


def test_a_client_that_does_not_read_is_dropped_and_the_others_keep_going() -> None:
    async def scenario() -> None:
        hub, core = hub_for(view({"n1": True}, {}))
        slow, fast = Client(), Client()
        hub.clients |= {slow, fast}
        stream = hub.stream(slow)
        assert (await anext(stream)).startswith(b"event: state")
        for n in range(QUEUE_EVENTS + 5):
            core.current = view({f"n{n}": True}, {})
            hub.step(refresh=False)
            drain(fast)  # the fast one reads everything, every time
        assert slow.dropped and slow not in hub.clients and fast in hub.clients
        assert hub.dropped == 1
        # What it had queued still arrives, then one `dropped` event, then the end.
        rest = [chunk async for chunk in stream]
        assert len(rest) == QUEUE_EVENTS + 1
        assert rest[-1].startswith(b"event: dropped")

    asyncio.run(scenario())


def test_the_number_of_streams_is_bounded_and_closing_ends_them(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        monkeypatch.setattr(events_module, "MAX_CLIENTS", 2)
        hub, _ = hub_for(view({"n1": True}, {}))
        first = await hub.endpoint(None)  # type: ignore[arg-type]
        await hub.endpoint(None)  # type: ignore[arg-type]
        with pytest.raises(ApiError) as refused:
            await hub.endpoint(None)  # type: ignore[arg-type]
        assert refused.value.status == 503
        client = next(iter(hub.clients))
        stream = hub.stream(client)
        await anext(stream)
        hub.close()
        assert [chunk async for chunk in stream] == []  # ended, without a `dropped` event
        assert first.media_type == "text/event-stream"

    asyncio.run(scenario())


def test_chart_points_are_window_averages_of_the_masters_own_metrics() -> None:
    inference = InferenceMetrics()
    stats = LiveStats(inference, keep=3)
    assert stats.sample(100.0) is None  # the first look only opens a window
    for ttft in (0.1, 0.3):
        inference.first_output("m", ttft)
    inference.completed("m", 1.0, 0.5, Usage(prompt_tokens=3, completion_tokens=40))
    placed = dict(task_id=TaskId("t"), instance_id=InstanceId("n/0"), node_id=NodeId("n"), policy="p",
                  attempt=1, load_before=0)  # fmt: skip
    stats.on_effect(TaskPlaced(**placed, waited=0.0))  # type: ignore[arg-type]
    stats.on_effect(TaskPlaced(**placed, waited=0.5))  # type: ignore[arg-type]
    point = stats.sample(102.0)
    assert point is not None
    assert point.ttft_ms == pytest.approx(200.0) and point.requests == 2
    assert point.tokens_per_s == pytest.approx(20.0) and point.queue_wait_ms == pytest.approx(250.0)
    quiet = stats.sample(104.0)
    assert quiet is not None and quiet.ttft_ms is None and quiet.queue_wait_ms is None
    assert quiet.tokens_per_s == 0.0
    for t in (106.0, 108.0):
        stats.sample(t)
    assert [p["t"] for p in stats.history()] == [104.0, 106.0, 108.0]  # bounded
    assert msgspec.json.decode(msgspec.json.encode(stats.history()))[0]["ttft_ms"] is None
