"""A burst of concurrent chat completions against a master, reporting who served each request.

Shared by the end-to-end tests, the burst benchmark and anyone checking a live cluster's balance.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx


async def burst(api_url: str, n: int, model: str = "sim-model", max_tokens: int = 40) -> list[str]:
    """Fire n chat completions at once; return the x-exo-instance of each (all must succeed)."""
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(base_url=api_url, timeout=120, limits=limits) as client:
        body = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": max_tokens}
        responses = await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(n)))
    failed = [r for r in responses if r.status_code != 200]
    if failed:
        raise RuntimeError(
            f"{len(failed)} of {n} requests failed, first: {failed[0].status_code} {failed[0].text}"
        )
    return [r.headers["x-exo-instance"] for r in responses]


def spread(instances: list[str]) -> list[int]:
    """Per-instance counts, largest first."""
    return sorted(Counter(instances).values(), reverse=True)


if __name__ == "__main__":  # python -m exo_master.loadgen API_URL N [MODEL]: prints the instances as JSON
    import json
    import sys

    model = sys.argv[3] if len(sys.argv) > 3 else "sim-model"
    print(json.dumps(asyncio.run(burst(sys.argv[1], int(sys.argv[2]), model))))
