"""A closed-loop HTTP load generator (aiohttp, keep-alive): C clients, each one request at a time.

Every client keeps its one connection alive, as the openai SDK does; latencies are per request,
from send to the last body byte. Bounded in count and in time; a non-200 is counted, not retried.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec

_json = msgspec.json.Encoder()


def chat_body(max_tokens: int = 1, model: str = "sim-model", prompt: str = "hi") -> bytes:
    return _json.encode(
        {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
    )


@dataclass
class LoadResult:
    concurrency: int
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    elapsed: float = 0.0
    first_error: str = ""

    @property
    def ok(self) -> int:
        return len(self.latencies)

    @property
    def throughput(self) -> float:
        return self.ok / self.elapsed if self.elapsed > 0 else 0.0

    def percentile(self, q: float) -> float:
        return percentile(self.latencies, q)

    def summary(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "requests": self.ok,
            "errors": self.errors,
            "elapsed_s": round(self.elapsed, 4),
            "throughput_rps": round(self.throughput, 1),
            "p50_ms": round(self.percentile(50) * 1e3, 4),
            "p99_ms": round(self.percentile(99) * 1e3, 4),
        }


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


async def run_load(
    url: str,
    body: bytes,
    concurrency: int,
    requests: int,
    max_seconds: float = 60.0,
    warmup: int = 0,
) -> LoadResult:
    """`requests` POSTs to `url` from `concurrency` keep-alive clients (after `warmup` untimed ones)."""
    result = LoadResult(concurrency=concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=max(30.0, max_seconds))
    headers = {"content-type": "application/json"}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        remaining = [warmup]

        async def client(record: bool) -> None:
            while remaining[0] > 0 and time.perf_counter() < deadline:
                remaining[0] -= 1
                started = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=headers) as response:
                        await response.read()
                        status = response.status
                except (TimeoutError, aiohttp.ClientError) as exc:
                    status, result.first_error = -1, result.first_error or repr(exc)
                if not record:
                    continue
                if status == 200:
                    result.latencies.append(time.perf_counter() - started)
                else:
                    result.errors += 1
                    result.first_error = result.first_error or f"HTTP {status}"

        deadline = time.perf_counter() + max_seconds
        if warmup:
            await asyncio.gather(*(client(False) for _ in range(concurrency)))
        remaining[0] = requests
        deadline = time.perf_counter() + max_seconds
        started = time.perf_counter()
        await asyncio.gather(*(client(True) for _ in range(concurrency)))
        result.elapsed = time.perf_counter() - started
    return result


def new_loop() -> asyncio.AbstractEventLoop:
    """uvloop where installed (the client should not be the bottleneck), else asyncio's own."""
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


def load(url: str, body: bytes, concurrency: int, requests: int, **kw: Any) -> LoadResult:
    loop = new_loop()
    try:
        return loop.run_until_complete(run_load(url, body, concurrency, requests, **kw))
    finally:
        loop.close()
