"""Benchmark: mixed prompt lengths. Many short chats and a few long prompts, over k sim instances
that model prefill (prompt words / a prefill rate, in chunks on one compute lane per instance, as
mlx-lm's batch steps do). The score is the short requests' time to first token (p50, p99) under
placement by work (least-work), by task count (least-loaded) and round-robin.

The schedule is open-loop and fixed (arrival times do not depend on answers), so every policy
sees the same requests at the same moments. TTFT is measured by the client: request sent -> first
streamed content (the master sends its status line with the first token).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from benchkit.load import new_loop, percentile
from benchkit.procs import load_average
from exo_master.devtools.launcher import ClusterSpec, LocalCluster

_json = msgspec.json.Encoder()


@dataclass
class MixedConfig:
    instances: int = 3
    duration_s: float = 30.0
    short_every_s: float = 0.2  # 5 short chats per second
    long_every_s: float = 4.0  # one long prompt every 4 s
    short_words: int = 20
    long_words: int = 1500
    short_max_tokens: int = 8
    long_max_tokens: int = 4
    tokens_per_s: float = 50.0  # decode, per sequence
    # A long prompt is 6 s of prefill, one chunk 1 s: slow enough that the machine's own noise
    # (2 shared cores running the master, the workers and the client) does not decide the result.
    prefill_tokens_per_s: float = 250.0
    prefill_chunk: int = 250
    policies: tuple[str, ...] = ("least-work", "least-loaded", "round-robin")
    heartbeat_interval: float = 0.5


def _body(words: int, max_tokens: int, salt: int) -> bytes:
    content = " ".join(f"w{salt}x{i}" for i in range(words))  # distinct prompts: no cache effects
    messages = [{"role": "user", "content": content}]
    return _json.encode(
        {"model": "sim-model", "messages": messages, "max_tokens": max_tokens, "stream": True}
    )


def schedule(cfg: MixedConfig) -> list[tuple[float, str, bytes]]:
    """(send at, kind, body) for the whole run, sorted by time."""
    plan: list[tuple[float, str, bytes]] = []
    n_short = int(cfg.duration_s / cfg.short_every_s)
    n_long = int(cfg.duration_s / cfg.long_every_s)
    plan += [
        (i * cfg.short_every_s, "short", _body(cfg.short_words, cfg.short_max_tokens, i))
        for i in range(n_short)
    ]
    plan += [
        (0.05 + i * cfg.long_every_s, "long", _body(cfg.long_words, cfg.long_max_tokens, 10_000 + i))
        for i in range(n_long)
    ]
    return sorted(plan, key=lambda item: item[0])


async def _one(session: aiohttp.ClientSession, url: str, body: bytes) -> float | None:
    sent = time.perf_counter()
    async with session.post(url, data=body, headers={"content-type": "application/json"}) as response:
        if response.status != 200:
            await response.read()
            return None
        first: float | None = None
        async for line in response.content:
            if first is None and line.startswith(b"data: {") and b'"content"' in line:
                first = time.perf_counter() - sent
        return first


async def _run_plan(url: str, plan: list[tuple[float, str, bytes]]) -> dict[str, list[float | None]]:
    out: dict[str, list[float | None]] = {"short": [], "long": []}
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()

        async def fire(at: float, kind: str, body: bytes) -> None:
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))  # wait-ok: the schedule
            out[kind].append(await _one(session, url, body))

        await asyncio.gather(*(fire(*item) for item in plan))
    return out


def _summary(ttfts: list[float | None]) -> dict[str, Any]:
    ok = [t for t in ttfts if t is not None]
    return {
        "requests": len(ttfts),
        "errors": len(ttfts) - len(ok),
        "p50_ms": round(percentile(ok, 50) * 1e3, 1),
        "p99_ms": round(percentile(ok, 99) * 1e3, 1),
        "max_ms": round(max(ok) * 1e3, 1) if ok else None,
    }


def run_mixed(cfg: MixedConfig, log_dir: Path) -> dict[str, Any]:
    plan = schedule(cfg)
    rows: list[dict[str, Any]] = []
    for policy in cfg.policies:
        spec = ClusterSpec(
            workers=cfg.instances,
            policy=policy,
            sim_tokens_per_s=cfg.tokens_per_s,
            heartbeat_interval=cfg.heartbeat_interval,
            log_dir=log_dir / policy,
            worker_args=[
                "--sim-prefill-tokens-per-s", str(cfg.prefill_tokens_per_s),
                "--prefill-chunk", str(cfg.prefill_chunk),
            ],
        )  # fmt: skip
        with LocalCluster(spec) as cluster:
            cluster.start()
            loop = new_loop()
            try:
                found = loop.run_until_complete(_run_plan(f"{cluster.api_url}/v1/chat/completions", plan))
            finally:
                loop.close()
        rows.append({"policy": policy, "short": _summary(found["short"]), "long": _summary(found["long"])})
    by_policy = {r["policy"]: r for r in rows}
    ratio = None
    if "least-work" in by_policy and "least-loaded" in by_policy:
        base = by_policy["least-loaded"]["short"]["p99_ms"]
        ratio = round(by_policy["least-work"]["short"]["p99_ms"] / base, 3) if base else None
    result = {"config": cfg.__dict__ | {"policies": list(cfg.policies)}, "rows": rows, "p99_ratio": ratio}
    result["load_after"] = load_average()
    result["markdown"] = markdown(result)
    return result


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        f"{cfg['instances']} sim instances (prefill {cfg['prefill_tokens_per_s']:g} tokens/s in chunks of "
        f"{cfg['prefill_chunk']}, decode {cfg['tokens_per_s']:g} tokens/s), {cfg['duration_s']:g} s of "
        f"arrivals: a {cfg['short_words']}-token chat every {cfg['short_every_s']:g} s "
        f"({cfg['short_max_tokens']} tokens out) and a {cfg['long_words']}-token prompt every "
        f"{cfg['long_every_s']:g} s. Time to first token, measured by the client.",
        "",
        "| policy | short p50 ms | short p99 ms | short max ms | long p50 ms | errors |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        s, g = r["short"], r["long"]
        lines.append(
            f"| {r['policy']} | {s['p50_ms']} | {s['p99_ms']} | {s['max_ms']} | {g['p50_ms']} | "
            f"{s['errors'] + g['errors']} |"
        )
    if result.get("p99_ratio") is not None:
        verdict = "met" if result["p99_ratio"] <= 0.5 else "missed"
        lines += [
            "",
            f"Short-request p99, least-work / least-loaded: **{result['p99_ratio']}x** "
            f"(target <= 0.5x: {verdict}).",
        ]
    return "\n".join(lines)
