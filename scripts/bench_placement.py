"""Placement decision cost: how long MasterCore.handle(SubmitTask) takes with many tasks in flight.

For each policy and instance count k, a core is filled with `--in-flight` confirmed tasks spread by
the policy itself, then `--decisions` requests are timed one by one (time.perf_counter_ns around
handle). Between decisions, and outside the timed region, the new task is confirmed and the oldest
one finished, so the in-flight count stays steady. Prints a markdown table of p50/p99 in
microseconds (or JSON with --json).

    python scripts/bench_placement.py                  # all policies, k = 10, 100, 1000
    python scripts/bench_placement.py --policy least-loaded --k 1000 --json
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections import deque

import msgspec

from exo_master.core import CoreConfig, MasterCore
from exo_master.core.events import NodeSubscribed, SubmitTask, TaskPlaced
from exo_master.core.placement import POLICY_NAMES
from protocol.ids import InstanceId, ModelId, NodeId, TaskId
from protocol.messages import (
    ChatMessage,
    FinishReason,
    InstanceReport,
    TaskAccepted,
    TaskFinished,
    TaskKind,
    TextGenerationParams,
    WorkerHeartbeat,
)

MODEL = ModelId("bench-model")
PARAMS = TextGenerationParams(model=MODEL, messages=(ChatMessage(role="user", content="hi"),))
ALL_KINDS = tuple(TaskKind)


class Result(msgspec.Struct, frozen=True):
    policy: str
    instances: int
    in_flight: int
    decisions: int
    p50_us: float
    p99_us: float
    mean_us: float


def build(policy: str, k: int, seed: int) -> MasterCore:
    core = MasterCore(CoreConfig(policy=policy, seed=seed))
    for i in range(k):
        node = NodeId(f"node{i}")
        report = InstanceReport(
            instance_id=InstanceId(f"node{i}/0"), model=MODEL, kinds=ALL_KINDS, max_concurrency=1 << 30
        )
        core.handle(NodeSubscribed(node_id=node), 0.0)
        core.handle(WorkerHeartbeat(node_id=node, instances=(report,)), 0.0)
    return core


def place(core: MasterCore, task_id: str) -> tuple[TaskPlaced, int]:
    """Submit one request; return its placement and the nanoseconds the decision took."""
    event = SubmitTask(task_id=TaskId(task_id), params=PARAMS)
    start = time.perf_counter_ns()
    effects = core.handle(event, 0.0)
    elapsed = time.perf_counter_ns() - start
    placed = effects[0]
    assert isinstance(placed, TaskPlaced), effects
    core.handle(
        TaskAccepted(node_id=placed.node_id, task_id=placed.task_id, instance_id=placed.instance_id), 0.0
    )
    return placed, elapsed


def finish(core: MasterCore, placed: TaskPlaced) -> None:
    done = TaskFinished(
        node_id=placed.node_id,
        task_id=placed.task_id,
        instance_id=placed.instance_id,
        finish_reason=FinishReason.STOP,
    )
    core.handle(done, 0.0)


def bench(policy: str, k: int, in_flight: int, decisions: int, seed: int = 0) -> Result:
    core = build(policy, k, seed)
    flight: deque[TaskPlaced] = deque(place(core, f"warm{n}")[0] for n in range(in_flight))
    samples: list[int] = []
    gc.collect()
    for n in range(decisions):
        placed, elapsed = place(core, f"t{n}")
        samples.append(elapsed)
        flight.append(placed)
        finish(core, flight.popleft())
    core.check_invariants()
    samples.sort()
    return Result(
        policy=policy,
        instances=k,
        in_flight=in_flight,
        decisions=decisions,
        p50_us=samples[len(samples) // 2] / 1000,
        p99_us=samples[min(len(samples) - 1, len(samples) * 99 // 100)] / 1000,
        mean_us=sum(samples) / len(samples) / 1000,
    )


def markdown(results: list[Result]) -> str:
    lines = [
        "| policy | instances | in flight | p50 (us) | p99 (us) | mean (us) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        row = (r.policy, r.instances, r.in_flight, f"{r.p50_us:.1f}", f"{r.p99_us:.1f}", f"{r.mean_us:.1f}")
        lines.append("| " + " | ".join(map(str, row)) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--policy", action="append", choices=POLICY_NAMES, help="repeatable; default: all")
    parser.add_argument(
        "--k", action="append", type=int, help="instance count, repeatable; default: 10 100 1000"
    )
    parser.add_argument("--in-flight", type=int, default=10_000)
    parser.add_argument("--decisions", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    args = parser.parse_args(argv)
    results = [
        bench(policy, k, args.in_flight, args.decisions, args.seed)
        for policy in args.policy or POLICY_NAMES
        for k in args.k or [10, 100, 1000]
    ]
    print(json.dumps(msgspec.to_builtins(results), indent=2) if args.json else markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
