"""Burst balance end to end, per policy: real master + sim workers on loopback.

For each policy and shape (N requests over k instances) it sends one concurrent burst of chat
completions and prints how many each instance served. With `--accept-delay` the workers confirm
late (as the original exo master's event loop did), which is when `state-only` piles up.

    python scripts/bench_burst.py                    # markdown table
    python scripts/bench_burst.py --accept-delay 0.5 --json
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import typer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/support, from a checkout

from exo_master.core.placement import POLICY_NAMES
from exo_master.devtools.launcher import ClusterSpec, LocalCluster
from tests.support.loadgen import burst, spread

SHAPES = ((16, 2), (64, 4))


def run_one(policy: str, n: int, k: int, accept_delay: float, log_dir: Path) -> list[int]:
    spec = ClusterSpec(
        workers=k,
        policy=policy,
        sim_tokens_per_s=20,
        max_concurrency=n,
        log_dir=log_dir / f"{policy}-{n}x{k}",
        worker_args=["--sim-accept-delay", str(accept_delay)],
    )
    with LocalCluster(spec) as cluster:
        cluster.start()
        return spread(asyncio.run(burst(cluster.api_url, n, max_tokens=40)))


def main(
    policies: str = typer.Option(",".join(POLICY_NAMES), help="Comma-separated policies."),
    accept_delay: float = typer.Option(0.0, help="Seconds each worker waits before confirming."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    log_dir = Path(tempfile.mkdtemp(prefix="exo-bench-burst-"))
    rows: list[dict[str, Any]] = []
    for policy in policies.split(","):
        for n, k in SHAPES:
            counts = run_one(policy, n, k, accept_delay, log_dir)
            counts += [0] * (k - len(counts))
            rows.append({"policy": policy, "n": n, "k": k, "counts": counts, "ideal": math.ceil(n / k)})
    if as_json:
        print(json.dumps({"accept_delay": accept_delay, "rows": rows}))
        return
    print(f"burst balance, sim workers, confirmation delay {accept_delay} s\n")
    print("| policy | burst | per instance | max (ideal) |\n| --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['policy']} | {r['n']} over {r['k']} | {r['counts']} | {max(r['counts'])} ({r['ideal']}) |"
        )


if __name__ == "__main__":
    typer.run(main)
