"""Benchmarks 3, 4 and 6: added latency, throughput and CPU per request, and master RSS over time.

exo-master (2 sim workers) and sglang-router (2 mock backends with the same per-token delay) run
side by side; every measurement alternates between them (A/B/A/B) so that load from other tenants
of this machine hits both alike. "Added latency" is a percentile through the master (or router)
minus the same percentile straight to a mock backend, with the same client and keep-alive.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchkit.load import LoadResult, chat_body, load, percentile
from benchkit.procs import (
    Processes,
    cpu_seconds,
    load_average,
    router_installed,
    rss_bytes,
    start_mocks,
    start_router,
)
from exo_master.devtools.launcher import ClusterSpec, LocalCluster


@dataclass
class SpeedConfig:
    tokens_per_s: float = 1000.0  # 1 ms per token, on both sides
    latency_requests: int = 400  # per target, per round, per concurrency
    throughput_requests: int = 3000  # per target, per round, per concurrency
    rounds: int = 3
    concurrencies_latency: tuple[int, ...] = (1, 32)
    concurrencies_throughput: tuple[int, ...] = (8, 32, 128)
    memory_requests: int = 20_000
    memory_samples: int = 20
    with_router: bool = True
    heartbeat_interval: float = 1.0  # shorter only to make a smoke run start faster


@contextlib.contextmanager
def targets(cfg: SpeedConfig, log_dir: Path) -> Iterator[dict[str, Any]]:
    """Start exo (master + 2 sim workers), 2 mocks and, if installed, sglang-router on those."""
    spec = ClusterSpec(
        workers=2,
        max_concurrency=256,
        sim_tokens_per_s=cfg.tokens_per_s,
        log_dir=log_dir / "exo",
        heartbeat_interval=cfg.heartbeat_interval,
        master_args=["--log-level", "warning", "--queue-limit", "4096"],
        worker_args=["--log-level", "warning"],
    )
    with LocalCluster(spec) as cluster, Processes(log_dir / "peer") as procs:
        cluster.start()
        mocks = start_mocks(procs, 2, cfg.tokens_per_s)
        found: dict[str, Any] = {
            "direct": (f"{mocks[0]}/v1/chat/completions", None),
            "exo": (f"{cluster.api_url}/v1/chat/completions", cluster.master),
        }
        if cfg.with_router and router_installed():
            router = start_router(procs, mocks, "round_robin")
            found["router"] = (f"{router.url}/v1/chat/completions", router.proc)
        yield found


def _merge(parts: list[LoadResult]) -> dict[str, Any]:
    lat = [x for p in parts for x in p.latencies]
    elapsed = sum(p.elapsed for p in parts)
    return {
        "requests": len(lat),
        "errors": sum(p.errors for p in parts),
        "first_error": next((p.first_error for p in parts if p.first_error), ""),
        "throughput_rps": round(len(lat) / elapsed, 1) if elapsed else 0.0,
        "p50_ms": round(percentile(lat, 50) * 1e3, 4),
        "p99_ms": round(percentile(lat, 99) * 1e3, 4),
        "per_round_rps": [round(p.throughput, 1) for p in parts],
    }


def run_speed(cfg: SpeedConfig, log_dir: Path) -> dict[str, Any]:
    body = chat_body(max_tokens=1)
    out: dict[str, Any] = {"config": vars(cfg).copy(), "load_average_before": load_average()}
    with targets(cfg, log_dir) as found:
        names = list(found)
        out["targets"] = names
        # 3. added latency: direct / exo / router interleaved, each round in that order.
        latency: dict[str, Any] = {}
        for c in cfg.concurrencies_latency:
            parts: dict[str, list[LoadResult]] = {n: [] for n in names}
            for _ in range(cfg.rounds):
                for name in names:
                    url, _ = found[name]
                    parts[name].append(load(url, body, c, cfg.latency_requests, warmup=min(50, 2 * c)))
            merged = {n: _merge(p) for n, p in parts.items()}
            for n in names:
                if n != "direct":
                    merged[n]["added_p50_ms"] = round(merged[n]["p50_ms"] - merged["direct"]["p50_ms"], 4)
                    merged[n]["added_p99_ms"] = round(merged[n]["p99_ms"] - merged["direct"]["p99_ms"], 4)
            latency[str(c)] = merged
        out["latency"] = latency
        # 4. throughput and CPU per request of the scheduling process only (not its backends).
        throughput: dict[str, Any] = {}
        peers = [n for n in names if n != "direct"]
        for c in cfg.concurrencies_throughput:
            parts = {n: [] for n in peers}
            cpu = {n: 0.0 for n in peers}
            for _ in range(cfg.rounds):
                for name in peers:
                    url, proc = found[name]
                    load(url, body, c, min(200, cfg.throughput_requests), max_seconds=30)  # warm
                    before = cpu_seconds(proc.pid)
                    parts[name].append(load(url, body, c, cfg.throughput_requests, max_seconds=60))
                    cpu[name] += cpu_seconds(proc.pid) - before
            merged = {n: _merge(p) for n, p in parts.items()}
            for n in peers:
                done = merged[n]["requests"] + merged[n]["errors"]
                merged[n]["cpu_ms_per_request"] = round(cpu[n] * 1e3 / done, 4) if done else None
            throughput[str(c)] = merged
        out["throughput"] = throughput
        # 6. master RSS over many requests (concurrency 32), sampled as it goes.
        _, master = found["exo"]
        url, _ = found["exo"]
        step = max(1, cfg.memory_requests // cfg.memory_samples)
        samples = [{"requests": 0, "rss_mb": round(rss_bytes(master.pid) / 2**20, 2)}]
        served = 0
        while served < cfg.memory_requests:
            part = load(url, body, 32, step, max_seconds=120)
            served += part.ok + part.errors
            samples.append({"requests": served, "rss_mb": round(rss_bytes(master.pid) / 2**20, 2)})
        gc.collect()
        out["memory"] = {"concurrency": 32, "samples": samples}
    out["load_average_after"] = load_average()
    return out
