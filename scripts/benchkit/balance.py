"""Benchmarks 1 and 2: how evenly a burst lands, and the makespan on unequal instances.

1. Burst balance: N chat completions fired at once over k equal instances, for every exo policy
   and sglang-router's round_robin, random, power_of_two and cache_aware (k mock backends). The
   score is the most requests any instance got, against the ideal ceil(N / k).
2. Heterogeneous 1:2:4: three instances whose speeds are 1, 2 and 4 (exo workers announce that as
   their capacity; mocks just run at that rate), one request at a time each, N requests placed at
   once. Score: makespan (burst sent -> last response) against the optimal schedule's.

Each burst uses distinct prompts (a router's cache affinity sees distinct requests, as in life).
The "shared prefix" rows first hold one exchange (a request behind a long system prompt, and the
reply it got), then burst follow-ups of that conversation: the instance that answered holds the
prefix of every one, so exo's prefix affinity (on by default) and sglang-router's cache_aware
policy are tempted to pile the burst onto it.
The configurations alternate exo / router (A/B/A/B) within each shape.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from benchkit.load import new_loop
from benchkit.procs import Processes, load_average, start_mocks, start_router
from exo_master.core.placement import POLICY_NAMES
from exo_master.devtools.launcher import ClusterSpec, LocalCluster

ROUTER_POLICIES = ("round_robin", "random", "power_of_two", "cache_aware")
_json = msgspec.json.Encoder()


@dataclass
class BalanceConfig:
    ks: tuple[int, ...] = (2, 4, 8)
    ns: tuple[int, ...] = (8, 16, 64)
    rounds: int = 5
    exo_policies: tuple[str, ...] = POLICY_NAMES
    router_policies: tuple[str, ...] = ROUTER_POLICIES
    tokens_per_s: float = 20.0
    max_tokens: int = 20  # 1 s per request: a whole burst is in flight at once
    hetero_n: int = 28
    hetero_rounds: int = 3
    hetero_base_tokens_per_s: float = 200.0
    hetero_max_tokens: int = 20
    hetero_exo_policies: tuple[str, ...] = ("least-loaded", "round-robin")
    hetero_router_policies: tuple[str, ...] = ("round_robin", "power_of_two", "cache_aware")
    # Bursts whose requests share a long prefix (see the module docstring).
    shared_prefix_exo_policies: tuple[str, ...] = ("least-loaded", "power-of-two")
    shared_prefix_router_policies: tuple[str, ...] = ("cache_aware",)
    with_router: bool = True
    heartbeat_interval: float = 1.0  # shorter only to make a smoke run start faster


SHARED_OPENING = (
    {"role": "system", "content": "You are the cluster's helpful assistant. " * 8},
    {"role": "user", "content": "Here is our shared context: a long document everyone asks about."},
)


async def _burst(
    url: str, n: int, max_tokens: int, salt: str, shared: bool = False
) -> list[tuple[str, float]]:
    """Fire n requests at once; (who served it, seconds until its response) for each."""
    connector = aiohttp.TCPConnector(limit=n + 4)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as s:
        history: list[dict[str, str]] = []
        if shared:  # the exchange the burst follows up on: its reply is held where it was made
            opening = [*SHARED_OPENING]
            _, reply = await _post(s, url, opening, max_tokens)
            history = [*opening, {"role": "assistant", "content": reply}]
        started = time.perf_counter()

        async def one(i: int) -> tuple[str, float]:
            ask = {"role": "user", "content": f"{salt} request {i}: say something"}
            who, _ = await _post(s, url, [*history, ask], max_tokens)
            return who, time.perf_counter() - started

        return await asyncio.gather(*(one(i) for i in range(n)))


async def _post(
    s: aiohttp.ClientSession, url: str, messages: list[dict[str, str]], max_tokens: int
) -> tuple[str, str]:
    """One chat completion: who served it, and its text."""
    body = {"model": "sim-model", "max_tokens": max_tokens, "messages": messages}
    async with s.post(url, data=_json.encode(body), headers={"content-type": "application/json"}) as r:
        payload = await r.json()
        if r.status != 200:
            raise RuntimeError(f"burst request failed: {r.status} {payload}")
        who = r.headers.get("x-exo-instance") or payload.get("system_fingerprint") or "?"
        return who, str(payload["choices"][0]["message"]["content"])


def burst(url: str, n: int, max_tokens: int, salt: str, shared: bool = False) -> list[tuple[str, float]]:
    loop = new_loop()
    try:
        return loop.run_until_complete(_burst(url, n, max_tokens, salt, shared))
    finally:
        loop.close()


def _counts(served: list[tuple[str, float]], k: int) -> list[int]:
    counts = sorted(Counter(who for who, _ in served).values(), reverse=True)
    return counts + [0] * (k - len(counts))


def _exo_cluster(
    cfg: BalanceConfig, log_dir: Path, policy: str, workers: int, per_worker: int, **spec: Any
) -> LocalCluster:
    cluster = LocalCluster(
        ClusterSpec(
            workers=workers,
            instances_per_worker=per_worker,
            policy=policy,
            log_dir=log_dir,
            heartbeat_interval=cfg.heartbeat_interval,
            master_args=["--log-level", "warning"],
            worker_args=["--log-level", "warning"],
            **spec,
        )
    )
    return cluster


def run_balance(cfg: BalanceConfig, log_dir: Path, router: bool) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for k in cfg.ks:
        configs: list[tuple[str, str, bool]] = []
        for shared in (False, True):
            exo = list(cfg.shared_prefix_exo_policies if shared else cfg.exo_policies)
            peer = list(cfg.shared_prefix_router_policies if shared else cfg.router_policies)
            peer = peer if router else []
            while exo or peer:  # A/B/A/B
                if exo:
                    configs.append(("exo", exo.pop(0), shared))
                if peer:
                    configs.append(("router", peer.pop(0), shared))
        with Processes(log_dir / f"mocks-k{k}") as procs:
            mocks = start_mocks(procs, k, cfg.tokens_per_s) if router else []
            for system, policy, shared in configs:
                results: dict[int, list[list[int]]] = {n: [] for n in cfg.ns}
                if system == "exo":
                    # Two worker processes carrying k/2 instances each (placement sees k instances).
                    workers = 2 if k % 2 == 0 else 1
                    cluster = _exo_cluster(
                        cfg,
                        log_dir / f"exo-{policy}-k{k}{'-shared' if shared else ''}",
                        policy,
                        workers,
                        k // workers,
                        max_concurrency=max(cfg.ns),
                        sim_tokens_per_s=cfg.tokens_per_s,
                    )
                    with cluster:
                        cluster.start()
                        url = f"{cluster.api_url}/v1/chat/completions"
                        for n in cfg.ns:
                            for r in range(cfg.rounds):
                                results[n].append(_counts(burst(url, n, cfg.max_tokens, f"r{r}", shared), k))
                else:
                    with Processes(log_dir / f"router-{policy}-k{k}{'-shared' if shared else ''}") as rprocs:
                        url = f"{start_router(rprocs, mocks, policy).url}/v1/chat/completions"
                        for n in cfg.ns:
                            for r in range(cfg.rounds):
                                results[n].append(_counts(burst(url, n, cfg.max_tokens, f"r{r}", shared), k))
                for n in cfg.ns:
                    maxes = [c[0] for c in results[n]]
                    rows.append(
                        {
                            "system": system,
                            "policy": f"{policy}, shared prefix" if shared else policy,
                            "k": k,
                            "n": n,
                            "ideal": math.ceil(n / k),
                            "max_per_instance": maxes,
                            "worst": max(maxes),
                            "mean_max": round(sum(maxes) / len(maxes), 2),
                            "counts": results[n],
                        }
                    )
    return {"config": vars(cfg).copy(), "rows": rows, "load_average": load_average()}


def optimal_makespan(n: int, durations: list[float]) -> float:
    """Identical jobs on machines of these per-job durations, one at a time each: greedy is optimal."""
    counts = [0] * len(durations)
    for _ in range(n):
        best = min(range(len(durations)), key=lambda i: (counts[i] + 1) * durations[i])
        counts[best] += 1
    return max(c * d for c, d in zip(counts, durations, strict=True))


def run_hetero(cfg: BalanceConfig, log_dir: Path, router: bool) -> dict[str, Any]:
    caps = [1.0, 2.0, 4.0]
    rates = [cfg.hetero_base_tokens_per_s * c for c in caps]
    durations = [cfg.hetero_max_tokens / r for r in rates]
    optimal = optimal_makespan(cfg.hetero_n, durations)
    out: dict[str, Any] = {"capacities": caps, "n": cfg.hetero_n, "optimal_s": round(optimal, 4)}
    exo_policies = list(cfg.hetero_exo_policies)
    with Processes(log_dir / "hetero") as procs:
        clusters: dict[str, LocalCluster] = {}
        targets: dict[str, str] = {}
        for policy in exo_policies:
            cluster = _exo_cluster(cfg, log_dir / f"hetero-exo-{policy}", policy, 0, 1, max_concurrency=1)
            cluster.start_master()
            cluster.wait_healthy(timeout=30)
            for i, (cap, rate) in enumerate(zip(caps, rates, strict=True)):
                cluster.spec.sim_tokens_per_s = rate
                cluster.spec.worker_args = ["--capacity", str(cap), "--log-level", "warning"]
                cluster.start_worker(f"node{i + 1}")
            cluster.wait_ready(len(caps), timeout=60)
            clusters[policy] = cluster
            targets[f"exo:{policy}"] = f"{cluster.api_url}/v1/chat/completions"
        try:
            if router:
                mocks = start_mocks(procs, len(caps), rates, max_concurrency=1)
                for policy in cfg.hetero_router_policies:
                    targets[f"router:{policy}"] = (
                        f"{start_router(procs, mocks, policy).url}/v1/chat/completions"
                    )
            results: dict[str, list[float]] = {name: [] for name in targets}
            for r in range(cfg.hetero_rounds):
                for name, url in targets.items():  # A/B/A/B
                    served = burst(url, cfg.hetero_n, cfg.hetero_max_tokens, f"h{r}")
                    results[name].append(max(t for _, t in served))
        finally:
            for c in clusters.values():
                c.stop()
    out["rows"] = [
        {
            "target": name,
            "makespans_s": [round(x, 4) for x in spans],
            "median_s": round(sorted(spans)[len(spans) // 2], 4),
            "vs_optimal": round(sorted(spans)[len(spans) // 2] / optimal, 3),
        }
        for name, spans in results.items()
    ]
    out["load_average"] = load_average()
    return out
