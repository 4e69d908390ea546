"""Lockstep replay in one process: a Mirror fed rank 0's broadcast ends in rank 0's exact state.

No ring here: rank 0's scheduler and the mirror each hold the whole tiny model, and the mirror
applies every command on the MLX thread the moment rank 0 sends it (a Step right before rank 0's
own step, as a follower would). Prompt-cache reuse, stop strings, cancels, sampled requests and
a batch of concurrent requests all go through the same replay; afterwards both prompt caches hold
the same entries and bytes, and no lockstep check failed.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from exo_worker import sampling_defaults
from exo_worker.distributed.control import Message
from exo_worker.distributed.lockstep import BroadcastingPromptCache, Mirror, ShardedBatchScheduler
from exo_worker.engine import ProgressSink
from exo_worker.mlx_engine import MlxEngine
from protocol.ids import ModelId
from protocol.messages import ChatMessage, FinishReason, TextGenerationParams

pytestmark = pytest.mark.mlx
BUDGET_PER_LAYER = 1 << 20


class MirroredEngine(MlxEngine):
    """An MlxEngine whose batch is rank 0's ShardedBatchScheduler, with an in-process follower."""

    def __init__(self, model: Path) -> None:
        super().__init__(model, max_batch=3, prompt_cache_bytes=0)
        self.mirror: Mirror | None = None
        self.sent: list[str] = []
        self.failures: list[BaseException] = []

    def _send(self, message: Message) -> None:
        self.sent.append(type(message).__name__)
        assert self.mirror is not None
        self.mirror.apply(message)  # type: ignore[arg-type]

    def _load_blocking(self, report: ProgressSink) -> None:
        import mlx_lm

        model, tokenizer = mlx_lm.load(self._source)[:2]
        layers = len(model.layers)
        prompt_cache = BroadcastingPromptCache(BUDGET_PER_LAYER * layers, self._send)
        scheduler = ShardedBatchScheduler(
            model,
            tokenizer,
            max_batch=3,
            prompt_cache=prompt_cache,
            send=self._send,
            on_failure=self.failures.append,
            default_sampling=sampling_defaults.CONSERVATIVE,
        )
        self.mirror = Mirror(model, tokenizer, scheduler.start(BUDGET_PER_LAYER), layers)
        assert self._thread is not None
        self._thread.attach(scheduler)
        self._model, self._tokenizer, self._prompt_cache = model, tokenizer, prompt_cache
        self._scheduler = scheduler


def _params(content: str, **kwargs: Any) -> TextGenerationParams:
    system = ChatMessage(role="system", content="You are a terse assistant.")
    return TextGenerationParams(
        model=ModelId("tiny"), messages=(system, ChatMessage(role="user", content=content)), **kwargs
    )


def test_a_mirror_replaying_the_broadcast_ends_in_rank_0s_state(tiny_model_dir: Path) -> None:
    engine = MirroredEngine(tiny_model_dir)

    async def main() -> list[tuple[str, FinishReason]]:
        await engine.load()

        async def ask(params: TextGenerationParams, cancel_after: int = 0) -> tuple[str, FinishReason]:
            cancel = threading.Event()
            pieces: list[str] = []

            def on_text(text: str) -> None:
                pieces.append(text)
                if cancel_after and len(pieces) >= cancel_after:
                    cancel.set()

            outcome = await engine.run(params, on_text, cancel)
            return "".join(pieces), outcome.finish_reason

        first = await ask(_params("What is the capital of France?", max_tokens=12, temperature=0.0))
        batch = await asyncio.gather(
            ask(_params("What is the capital of France?", max_tokens=20, temperature=0.0)),  # cached prefix
            ask(_params("Hello, world!", max_tokens=40, temperature=0.0), cancel_after=3),  # cancelled
            ask(_params("Numbers like 1, 2, 3", max_tokens=16, temperature=0.9, seed=7)),  # sampled
            ask(_params("Small models are fast", max_tokens=30, temperature=0.0, stop=["e"])),  # stop string
        )
        return [first, *batch]

    try:
        results = asyncio.run(main())
    finally:
        engine.close()
    assert engine.failures == []
    reasons = [reason for _, reason in results]
    assert reasons[2] is FinishReason.CANCELLED
    assert {"Insert", "Step", "Remove", "CacheInsert"} <= set(engine.sent)
    mirror, mine = engine.mirror, engine.prompt_cache_stats()
    assert mirror is not None
    theirs = mirror.prompt_cache.stats()
    assert mine.hits > 0  # the second France prompt reused the first one's cache
    assert (theirs.entries, theirs.size_bytes) == (mine.entries, mine.size_bytes)
    assert (theirs.hits, theirs.reused_tokens) == (mine.hits, mine.reused_tokens)
