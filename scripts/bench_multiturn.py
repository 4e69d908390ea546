"""Multi-turn chat over two MLX workers: does prefix-aware placement send each turn to the
instance whose prompt cache holds the conversation so far?

8 conversations x 4 turns share a system prompt (~100 tokens); the conversations run at once,
each turn after the previous reply. Three masters, one after another on the same model:
prefix-aware least-loaded (the default), plain least-loaded (--no-prefix-affinity) and
round-robin. Reports mean time to first token per turn, the instances' prompt-cache hit rates
and the master's affinity counters, as JSON (--out) and a markdown table.

    python scripts/bench_multiturn.py --model tiny --out bench/results/multiturn.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exo_master.devtools.launcher import ClusterSpec, LocalCluster  # noqa: E402

SYSTEM = (
    "You are a careful assistant for a small team that runs language models on a cluster of Apple "
    "Silicon machines. Answer in one short sentence, be concrete, avoid lists, never invent numbers "
    "you were not given, and when a question is ambiguous say what you assume before answering. The "
    "team cares about latency, fairness between users, and predictable behaviour under load."
)
VARIANTS: tuple[tuple[str, str, list[str]], ...] = (
    ("prefix-aware least-loaded", "least-loaded", []),
    ("least-loaded", "least-loaded", ["--no-prefix-affinity"]),
    ("round-robin", "round-robin", []),
)


async def turn(
    client: httpx.AsyncClient, model: str, messages: list[dict[str, str]], max_tokens: int
) -> tuple[float, str]:
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
    }
    start = time.perf_counter()
    ttft: float | None = None
    text = ""
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            for choice in json.loads(line[5:]).get("choices") or ():
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    ttft = ttft if ttft is not None else time.perf_counter() - start
                    text += piece
    if ttft is None:
        raise RuntimeError("a turn ended without any content")
    return ttft, text


async def conversation(
    client: httpx.AsyncClient, model: str, c: int, turns: int, max_tokens: int
) -> list[float]:
    messages = [{"role": "system", "content": SYSTEM}]
    ttfts = []
    for t in range(turns):
        messages.append(
            {"role": "user", "content": f"Conversation {c}, question {t + 1}: what should we check next?"}
        )
        ttft, reply = await turn(client, model, messages, max_tokens)
        ttfts.append(ttft)
        messages.append({"role": "assistant", "content": reply})
    return ttfts


async def run_variant(
    cluster: LocalCluster, model: str, chats: int, turns: int, max_tokens: int
) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=cluster.api_url, timeout=600) as client:
        per_chat = await asyncio.gather(
            *(conversation(client, model, c, turns, max_tokens) for c in range(chats))
        )
        # Cache counters travel in heartbeats (every second): wait for the ones sent after the run.
        deadline = time.monotonic() + 5
        while True:
            state = (await client.get("/v1/cluster/state", params={"tasks": 0})).json()
            seen = sum(i["prompt_cache_hits"] + i["prompt_cache_misses"] for i in state["instances"])
            if seen >= chats * turns or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        metrics = (await client.get("/metrics")).text
    by_turn = [statistics.mean(chat[t] for chat in per_chat) for t in range(turns)]
    counters = {
        line.split()[0]: float(line.split()[1])
        for line in metrics.splitlines()
        if line.startswith(("exo_affinity_lookups_total", "exo_affinity_hits_total"))
    }
    cache = {
        i["instance_id"]: {"hits": i["prompt_cache_hits"], "misses": i["prompt_cache_misses"]}
        for i in state["instances"]
    }
    return {
        "ttft_by_turn_s": by_turn,
        "ttft_later_turns_s": statistics.mean(by_turn[1:]),
        "cache": cache,
        "affinity": counters,
    }


@contextmanager
def model_directory(model: str) -> Iterator[Path]:
    if model == "tiny":
        from tests.support.tiny_model import build_tiny_model

        with tempfile.TemporaryDirectory(prefix="exo-bench-multiturn-") as tmp:
            yield build_tiny_model(Path(tmp) / "tiny-model")
        return
    from exo_worker.models import resolve_model

    yield Path(resolve_model(model))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny", help="tiny or smollm2")
    parser.add_argument("--chats", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    from exo_worker.engine_choice import served_model_id

    results: dict[str, Any] = {"model": args.model, "chats": args.chats, "turns": args.turns, "variants": {}}
    with (
        model_directory(args.model) as path,
        tempfile.TemporaryDirectory(prefix="exo-multiturn-logs-") as logs,
    ):
        for name, policy, master_args in VARIANTS:
            spec = ClusterSpec(
                workers=2,
                engine="mlx",
                model=str(path),
                policy=policy,
                max_concurrency=4,
                master_args=master_args,
                log_dir=Path(logs) / name.replace(" ", "-"),
            )
            with LocalCluster(spec) as cluster:
                cluster.start(ready_timeout=600)
                model = str(served_model_id(str(path)))
                results["variants"][name] = asyncio.run(
                    run_variant(cluster, model, args.chats, args.turns, args.max_tokens)
                )
            print(f"{name}: {results['variants'][name]}", file=sys.stderr, flush=True)
    later = {name: v["ttft_later_turns_s"] for name, v in results["variants"].items()}
    results["ratio_prefix_aware_over_round_robin"] = later["prefix-aware least-loaded"] / later["round-robin"]
    results["ratio_prefix_aware_over_least_loaded"] = (
        later["prefix-aware least-loaded"] / later["least-loaded"]
    )
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
