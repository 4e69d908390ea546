"""The per-instance prompt cache: same text with and without a hit, shared prefixes reused, the byte
budget evicting the oldest entries, and the stats in the runner's heartbeat report."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from exo_worker.engine import RunOutcome
from exo_worker.mlx_engine import MlxEngine
from exo_worker.prompt_cache import PromptCache, default_budget_bytes
from exo_worker.runner import Runner
from exo_worker.sim_engine import SimEngine
from protocol.ids import InstanceId, ModelId, NodeId
from protocol.messages import ChatMessage, InstanceReport, PromptCacheStats, TextGenerationParams

SYSTEM = (
    "You are a helpful assistant for an inference cluster. The scheduler places each request on "
    "the least loaded instance of its model; workers send heartbeats every second."
)


def _params(*messages: tuple[str, str], max_tokens: int = 12, **kwargs: Any) -> TextGenerationParams:
    return TextGenerationParams(
        model=ModelId("tiny"),
        messages=tuple(ChatMessage(role=r, content=c) for r, c in messages),
        max_tokens=max_tokens,
        temperature=kwargs.pop("temperature", 0.0),
        **kwargs,
    )


def _run(engine: MlxEngine, params: TextGenerationParams) -> tuple[str, RunOutcome]:
    pieces: list[str] = []
    outcome = asyncio.run(engine.run(params, pieces.append, threading.Event()))
    return "".join(pieces), outcome


def _engine(tiny_model_dir: Path, cache_bytes: int) -> MlxEngine:
    engine = MlxEngine(tiny_model_dir, label="tiny", max_batch=4, prompt_cache_bytes=cache_bytes)
    asyncio.run(engine.load())
    return engine


# ---- the cache alone, with stand-in KV caches ---------------------------------------------------


class FakeLayerCache:
    """What LRUPromptCache needs of a layer's KV cache: its size, and trimming."""

    def __init__(self, tokens: int, bytes_per_token: int = 10) -> None:
        self.tokens = tokens
        self.bytes_per_token = bytes_per_token

    @property
    def nbytes(self) -> int:
        return self.tokens * self.bytes_per_token

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(n, self.tokens)
        self.tokens -= n
        return n


def _insert(cache: PromptCache, tokens: list[int]) -> None:
    cache.insert(tokens, [FakeLayerCache(len(tokens))])


@pytest.mark.mlx
def test_the_byte_budget_evicts_the_oldest_entry_first() -> None:
    cache = PromptCache(budget_bytes=250)  # room for two 10-token entries of 100 bytes
    a, b, c = [1, *range(100, 109), 0], [2, *range(200, 209), 0], [3, *range(300, 309), 0]
    for tokens in (a, b):
        _insert(cache, tokens[:10])
    assert (cache.stats().entries, cache.stats().size_bytes) == (2, 200)
    _insert(cache, c[:10])
    stats = cache.stats()
    assert (stats.entries, stats.size_bytes, stats.budget_bytes) == (2, 200, 250)
    assert cache.fetch(a)[1] == 0  # evicted
    assert cache.fetch(b)[1] == 10
    assert cache.fetch(c)[1] == 10
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.reused_tokens) == (2, 1, 20)


@pytest.mark.mlx
def test_a_prompt_diverging_inside_an_entry_reuses_the_common_prefix_trimmed() -> None:
    cache = PromptCache(budget_bytes=10_000)
    _insert(cache, [1, 2, 3, 4, 5, 6, 7, 8])
    layers, reused = cache.fetch([1, 2, 3, 9, 9])
    assert reused == 3
    assert layers is not None and layers[0].tokens == 3  # a trimmed copy...
    assert cache.fetch([1, 2, 3, 4, 5, 6, 7, 8, 9])[1] == 8  # ...the entry itself is whole


@pytest.mark.mlx
def test_an_exact_hit_leaves_the_last_token_to_process() -> None:
    cache = PromptCache(budget_bytes=10_000)
    _insert(cache, [1, 2, 3, 4])
    layers, reused = cache.fetch([1, 2, 3, 4])
    assert reused == 3 and layers is not None and layers[0].tokens == 3


@pytest.mark.mlx
def test_a_zero_budget_caches_nothing() -> None:
    cache = PromptCache(budget_bytes=0)
    _insert(cache, [1, 2, 3, 4])
    assert cache.fetch([1, 2, 3, 4, 5]) == (None, 0)
    assert cache.stats() == PromptCacheStats(misses=1, prompt_tokens=5)


def test_the_default_budget_is_bounded_and_shared_by_the_instances() -> None:
    one, four = default_budget_bytes(1), default_budget_bytes(4)
    assert 64 << 20 <= four <= one <= 8 << 30


# ---- the cache in the engine --------------------------------------------------------------------


@pytest.mark.mlx
def test_a_cache_hit_returns_the_same_text_as_no_cache(tiny_model_dir: Path) -> None:
    cached, uncached = _engine(tiny_model_dir, 64 << 20), _engine(tiny_model_dir, 0)
    params = _params(("system", SYSTEM), ("user", "What is the capital of France?"), max_tokens=16)
    seeded = _params(("system", SYSTEM), ("user", "Hello"), max_tokens=16, temperature=1.0, seed=3)
    for p in (params, seeded):
        reference = _run(uncached, p)
        assert _run(cached, p) == reference  # a miss (or a short template prefix)
        hits = cached.prompt_cache_stats().hits
        assert _run(cached, p) == reference  # the whole prompt is cached now
        assert cached.prompt_cache_stats().hits == hits + 1
    stats = uncached.prompt_cache_stats()
    assert (stats.hits, stats.misses, stats.reused_tokens) == (0, 2, 0) and stats.prompt_tokens > 0


@pytest.mark.mlx
def test_concurrent_requests_mixing_hits_and_misses_match_no_cache(tiny_model_dir: Path) -> None:
    cached, uncached = _engine(tiny_model_dir, 64 << 20), _engine(tiny_model_dir, 0)
    _run(cached, _params(("system", SYSTEM), ("user", "Warm the cache")))
    batch = [
        _params(("system", SYSTEM), ("user", "What is the capital of France?"), max_tokens=10),  # hit
        _params(("user", "Hello, world!"), max_tokens=14),  # only the template's first tokens
        _params(("system", SYSTEM), ("user", "Hi"), max_tokens=12, temperature=0.7, seed=5),  # hit
        _params(("system", "Something else entirely."), ("user", "Hi"), max_tokens=9),
    ]

    async def together(engine: MlxEngine) -> list[tuple[str, RunOutcome]]:
        async def one(p: TextGenerationParams) -> tuple[str, RunOutcome]:
            pieces: list[str] = []
            outcome = await engine.run(p, pieces.append, threading.Event())
            return "".join(pieces), outcome

        return list(await asyncio.gather(*(one(p) for p in batch)))

    hits = cached.prompt_cache_stats().hits
    assert asyncio.run(together(cached)) == asyncio.run(together(uncached))
    assert cached.prompt_cache_stats().hits >= hits + 2


@pytest.mark.mlx
def test_a_second_request_with_a_shared_system_prompt_reuses_its_tokens(tiny_model_dir: Path) -> None:
    engine = _engine(tiny_model_dir, 64 << 20)
    _, first = _run(engine, _params(("system", SYSTEM), ("user", "What is the capital of France?")))
    before = engine.prompt_cache_stats()
    assert (before.hits, before.misses, before.reused_tokens) == (0, 1, 0)
    assert before.entries == 1 and 0 < before.size_bytes <= before.budget_bytes
    _, second = _run(engine, _params(("system", SYSTEM), ("user", "Hello, world!")))
    after = engine.prompt_cache_stats()
    assert (after.hits, after.misses) == (1, 1)
    # At least the system prompt was reused (it is most of both prompts), not the whole prompt.
    assert first.usage.prompt_tokens // 2 < after.reused_tokens < second.usage.prompt_tokens


@pytest.mark.mlx
def test_a_multi_turn_chat_reuses_the_previous_turn(tiny_model_dir: Path) -> None:
    engine = _engine(tiny_model_dir, 64 << 20)
    turn1 = [("system", SYSTEM), ("user", "What is the capital of France?")]
    answer, outcome1 = _run(engine, _params(*turn1))
    turn2 = [*turn1, ("assistant", answer), ("user", "And of Italy?")]
    _, outcome2 = _run(engine, _params(*turn2))
    assert engine.prompt_cache_stats().reused_tokens >= outcome1.usage.prompt_tokens
    assert outcome2.usage.prompt_tokens > outcome1.usage.prompt_tokens


@pytest.mark.mlx
def test_the_engine_cache_stays_within_its_budget(tiny_model_dir: Path) -> None:
    probe = _engine(tiny_model_dir, 64 << 20)
    _run(probe, _params(("user", "What is the capital of France?")))
    one_entry = probe.prompt_cache_stats().size_bytes
    engine = _engine(tiny_model_dir, one_entry * 3 // 2)  # room for one such entry, not two
    for question in ("Hello", "What is the capital of France?", "Numbers like 1, 2, 3", "Hi there"):
        _run(engine, _params(("user", question)))
        stats = engine.prompt_cache_stats()
        assert stats.size_bytes <= stats.budget_bytes
    assert engine.prompt_cache_stats().entries == 1


# ---- the heartbeat ------------------------------------------------------------------------------


def _report(engine: Any) -> InstanceReport:
    runner = Runner(
        node_id=NodeId("n"),
        instance_id=InstanceId("n/0"),
        model=ModelId("tiny"),
        engine=engine,
        send=lambda _: None,
    )
    return runner.report()


@pytest.mark.mlx
def test_the_runner_report_carries_the_engine_cache_stats(tiny_model_dir: Path) -> None:
    engine = _engine(tiny_model_dir, 64 << 20)
    _run(engine, _params(("system", SYSTEM), ("user", "Hi")))
    _run(engine, _params(("system", SYSTEM), ("user", "Hello")))
    stats = _report(engine).prompt_cache
    assert stats == engine.prompt_cache_stats()
    assert stats is not None and stats.hits == 1 and stats.reused_tokens > 0 and stats.size_bytes > 0


def test_an_engine_without_a_prompt_cache_reports_none() -> None:
    assert _report(SimEngine(50.0, seed_salt="")).prompt_cache is None


@pytest.mark.mlx
def test_the_worker_heartbeat_carries_each_instance_cache_stats(tiny_model_dir: Path) -> None:
    from exo_worker.bus import parse_master_address
    from exo_worker.engine_choice import EngineName, build_engine_factory
    from exo_worker.worker import WorkerConfig, WorkerDaemon

    factory = build_engine_factory(
        EngineName.MLX, str(tiny_model_dir), 50.0, max_concurrency=2, prompt_cache_bytes=1 << 20
    )
    config = WorkerConfig(
        node_id=NodeId("n"), master=parse_master_address("127.0.0.1:1"), model=ModelId("tiny"), instances=2
    )
    daemon = WorkerDaemon(config, factory)
    heartbeat = daemon.snapshot()
    assert [r.prompt_cache for r in heartbeat.instances] == [PromptCacheStats(budget_bytes=1 << 20)] * 2


@pytest.mark.mlx
def test_the_mlx_engine_factory_sizes_the_batch_and_the_cache(tiny_model_dir: Path) -> None:
    from exo_worker.engine_choice import EngineName, build_engine_factory

    factory = build_engine_factory(
        EngineName.MLX, str(tiny_model_dir), 50.0, max_concurrency=3, prompt_cache_bytes=12345
    )
    engine = factory(InstanceId("n/0"))
    assert isinstance(engine, MlxEngine)
    assert (engine.max_batch, engine.prompt_cache_stats().budget_bytes) == (3, 12345)
