"""A burst of concurrent chat completions against a master, reporting who served each request.

Shared by the end-to-end tests, the burst benchmark and anyone checking a live cluster's balance.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import httpx


class BurstFailed(RuntimeError):
    """Some requests of a burst did not get a 200."""


async def burst_responses(api_url: str, n: int, body: dict[str, Any]) -> list[httpx.Response]:
    """Post the same chat completion n times at once; every response must be a 200."""
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(base_url=api_url, timeout=600, limits=limits) as client:
        responses = await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(n)))
    failed = [r for r in responses if r.status_code != 200]
    if failed:
        raise BurstFailed(
            f"{len(failed)} of {n} requests failed, first: {failed[0].status_code} {failed[0].text}"
        )
    return responses


async def burst(api_url: str, n: int, model: str = "sim-model", max_tokens: int = 40) -> list[str]:
    """Fire n chat completions at once; return the x-exo-instance of each (all must succeed)."""
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": max_tokens}
    return [r.headers["x-exo-instance"] for r in await burst_responses(api_url, n, body)]


def spread(instances: list[str]) -> list[int]:
    """Per-instance counts, largest first."""
    return sorted(Counter(instances).values(), reverse=True)


# python -m tests.support.loadgen API_URL N [MODEL]: prints the instances as JSON
if __name__ == "__main__":
    import json
    import sys

    model = sys.argv[3] if len(sys.argv) > 3 else "sim-model"
    print(json.dumps(asyncio.run(burst(sys.argv[1], int(sys.argv[2]), model))))
