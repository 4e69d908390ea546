"""Run a sharded instance without a master: by hand, in tests and in the benchmark.

    # one terminal per rank (the followers first or last, in any order):
    python -m exo_worker.distributed.generate --model smollm2 --rank 1 --hosts 127.0.0.1:5000,127.0.0.1:5002
    python -m exo_worker.distributed.generate --model smollm2 --rank 0 --hosts 127.0.0.1:5000,127.0.0.1:5002 \
        --sharding pipeline --prompt "What is the capital of France?"

Rank 0 answers each `--prompt` (greedy unless --temperature) and prints one JSON line per prompt:
its text, tokens, time to first token and tokens per second; then it closes the instance, which
ends the followers. Without `--hosts` the model runs on one node (MlxEngine), the reference the
sharded answers are compared with. `--concurrent` sends the prompts together (one batch).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from typing import Any

from exo_worker.distributed.topology import ShardSpec, parse_hosts
from exo_worker.engine import EngineError, ModelLoadError
from exo_worker.mlx_engine import MlxEngine
from protocol.ids import ModelId
from protocol.logs import LogFormat, configure_logging
from protocol.messages import ChatMessage, TextGenerationParams
from protocol.sharding import Sharding


async def _answer(engine: MlxEngine, prompt: str, args: argparse.Namespace) -> dict[str, Any]:
    params = TextGenerationParams(
        model=ModelId("model"),
        messages=(ChatMessage(role="user", content=prompt),),
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=1.0,
        seed=args.seed,
    )
    pieces: list[str] = []
    first: list[float] = []
    start = time.perf_counter()

    def on_text(text: str) -> None:
        if not first:
            first.append(time.perf_counter())
        pieces.append(text)

    try:
        outcome = await engine.run(params, on_text, threading.Event())
    except EngineError as exc:
        return {"prompt": prompt, "error": str(exc), "text": "".join(pieces)}
    seconds = time.perf_counter() - start
    ttft = (first[0] - start) if first else seconds
    tokens = outcome.usage.completion_tokens
    decode = seconds - ttft
    return {
        "prompt": prompt,
        "text": "".join(pieces),
        "finish_reason": outcome.finish_reason.value,
        "completion_tokens": tokens,
        "ttft_s": round(ttft, 4),
        "seconds": round(seconds, 4),
        "decode_tokens_per_s": round((tokens - 1) / decode, 3) if tokens > 1 and decode > 0 else None,
    }


async def _serve(engine: MlxEngine, args: argparse.Namespace) -> int:
    loaded = time.perf_counter()
    await engine.load()
    print(json.dumps({"loaded_s": round(time.perf_counter() - loaded, 3)}), flush=True)
    if args.concurrent:
        results = await asyncio.gather(*(_answer(engine, p, args) for p in args.prompt))
    else:
        results = [await _answer(engine, p, args) for p in args.prompt]
    for result in results:
        print(json.dumps(result), flush=True)
    return 1 if any("error" in r for r in results) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exo_worker.distributed.generate", description=__doc__)
    parser.add_argument("--model", required=True, help="a model directory, or smollm2")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--hosts", default="", help="ring addresses HOST:PORT, index = rank; none: one node")
    parser.add_argument("--sharding", choices=[s.value for s in Sharding], default=Sharding.TENSOR.value)
    parser.add_argument("--split", default="", help="pipeline: layers per rank, e.g. 20,10")
    parser.add_argument("--control", default="", help="HOST:PORT of rank 0's control socket")
    parser.add_argument("--loss-timeout", type=float, default=10.0)
    parser.add_argument("--join-timeout", type=float, default=300.0)
    parser.add_argument("--prompt", action="append", default=[])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--concurrent", action="store_true")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    configure_logging(LogFormat.AUTO, args.log_level)  # to stderr: stdout carries the answers

    from exo_worker.models import resolve_model

    try:
        path = resolve_model(args.model)
        if not args.hosts:
            engine = MlxEngine(path, max_batch=args.max_batch)
            return asyncio.run(_serve(engine, args))
        spec = ShardSpec(
            rank=args.rank,
            hosts=parse_hosts(args.hosts),
            sharding=Sharding(args.sharding),
            control=args.control,
            split=tuple(int(n) for n in args.split.split(",")) if args.split else (),
            loss_timeout=args.loss_timeout,
            join_timeout=args.join_timeout,
        )
    except (ModelLoadError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if spec.rank > 0:
        from exo_worker.distributed.follower import follower_main

        follower_main(path, spec)
    from exo_worker.distributed.engine import ShardedEngine

    sharded = ShardedEngine(path, spec, max_batch=args.max_batch)
    try:
        return asyncio.run(_serve(sharded, args))
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        sharded.close()


if __name__ == "__main__":
    sys.exit(main())
