"""A decoding stream while a long prompt prefills on the same MLX instance (SmolLM2, this CPU).

One MlxEngine (the worker's engine, no cluster around it: the master adds nothing to this): stream A
decodes; once it has a few tokens, request B arrives with a long prompt. Measured: A's gaps between
tokens while B prefills (the target is about 2 s at most), B's time to first token, and, in a second
round, how long the engine takes to let go of B when B is cancelled mid-prefill. The chunk is the
engine's automatic one (--prefill-chunk 0) unless --chunk is given.

    python scripts/bench_prefill_gap.py --prompt-tokens 300 --out bench/results/prefill_gap.json
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import typer

from exo_worker.mlx_engine import MlxEngine
from exo_worker.models import resolve_model
from protocol.ids import ModelId
from protocol.messages import ChatMessage, TextGenerationParams


def _params(text: str, max_tokens: int) -> TextGenerationParams:
    return TextGenerationParams(
        model=ModelId("smollm2"),
        messages=(ChatMessage(role="user", content=text),),
        max_tokens=max_tokens,
        temperature=0.0,
    )


def _long_text(tokens: int) -> str:
    # About 1.3 tokens per word for this English-like filler with SmolLM2's tokenizer.
    words = ["the", "master", "places", "each", "request", "on", "the", "instance"]
    words += ["that", "will", "answer", "it", "first"]
    return " ".join(words[i % len(words)] for i in range(int(tokens / 1.3)))


async def _round(engine: MlxEngine, prompt_tokens: int, cancel_after_s: float | None) -> dict[str, Any]:
    stamps: list[float] = []
    stream_cancel = threading.Event()
    stream = asyncio.ensure_future(
        engine.run(
            _params("Tell me a long story about a river.", 1000),
            lambda _: stamps.append(time.monotonic()),
            stream_cancel,
        )
    )
    while len(stamps) < 3:
        await asyncio.sleep(0.05)  # wait-ok: polling the stream's progress
    long_cancel = threading.Event()
    first: list[float] = []
    t0 = time.monotonic()
    long = asyncio.ensure_future(
        engine.run(
            _params(_long_text(prompt_tokens), 2), lambda _: first.append(time.monotonic()), long_cancel
        )
    )
    let_go = None
    if cancel_after_s is not None:
        await asyncio.sleep(cancel_after_s)  # wait-ok: cancel mid-prefill, as a client giving up
        long_cancel.set()
        t1 = time.monotonic()
        outcome = await long
        let_go = time.monotonic() - t1
        t_end = time.monotonic()
    else:
        outcome = await long
        t_end = first[0] if first else time.monotonic()
    gaps = [b - a for a, b in itertools.pairwise(stamps) if b >= t0 and a <= t_end]
    stream_cancel.set()
    await stream
    work = engine.work()
    return {
        "prompt_tokens": outcome.usage.prompt_tokens,
        "outcome": str(outcome.finish_reason),
        "long_ttft_s": round(first[0] - t0, 2) if first and cancel_after_s is None else None,
        "cancel_let_go_s": round(let_go, 2) if let_go is not None else None,
        "stream_tokens_during": len(gaps),
        "stream_gap_max_s": round(max(gaps), 2) if gaps else None,
        "stream_gap_p50_s": round(statistics.median(gaps), 2) if gaps else None,
        "prefill_rate": work.prefill_rate,
        "decode_rate": work.decode_rate,
        "prefill_chunk": work.prefill_chunk,
    }


def main(
    prompt_tokens: int = typer.Option(300, help="Tokens of the long prompt (about)."),
    chunk: int = typer.Option(0, help="--prefill-chunk (0: automatic)."),
    cancel_after: float = typer.Option(20.0, help="Seconds into the second round's prefill to cancel."),
    out: Path = typer.Option(Path("bench/results/prefill_gap.json")),
) -> None:
    # No prompt cache: the second round's prompt must be processed again, not found in the cache.
    engine = MlxEngine(
        resolve_model("smollm2"), label="smollm2", max_batch=4, prefill_chunk=chunk, prompt_cache_bytes=0
    )
    asyncio.run(engine.load())
    try:
        full = asyncio.run(_round(engine, prompt_tokens, None))
        cancelled = asyncio.run(_round(engine, prompt_tokens, cancel_after))
    finally:
        engine.close()
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average": list(__import__("os").getloadavg()),
        "chunk_option": chunk,
        "full": full,
        "cancelled": cancelled,
    }
    result["markdown"] = (
        f"SmolLM2-135M on this CPU, one MlxEngine (batch 4, --prefill-chunk {chunk or 'auto'}). "
        f"A stream decodes; a {full['prompt_tokens']}-token prompt arrives.\n\n"
        "| round | chunk | stream tokens during prefill | stream gap p50 s | stream gap max s | "
        "long TTFT s | cancel -> engine let go s |\n|---|---|---|---|---|---|---|\n"
        + "\n".join(
            f"| {name} | {r['prefill_chunk']} | {r['stream_tokens_during']} | {r['stream_gap_p50_s']} | "
            f"{r['stream_gap_max_s']} | {r['long_ttft_s']} | {r['cancel_let_go_s']} |"
            for name, r in (("full prefill", full), (f"cancelled after {cancel_after:g} s", cancelled))
        )
        + f"\n\nMeasured: prefill {full['prefill_rate']:.1f} tokens/s, "
        f"decode {full['decode_rate']:.2f} steps/s "
        f"(load average {result['load_average'][0]:.1f} on 2 cores)."
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(result["markdown"])


if __name__ == "__main__":
    typer.run(main)
