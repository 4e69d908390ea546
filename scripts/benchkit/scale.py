"""Benchmark 5: the master under heartbeat load from 100, 500 and 1,000 simulated workers.

The fake workers (fakeworkers.py, 250 per process) heartbeat every second with one ready instance
each and answer assignments at once. Per size: the master's CPU share while only heartbeats flow,
then the mean placement decision time (exo_placement_decision_seconds from /metrics, sum/count
over the window) while 1-token requests run at concurrency 8. The "idle" reference is 2 workers.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from benchkit.load import chat_body, load
from benchkit.procs import Processes, cpu_seconds, load_average
from exo_master.devtools.launcher import ClusterSpec, LocalCluster

PER_PROCESS = 250


@dataclass
class ScaleConfig:
    sizes: tuple[int, ...] = (2, 100, 500, 1000)
    cpu_window_s: float = 5.0
    requests: int = 2000
    concurrency: int = 8
    heartbeat_interval: float = 1.0  # shorter only to make a smoke run start faster


def decision_totals(api_url: str) -> tuple[float, float]:
    """(sum of seconds, count) of the master's placement decision histogram."""
    text = httpx.get(f"{api_url}/metrics", timeout=10).text
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("exo_placement_decision_seconds_sum"):
            total = float(line.split()[-1])
        elif line.startswith("exo_placement_decision_seconds_count"):
            count = float(line.split()[-1])
    return total, count


def run_scale(cfg: ScaleConfig, log_dir: Path) -> dict[str, Any]:
    rows = []
    for size in cfg.sizes:
        spec = ClusterSpec(
            workers=0,
            log_dir=log_dir / f"scale-{size}",
            heartbeat_interval=cfg.heartbeat_interval,
            master_args=["--log-level", "warning", "--forget-dead-after", "60"],
            curve=False,  # the fake workers speak plaintext (scripts/bench_curve.py measures CURVE)
        )
        with LocalCluster(spec) as cluster, Processes(log_dir / f"scale-{size}-fakes") as procs:
            cluster.start_master()
            cluster.wait_healthy(timeout=30)
            assert cluster.master is not None
            for first in range(0, size, PER_PROCESS):
                count = min(PER_PROCESS, size - first)
                procs.spawn(
                    f"fakes-{first}",
                    [
                        sys.executable,
                        "-m",
                        "benchkit.fakeworkers",
                        "--master",
                        f"127.0.0.1:{cluster.bus_port}",
                        "--first",
                        str(first),
                        "--count",
                        str(count),
                        "--seconds",
                        "600",
                        "--interval",
                        str(cfg.heartbeat_interval),
                    ],
                )
            cluster.wait_ready(size, timeout=120)
            pid = cluster.master.pid
            before, t0 = cpu_seconds(pid), time.perf_counter()
            time.sleep(cfg.cpu_window_s)  # the window over which heartbeats alone are measured
            share = (cpu_seconds(pid) - before) / (time.perf_counter() - t0)
            s0, c0 = decision_totals(cluster.api_url)
            url = f"{cluster.api_url}/v1/chat/completions"
            result = load(url, chat_body(), cfg.concurrency, cfg.requests, max_seconds=120, warmup=50)
            s1, c1 = decision_totals(cluster.api_url)
            decisions = c1 - c0
            rows.append(
                {
                    "workers": size,
                    "master_cpu_share": round(share, 4),
                    "decisions": int(decisions),
                    "decision_mean_us": round((s1 - s0) / decisions * 1e6, 2) if decisions else math.nan,
                    "requests_ok": result.ok,
                    "errors": result.errors,
                    "throughput_rps": round(result.throughput, 1),
                }
            )
    idle = rows[0]["decision_mean_us"] if rows else math.nan
    for row in rows:
        row["decision_vs_idle"] = round(row["decision_mean_us"] / idle, 3) if idle else math.nan
    return {"config": vars(cfg).copy(), "rows": rows, "load_average": load_average()}
