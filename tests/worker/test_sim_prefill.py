"""The sim engine models prefill: prompt words over a prefill rate, in chunks on one shared lane,
cancellation at a chunk boundary, decode steps that wait for the chunk in progress, and the
context limit. Cheap and deterministic enough for cluster tests and benchmarks."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time

from exo_worker.engine import ContextLengthExceeded, RunOutcome
from exo_worker.sim_engine import SimEngine
from protocol.ids import ModelId
from protocol.messages import ChatMessage, FinishReason, TextGenerationParams


def params(words: int, max_tokens: int, *, given: bool = True) -> TextGenerationParams:
    content = " ".join(f"w{i}" for i in range(words))
    return TextGenerationParams(
        model=ModelId("sim"),
        messages=(ChatMessage(role="user", content=content),),
        max_tokens=max_tokens,
        max_tokens_given=given,
    )


async def until(condition: object, what: str, deadline: float = 10.0) -> None:
    end = time.monotonic() + deadline
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)  # wait-ok: polling inside the deadline above


def test_prefill_takes_prompt_over_rate_and_a_cancel_lands_at_the_next_chunk() -> None:
    engine = SimEngine(1000.0, prefill_tokens_per_s=200.0, prefill_chunk=20)

    async def main() -> tuple[float, RunOutcome, float, int]:
        t0 = time.monotonic()
        whole = await engine.run(params(100, 1), lambda _: None, threading.Event())
        took = time.monotonic() - t0
        assert whole.finish_reason is FinishReason.LENGTH and whole.usage.prompt_tokens == 100
        cancel = threading.Event()
        task = asyncio.ensure_future(engine.run(params(1000, 1), lambda _: None, cancel))
        await until(lambda: 0 < engine.work().prefill_tokens < 960, "a few chunks")
        cancel.set()
        t1 = time.monotonic()
        outcome = await task
        return took, outcome, time.monotonic() - t1, engine.work().prefill_tokens

    took, outcome, let_go, left = asyncio.run(main())
    assert 0.45 <= took < 2.0  # 100 words at 200/s
    assert outcome.finish_reason is FinishReason.CANCELLED
    assert let_go < 0.5 and left == 0  # one 0.1 s chunk, not the 5 s prompt
    work = engine.work()
    assert (work.prefill_rate, work.prefill_chunk) == (200.0, 20) and 3 < work.chars_per_token < 6


def test_a_decoding_stream_keeps_going_while_another_prompt_prefills() -> None:
    engine = SimEngine(100.0, prefill_tokens_per_s=200.0, prefill_chunk=20)

    async def main() -> float:
        stamps: list[float] = []
        stream = asyncio.ensure_future(
            engine.run(params(3, 150), lambda _: stamps.append(time.monotonic()), threading.Event())
        )
        await until(lambda: len(stamps) >= 3, "the stream to decode")
        t0 = time.monotonic()
        await engine.run(params(300, 1), lambda _: None, threading.Event())  # 1.5 s of prefill
        during = [b - a for a, b in itertools.pairwise(stamps) if a >= t0]
        await stream
        assert len(during) >= 10  # about one token per chunk, as in a batch step
        return max(during)

    worst_gap = asyncio.run(main())
    assert worst_gap < 0.3  # one 0.1 s chunk plus a token, never the whole prompt


def test_the_context_limit_is_enforced_and_caps_a_default_max_tokens() -> None:
    engine = SimEngine(10_000.0, context_length=50)

    async def main() -> tuple[BaseException | None, RunOutcome]:
        error: BaseException | None = None
        try:
            await engine.run(params(40, 20), lambda _: None, threading.Event())
        except ContextLengthExceeded as exc:
            error = exc
        capped = await engine.run(params(40, 256, given=False), lambda _: None, threading.Event())
        return error, capped

    error, capped = asyncio.run(main())
    assert error is not None and "maximum context length is 50 tokens" in str(error)
    assert "you requested 60 tokens (40 in the messages, 20 in the completion)" in str(error)
    assert capped.finish_reason is FinishReason.LENGTH and capped.usage.completion_tokens == 10
