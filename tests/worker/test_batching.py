"""Continuous batching in MlxEngine on the tiny offline model: same outputs as one at a time,
requests progress together, cancel frees a slot mid-batch while the others go on."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from exo_worker.engine import EngineError, RunOutcome
from exo_worker.mlx_engine import MlxEngine
from protocol.ids import ModelId
from protocol.messages import ChatMessage, FinishReason, TextGenerationParams

pytestmark = pytest.mark.mlx
TIMEOUT = 120.0

QUESTIONS = (
    "What is the capital of France?",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. Workers send heartbeats every second.",
    "Numbers like 1, 2, 3 and 42",
)


def _params(question: str, max_tokens: int, **kwargs: object) -> TextGenerationParams:
    return TextGenerationParams(
        model=ModelId("tiny"),
        messages=(ChatMessage(role="user", content=question),),
        max_tokens=max_tokens,
        **kwargs,  # type: ignore[arg-type]
    )


def _engine(tiny_model_dir: Path, max_batch: int) -> MlxEngine:
    engine = MlxEngine(tiny_model_dir, label="tiny", max_batch=max_batch, prompt_cache_bytes=0)
    asyncio.run(engine.load())
    return engine


@pytest.fixture(scope="module")
def serial(tiny_model_dir: Path) -> MlxEngine:
    return _engine(tiny_model_dir, max_batch=1)


@pytest.fixture(scope="module")
def batched(tiny_model_dir: Path) -> MlxEngine:
    return _engine(tiny_model_dir, max_batch=4)


Event = tuple[int, str]  # (request index, piece)


async def _gather(
    engine: MlxEngine,
    params: list[TextGenerationParams],
    cancels: list[threading.Event] | None = None,
    on_event: Callable[[int, str], None] | None = None,
) -> tuple[list[tuple[str, RunOutcome]], list[Event]]:
    """Run the requests at once; returns each one's text and outcome, and every piece in arrival order."""
    events: list[Event] = []
    cancels = cancels or [threading.Event() for _ in params]

    async def one(i: int) -> tuple[str, RunOutcome]:
        pieces: list[str] = []

        def on_text(piece: str) -> None:
            pieces.append(piece)
            events.append((i, piece))
            if on_event is not None:
                on_event(i, piece)

        outcome = await engine.run(params[i], on_text, cancels[i])
        return "".join(pieces), outcome

    async with asyncio.timeout(TIMEOUT):
        results = await asyncio.gather(*(one(i) for i in range(len(params))))
    return list(results), events


def test_batched_greedy_outputs_equal_one_at_a_time(serial: MlxEngine, batched: MlxEngine) -> None:
    # Different prompt lengths (padding inside the batch) and max_tokens (sequences leave at
    # different steps, so the batch shrinks under the others).
    params = [_params(q, max_tokens=8 + 5 * i, temperature=0.0) for i, q in enumerate(QUESTIONS)]
    alone = [asyncio.run(_gather(serial, [p]))[0][0] for p in params]
    together, _ = asyncio.run(_gather(batched, params))
    assert together == alone
    assert [outcome.usage.completion_tokens for _, outcome in together] == [8, 13, 18, 23]
    assert all(outcome.finish_reason is FinishReason.LENGTH for _, outcome in together)


def test_batched_seeded_sampling_equals_one_at_a_time(serial: MlxEngine, batched: MlxEngine) -> None:
    params = [_params(q, max_tokens=12, temperature=0.8, top_p=0.9, seed=i) for i, q in enumerate(QUESTIONS)]
    alone = [asyncio.run(_gather(serial, [p]))[0][0] for p in params]
    together, _ = asyncio.run(_gather(batched, params))
    assert [text for text, _ in together] == [text for text, _ in alone]


def test_four_concurrent_requests_progress_together(batched: MlxEngine, serial: MlxEngine) -> None:
    # Seeded sampling: the tiny model's greedy output is sometimes invalid UTF-8 that the
    # detokenizer holds back until the end, which would hide progress; these seeds' text shows.
    params = [_params(q, max_tokens=24, temperature=1.0, seed=1) for q in QUESTIONS]
    _, events = asyncio.run(_gather(batched, params))
    first = {i: next(n for n, (j, _) in enumerate(events) if j == i) for i in range(4)}
    last = {i: max(n for n, (j, _) in enumerate(events) if j == i) for i in range(4)}
    # Every request has its first piece before any request has its last: they ran side by side.
    assert max(first.values()) < min(last.values())
    # The same check fails one at a time (so it can fail at all).
    _, events = asyncio.run(_gather(serial, params))
    first = {i: next(n for n, (j, _) in enumerate(events) if j == i) for i in range(4)}
    last = {i: max(n for n, (j, _) in enumerate(events) if j == i) for i in range(4)}
    assert max(first.values()) > min(last.values())


def test_cancel_mid_batch_frees_the_slot_and_the_others_keep_running(batched: MlxEngine) -> None:
    cancels = [threading.Event() for _ in range(5)]
    counts = [0] * 5
    seen_after_cancel: list[int] = []

    def on_event(i: int, _: str) -> None:
        counts[i] += 1
        if i == 0 and counts[0] == 3:
            cancels[0].set()  # from on_text: the very next step must not deliver to it
        if cancels[0].is_set() and i != 0:
            seen_after_cancel.append(i)
        # Stop everyone once the newcomer ran alongside the others and each of them showed text after
        # the cancel (with chunked prefill a step can deliver to the newcomer before a neighbour's
        # token shows any text; max_tokens bounds the wait).
        if counts[4] >= 3 and {1, 2, 3} <= set(seen_after_cancel):
            for cancel in cancels:
                cancel.set()

    async def main() -> list[tuple[str, RunOutcome]]:
        # Greedy (the tiny model never ends it early), with prompts whose output text shows at once.
        shown = ("What is the capital of France?", "Hello, world!", "A scheduler places each request")
        params = [_params(q, max_tokens=1500, temperature=0.0) for q in (*shown, "What is")]
        params.append(_params("Hi", max_tokens=1500, temperature=0.0))
        # Four fill the batch; the fifth waits for a slot and only gets one by the cancel.
        results, _ = await _gather(batched, params, cancels, on_event)
        return results

    results = asyncio.run(main())
    _, cancelled = results[0]
    assert (cancelled.finish_reason, cancelled.usage.completion_tokens) == (FinishReason.CANCELLED, 3)
    assert counts[0] == 3  # nothing was delivered to it after its cancel
    assert {1, 2, 3} <= set(seen_after_cancel)  # the others went on decoding
    assert counts[4] >= 3  # the freed slot served the waiting request
    assert all(outcome.finish_reason is FinishReason.CANCELLED for _, outcome in results[1:])
    # (No count of the others' events before the cancel: with chunked prefill the four prompts start
    # decoding at different steps, so request 0 may reach 3 tokens before a neighbour shows any.)


def test_a_failing_on_text_fails_only_its_own_request(batched: MlxEngine) -> None:
    def explode(_: str) -> None:
        raise ValueError("boom")

    async def main() -> tuple[BaseException | RunOutcome, list[tuple[str, RunOutcome]]]:
        bad = asyncio.ensure_future(batched.run(_params("Hello", 20), explode, threading.Event()))
        good = [_params(q, max_tokens=10, temperature=0.0) for q in QUESTIONS[:3]]
        results, _ = await _gather(batched, good)
        outcome = await asyncio.gather(bad, return_exceptions=True)
        return outcome[0], results

    bad, good = asyncio.run(main())
    assert isinstance(bad, Exception) and "on_text failed: ValueError: boom" in str(bad)
    assert all(outcome.finish_reason is FinishReason.LENGTH for _, outcome in good)


def test_a_scheduling_bug_fails_the_batch_and_the_engine_goes_on(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = MlxEngine(tiny_model_dir, label="tiny", max_batch=2, prompt_cache_bytes=1 << 20)
    asyncio.run(engine.load())
    assert engine._prompt_cache is not None

    def broken(tokens: list[int], cache: object) -> None:
        raise RuntimeError("cache bug")

    with monkeypatch.context() as patch:
        patch.setattr(engine._prompt_cache, "insert", broken)
        with pytest.raises(EngineError, match=r"engine error: RuntimeError: cache bug"):
            asyncio.run(_gather(engine, [_params("Hello", 4, temperature=0.0)]))
    results, _ = asyncio.run(_gather(engine, [_params("Hello", 4, temperature=0.0)]))
    _, outcome = results[0]
    assert outcome.finish_reason is FinishReason.LENGTH and outcome.usage.completion_tokens == 4
