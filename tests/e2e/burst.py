"""Send a burst of concurrent chat completions and report which instance served each."""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter

import httpx


async def burst(api_url: str, n: int, model: str = "sim-model", max_tokens: int = 40) -> list[str]:
    """Fire n chat completions at once; return the x-exo-instance of each (all must succeed)."""
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(base_url=api_url, timeout=60, limits=limits) as client:
        body = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": max_tokens}
        responses = await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(n)))
    for r in responses:
        assert r.status_code == 200, r.text
    return [r.headers["x-exo-instance"] for r in responses]


def spread(instances: list[str]) -> list[int]:
    """Per-instance counts, largest first."""
    return sorted(Counter(instances).values(), reverse=True)


if __name__ == "__main__":  # used by the two-client-processes test
    print(json.dumps(asyncio.run(burst(sys.argv[1], int(sys.argv[2])))))
