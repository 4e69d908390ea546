"""Multi-turn chat over two MLX workers: does prefix-aware placement send each turn to the
instance whose prompt cache holds the conversation so far, and what does it save?

8 conversations x 4 turns share a system prompt (~100 tokens with the chat template). The chats
take turns in a seeded random interleaving, `--concurrency` turns in flight at once (each from a
different chat), so requests reach the master in an order no policy can fall into. (With all 8
chats in lockstep over 2 instances, round-robin sends each chat to the same instance every turn by
accident, which hides the very effect measured here.) The default concurrency keeps this CPU
below saturation, so time to first token shows prefill, not queueing.

Variants, one after another on the same model, each a fresh cluster (empty caches):
prefix-aware least-loaded (the default), the same with --affinity-slack 1, plain least-loaded
(--no-prefix-affinity) and round-robin. Reports mean time to first token per turn, each variant's
prompt-cache hit rate and token share (prompt tokens served from the workers' caches) and the
master's affinity counters, as JSON (--out, with a "markdown" table) and on stdout.

    python scripts/bench_multiturn.py --model tiny --out /tmp/multiturn-tiny.json
    python scripts/bench_multiturn.py --model smollm2 --concurrency 1 --out /tmp/multiturn-smollm2.json

(`make bench` runs it as scripts/bench_all.py lists in MULTITURN_RUNS, into bench/results.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exo_master.devtools.launcher import ClusterSpec, LocalCluster  # noqa: E402
from tests.support.tiny_model import model_directory  # noqa: E402

SYSTEM = (
    "You are a careful assistant for a small team that runs language models on a cluster of Apple "
    "Silicon machines. Answer in one short sentence, be concrete, avoid lists, never invent numbers "
    "you were not given, and when a question is ambiguous say what you assume before answering. The "
    "team cares about latency, fairness between users, and predictable behaviour under load."
)
PREFIX_AWARE = "prefix-aware least-loaded"
VARIANTS: tuple[tuple[str, str, list[str]], ...] = (
    (PREFIX_AWARE, "least-loaded", []),
    ("prefix-aware, slack 1", "least-loaded", ["--affinity-slack", "1"]),
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


@dataclass(frozen=True)
class Workload:
    chats: int
    turns: int
    max_tokens: int
    concurrency: int  # turns in flight at once, each from a different chat
    seed: int


async def run_chats(client: httpx.AsyncClient, model: str, load: Workload) -> list[list[float]]:
    """Every chat's turns, in a seeded random interleaving with at most `concurrency` in flight.

    Whenever a turn ends, a random chat among those idle with turns left speaks next, so the order
    in which chats reach the master follows no pattern a placement policy could fall into.
    Returns each chat's time to first token per turn.
    """
    rng = random.Random(load.seed)
    histories = [[{"role": "system", "content": SYSTEM}] for _ in range(load.chats)]
    ttfts: list[list[float]] = [[] for _ in range(load.chats)]
    running: dict[asyncio.Task[tuple[float, str]], int] = {}
    while True:
        while len(running) < load.concurrency:
            busy = set(running.values())
            idle = [c for c in range(load.chats) if c not in busy and len(ttfts[c]) < load.turns]
            if not idle:
                break
            c = rng.choice(idle)
            question = f"Conversation {c}, question {len(ttfts[c]) + 1}: what should we check next?"
            histories[c].append({"role": "user", "content": question})
            ask = turn(client, model, list(histories[c]), load.max_tokens)
            running[asyncio.create_task(ask)] = c
        if not running:
            return ttfts
        done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            c = running.pop(task)
            ttft, reply = task.result()
            ttfts[c].append(ttft)
            histories[c].append({"role": "assistant", "content": reply})


async def run_variant(cluster: LocalCluster, model: str, load: Workload) -> dict[str, Any]:
    chats, turns = load.chats, load.turns
    async with httpx.AsyncClient(base_url=cluster.api_url, timeout=600) as client:
        per_chat = await run_chats(client, model, load)
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
        i["instance_id"]: {
            "hits": i["prompt_cache_hits"],
            "misses": i["prompt_cache_misses"],
            "reused_tokens": i["prompt_cache_reused_tokens"],
            "prompt_tokens": i["prompt_tokens"],
        }
        for i in state["instances"]
    }
    prompt_tokens = sum(c["prompt_tokens"] for c in cache.values())
    return {
        "ttft_by_turn_s": by_turn,
        "ttft_later_turns_s": statistics.mean(by_turn[1:]),
        "cache": cache,
        "token_share_reused": sum(c["reused_tokens"] for c in cache.values()) / max(1, prompt_tokens),
        "affinity": counters,
    }


def markdown(results: dict[str, Any]) -> str:
    """The per-turn TTFT table of one model, with the cache and affinity columns."""
    turns = results["turns"]
    rr = results["variants"]["round-robin"]["ttft_later_turns_s"]
    head = " | ".join(f"turn {t + 1}" for t in range(turns))
    lines = [
        f"{results['chats']} chats x {turns} turns over 2 workers ({results['model']}, max_tokens "
        f"{results['max_tokens']}, {results['concurrency']} turns in flight, chats interleaved at random "
        f"with seed {results['seed']}). Mean time to first token in seconds.",
        "",
        f"| placement | {head} | turns 2-{turns} | vs round-robin | cache hits | tokens reused "
        "| affinity hits |",
        "| --- |" + " --- |" * (turns + 5),
    ]
    for name, v in results["variants"].items():
        hits = sum(c["hits"] for c in v["cache"].values())
        seen = hits + sum(c["misses"] for c in v["cache"].values())
        lookups = v["affinity"].get("exo_affinity_lookups_total", 0.0)
        affinity = (
            f"{v['affinity'].get('exo_affinity_hits_total', 0.0):.0f}/{lookups:.0f}" if lookups else "-"
        )
        cells = " | ".join(f"{x:.3g}" for x in v["ttft_by_turn_s"])
        lines.append(
            f"| {name} | {cells} | {v['ttft_later_turns_s']:.3g} | {v['ttft_later_turns_s'] / rr:.2f}x "
            f"| {hits}/{seen} | {100 * v['token_share_reused']:.0f}% | {affinity} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny", help="tiny or smollm2")
    parser.add_argument("--chats", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=2, help="turns in flight at once")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    from exo_worker.engine_choice import served_model_id

    load = Workload(args.chats, args.turns, args.max_tokens, args.concurrency, args.seed)
    results: dict[str, Any] = {**asdict(load), "model": args.model, "variants": {}}
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
                results["variants"][name] = asyncio.run(run_variant(cluster, model, load))
            print(f"{name}: {results['variants'][name]}", file=sys.stderr, flush=True)
    later = {name: v["ttft_later_turns_s"] for name, v in results["variants"].items()}
    results["ratio_prefix_aware_over_round_robin"] = later[PREFIX_AWARE] / later["round-robin"]
    results["ratio_prefix_aware_over_least_loaded"] = later[PREFIX_AWARE] / later["least-loaded"]
    results["markdown"] = markdown(results)
    print(results["markdown"])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
