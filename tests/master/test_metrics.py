"""The /metrics collector over an in-process runtime (no bus, no sockets), parsed back."""

from __future__ import annotations

import msgspec
from prometheus_client.parser import text_string_to_metric_families

from exo_master.core import CoreConfig, MasterCore
from exo_master.core.events import NodeSubscribed
from exo_master.http.metrics import MasterMetrics
from exo_master.runtime import MasterRuntime
from protocol.ids import InstanceId, NodeId, TaskId
from protocol.messages import PromptCacheStats, TaskAccepted
from tests.master.cluster import heartbeat, node_of, params, report


def samples(metrics: MasterMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.render().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def runtime_with(nodes: int, max_concurrency: int) -> MasterRuntime:
    now = [0.0]
    core = MasterCore(CoreConfig(queue_limit=10))
    runtime = MasterRuntime(core, bus=None, clock=lambda: now[0])
    for i in range(nodes):
        runtime.core.handle(NodeSubscribed(node_id=node_of(i)), 0.0)
        runtime.core.handle(heartbeat(i, report(i, max_concurrency=max_concurrency)), 0.0)
    return runtime


def test_collector_reads_core_ledger_and_queue_at_scrape_time() -> None:
    runtime = runtime_with(nodes=2, max_concurrency=1)
    metrics = MasterMetrics(runtime)
    for n in range(4):
        runtime.submit(TaskId(f"t{n}"), params())
    placed = {tid: t.instance_id for tid, t in runtime.core.book.live.items() if t.instance_id}
    first = sorted(placed)[0]
    runtime.core.handle(
        TaskAccepted(task_id=first, node_id=NodeId(placed[first].split("/")[0]), instance_id=placed[first]),
        0.1,
    )
    runtime.cancel(TaskId("t3"), "test")

    s = samples(metrics)
    inst = (("instance", placed[first]), ("model", "m"), ("node", placed[first].split("/")[0]))
    assert s[("exo_instance_in_flight", inst)] == 1
    assert sum(v for (name, _), v in s.items() if name == "exo_instance_in_flight") == 1
    assert sum(v for (name, _), v in s.items() if name == "exo_instance_pending") == 1
    assert s[("exo_queue_depth", (("model", "m"),))] == 1  # t2 waits, t3 was cancelled
    assert s[("exo_live_tasks", (("status", "queued"),))] == 1
    assert s[("exo_placements_total", ())] == 2
    assert s[("exo_ledger_reservations_total", ())] == 2
    assert s[("exo_ledger_confirmations_total", ())] == 1
    assert s[("exo_tasks_ended_total", (("status", "cancelled"),))] == 1
    assert s[("exo_tasks_ended_total", (("status", "finished"),))] == 0
    assert s[("exo_rejections_total", (("reason", "queue_full"),))] == 0
    assert s[("exo_node_up", (("node", "node0"),))] == 1
    assert s[("exo_placement_decision_seconds_count", ())] == 4
    assert s[("exo_queue_wait_seconds_count", ())] == 2
    assert s[("exo_bus_malformed_frames_total", ())] == 0


def test_prompt_cache_counters_come_from_the_latest_heartbeat() -> None:
    runtime = runtime_with(nodes=1, max_concurrency=4)
    stats = PromptCacheStats(size_bytes=4096, hits=3, misses=1, reused_tokens=270, prompt_tokens=360)
    runtime.core.handle(heartbeat(0, msgspec.structs.replace(report(0), prompt_cache=stats)), 1.0)
    s = samples(MasterMetrics(runtime))
    inst = (("instance", "node0/0"), ("model", "m"), ("node", "node0"))
    assert s[("exo_instance_prompt_cache_hits_total", inst)] == 3
    assert s[("exo_instance_prompt_cache_misses_total", inst)] == 1
    assert s[("exo_instance_prompt_cache_reused_tokens_total", inst)] == 270
    assert s[("exo_instance_prompt_cache_prompt_tokens_total", inst)] == 360
    assert s[("exo_instance_prompt_cache_bytes", inst)] == 4096


def test_each_runtime_has_its_own_registry() -> None:
    a, b = runtime_with(1, 4), runtime_with(1, 4)
    metrics_a, metrics_b = MasterMetrics(a), MasterMetrics(b)
    a.submit(TaskId("x"), params())
    assert samples(metrics_a)[("exo_placement_decision_seconds_count", ())] == 1
    assert samples(metrics_b)[("exo_placement_decision_seconds_count", ())] == 0
    assert (
        samples(metrics_b)[
            ("exo_instance_pending", (("instance", "node0/0"), ("model", "m"), ("node", "node0")))
        ]
        == 0
    )
    assert InstanceId("node0/0") in a.core.state.instances
