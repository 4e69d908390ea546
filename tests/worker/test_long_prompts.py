"""Long prompts in MlxEngine (tiny offline model): chunked prefill is interruptible, decoding goes on
while another prompt is processed, the engine reports its work, and the context is enforced."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from exo_worker.engine import ContextLengthExceeded, RunOutcome
from exo_worker.mlx_engine import MlxEngine
from protocol.ids import ModelId
from protocol.messages import ChatMessage, FinishReason, TextGenerationParams

pytestmark = pytest.mark.mlx
DEADLINE = 60.0
CONTEXT = 2048  # the tiny model's max_position_embeddings


def _params(text: str, max_tokens: int, *, given: bool = True) -> TextGenerationParams:
    return TextGenerationParams(
        model=ModelId("tiny"),
        messages=(ChatMessage(role="user", content=text),),
        max_tokens=max_tokens,
        max_tokens_given=given,
        temperature=0.0,
    )


def _prompt_tokens(engine: MlxEngine, text: str) -> int:
    tokenizer = engine._tokenizer  # the engine's own count: chat template, then tokens
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    return len(tokenizer.encode(chat, add_special_tokens=False))


def _long_text(engine: MlxEngine, tokens: int) -> str:
    """The longest prompt of these words with at most `tokens` tokens (a binary search)."""
    words = [
        "the",
        "scheduler",
        "places",
        "every",
        "request",
        "on",
        "the",
        "instance",
        "that",
        "will",
        "answer",
        "first",
    ]
    vocabulary = [f"{words[i % len(words)]}{i % 7}" for i in range(4 * tokens)]
    low, high = 0, len(vocabulary)
    while low < high:
        middle = (low + high + 1) // 2
        if _prompt_tokens(engine, " ".join(vocabulary[:middle])) <= tokens:
            low = middle
        else:
            high = middle - 1
    return " ".join(vocabulary[:low])


def _engine(tiny_model_dir: Path, chunk: int) -> MlxEngine:
    engine = MlxEngine(tiny_model_dir, label="tiny", max_batch=2, prompt_cache_bytes=0, prefill_chunk=chunk)
    asyncio.run(engine.load())
    return engine


@pytest.fixture(scope="module")
def chunked(tiny_model_dir: Path) -> MlxEngine:
    return _engine(tiny_model_dir, chunk=8)


@pytest.fixture(scope="module")
def long_text(chunked: MlxEngine) -> str:
    return _long_text(chunked, 1500)


async def _until(condition: object, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)  # wait-ok: polling inside the deadline above


def test_a_cancel_mid_prefill_frees_the_engine_at_the_next_chunk(chunked: MlxEngine, long_text: str) -> None:
    async def main() -> tuple[RunOutcome, float, RunOutcome]:
        cancel = threading.Event()
        task = asyncio.ensure_future(chunked.run(_params(long_text, 4), lambda _: None, cancel))
        await _until(lambda: chunked.work().prefill_tokens > 0, "the prompt to be admitted")
        started = chunked.work().prefill_tokens
        await _until(lambda: 0 < chunked.work().prefill_tokens < started - 16, "a few chunks")
        cancel.set()
        t0 = time.monotonic()
        outcome = await task
        let_go = time.monotonic() - t0
        after = await chunked.run(_params("Hello, world!", 4), lambda _: None, threading.Event())
        return outcome, let_go, after

    outcome, let_go, after = asyncio.run(main())
    assert outcome.finish_reason is FinishReason.CANCELLED
    assert let_go < 2.0, f"the engine took {let_go:.2f} s to let go of a cancelled prefill"
    work = chunked.work()
    assert (work.prefill_tokens, work.decoding, work.waiting) == (0, 0, 0)
    assert work.prefill_rate > 0 and work.chars_per_token > 0 and work.prefill_chunk == 8
    assert after.finish_reason is FinishReason.LENGTH and after.usage.completion_tokens == 4


def _pieces_during_prefill(engine: MlxEngine, long_text: str) -> int:
    """Pieces a decoding stream receives between a long prompt's arrival and its first token."""

    async def main() -> int:
        stream_cancel = threading.Event()
        counts = {"stream": 0, "during": 0}
        long_started = asyncio.Event()
        long_answered = threading.Event()

        def on_stream(_: str) -> None:
            counts["stream"] += 1
            if long_started.is_set() and not long_answered.is_set():
                counts["during"] += 1

        stream = asyncio.ensure_future(
            engine.run(_params("What is the capital of France?", 1000), on_stream, stream_cancel)
        )
        await _until(lambda: counts["stream"] >= 3, "the stream to decode")
        long_started.set()
        await engine.run(_params(long_text, 2), lambda _: long_answered.set(), threading.Event())
        long_answered.set()
        stream_cancel.set()
        await stream
        return counts["during"]

    return asyncio.run(main())


def test_a_decoding_stream_keeps_going_while_another_prompt_prefills(
    chunked: MlxEngine, long_text: str, tiny_model_dir: Path
) -> None:
    steps = -(-_prompt_tokens(chunked, long_text) // 8)
    assert _pieces_during_prefill(chunked, long_text) >= steps // 2
    # The same check fails with one 2,048-token chunk (mlx-lm's default): the stream stalls.
    whole = _engine(tiny_model_dir, chunk=2048)
    try:
        assert _pieces_during_prefill(whole, long_text) < 10  # a few steps, not one per chunk
    finally:
        whole.close()


def test_a_prompt_over_the_context_fails_after_tokenization_only(chunked: MlxEngine, long_text: str) -> None:
    prompt = _prompt_tokens(chunked, long_text)
    wanted = CONTEXT - prompt + 10

    async def main() -> BaseException | RunOutcome:
        try:
            return await chunked.run(_params(long_text, wanted), lambda _: None, threading.Event())
        except ContextLengthExceeded as exc:
            return exc

    t0 = time.monotonic()
    error = asyncio.run(main())
    assert time.monotonic() - t0 < 1.0
    assert isinstance(error, ContextLengthExceeded) and error.code == "context_length_exceeded"
    assert str(error).startswith(
        f"This model's maximum context length is {CONTEXT} tokens. However, you requested "
        f"{prompt + wanted} tokens ({prompt} in the messages, {wanted} in the completion)."
    )
    assert chunked.work().prefill_tokens == 0


def test_without_max_tokens_the_default_is_capped_by_the_context(chunked: MlxEngine) -> None:
    text = _long_text(chunked, CONTEXT - 12)
    prompt = _prompt_tokens(chunked, text)
    outcome = asyncio.run(chunked.run(_params(text, 256, given=False), lambda _: None, threading.Event()))
    assert outcome.finish_reason is FinishReason.LENGTH
    assert outcome.usage.completion_tokens == CONTEXT - prompt
