"""Lockstep SPMD: rank 0 decides every batch operation, the followers replay them in the same order.

Every step of a sharded model is a collective (an all-reduce per layer, or a send/recv chain), so
every rank must run the same sequence of batch operations on the same sequences: the same inserts
(same prompt tokens, same cached prefix, same sampler), the same steps, the same removals, and the
same prompt-cache inserts (the prompt cache decides how many tokens the next insert processes).

Rank 0 runs the ordinary `BatchScheduler` (admission, cancellation, stop strings, delivery, the
prompt cache) with two wrappers that broadcast what it does before (step) or right after (insert,
remove, cache insert) doing it: `BroadcastingGenerator` around mlx-lm's `BatchGenerator` and
`BroadcastingPromptCache` around the prompt cache. A follower's `Mirror` applies the commands to
its own generator and prompt cache. Nothing is decided on a follower, so nothing can diverge; the
checks it makes (uids, cached-prefix lengths) only catch bugs, as a `LockstepError`.

Why the prompt caches stay identical: their operations are replayed in order, lookups have no
side effects, and eviction depends on byte counts, which are the same on every rank when the byte
budget is set per local layer (tensor: every rank holds 1/K of every layer's KV heads; pipeline:
a rank's KV bytes are its layer count times the same per-layer size).

Sampled (temperature > 0) requests must draw the same token on every rank: rank 0 gives every
unseeded request a seed (engine.py), and a seeded sampler draws from its own key.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from exo_worker import sampling_defaults
from exo_worker.batch_scheduler import BatchScheduler, GenRequest
from exo_worker.distributed.control import (
    CacheInsert,
    Command,
    Insert,
    Message,
    Remove,
    Reset,
    Start,
    Step,
    Warmup,
)
from exo_worker.engine import EngineError, InstanceLost
from exo_worker.prompt_cache import PromptCache
from exo_worker.sampling import make_request_sampler
from exo_worker.work_meter import WorkMeter

Send = Callable[[Message], None]


class LockstepError(RuntimeError):
    """A follower's state does not match rank 0's: the instance cannot go on."""


def generator_settings(generator: Any) -> dict[str, Any]:
    """The settings of rank 0's BatchGenerator that a follower's must copy (for `Start`)."""
    return {
        "completion_batch_size": generator.completion_batch_size,
        "prefill_batch_size": generator.prefill_batch_size,
        "prefill_step_size": generator.prefill_step_size,
        "max_kv_size": generator.max_kv_size,
    }


def follower_generator(model: Any, tokenizer: Any, start: Start) -> Any:
    """A follower's BatchGenerator: rank 0's settings (from `Start`), the same stop tokens."""
    from mlx_lm.generate import BatchGenerator

    eos = [[token] for token in sorted(tokenizer.eos_token_ids)]
    optional: dict[str, Any] = {"max_kv_size": start.max_kv_size}
    for name in ("completion_batch_size", "prefill_batch_size", "prefill_step_size"):
        if getattr(start, name):
            optional[name] = getattr(start, name)
    return BatchGenerator(model, stop_tokens=eos, **optional)


def warm_up(model: Any, tokenizer: Any) -> None:
    """MlxEngine's warm-up, run by every rank together (it steps the model, so it is collective)."""
    from exo_worker.mlx_engine import MlxEngine

    MlxEngine._warm_up(model, tokenizer)


# ---- rank 0 --------------------------------------------------------------------------------------


class BroadcastingGenerator:
    """A BatchGenerator that tells the followers about every operation, in order."""

    def __init__(self, inner: Any, send: Send, on_failure: Callable[[BaseException], None]) -> None:
        self.inner = inner
        self._send = send
        self._on_failure = on_failure
        self.pending: sampling_defaults.Sampling | None = None  # set by the scheduler's admit()
        self.pending_seed: int | None = None

    def insert(
        self,
        prompts: list[list[int]],
        max_tokens: list[int],
        caches: list[Any],
        all_tokens: list[list[int]],
        samplers: list[Any],
    ) -> list[int]:
        assert len(prompts) == 1 and self.pending is not None, "one admission at a time"
        uids: list[int] = self.inner.insert(
            prompts, max_tokens=max_tokens, caches=caches, all_tokens=all_tokens, samplers=samplers
        )
        self._send(
            Insert(
                uid=uids[0],
                prompt=[*all_tokens[0], *prompts[0]],
                reused=len(all_tokens[0]),
                max_tokens=max_tokens[0],
                temperature=self.pending.temperature,
                top_p=self.pending.top_p,
                seed=self.pending_seed,
            )
        )
        return uids

    @property
    def prefill_step_size(self) -> int:
        size: int = self.inner.prefill_step_size
        return size

    @prefill_step_size.setter
    def prefill_step_size(self, size: int) -> None:  # the scheduler's chunk for the next step
        self.inner.prefill_step_size = size

    def stats(self) -> Any:
        return self.inner.stats()

    def next(self) -> Any:
        # First: the followers must enter the step's collectives too, with the same prefill chunk.
        self._send(Step(prefill_step_size=self.inner.prefill_step_size))
        try:
            return self.inner.next()
        except Exception as exc:  # after a failed collective the ranks are out of step for good
            self._on_failure(exc)
            raise

    def remove(self, uids: list[int], return_prompt_caches: bool = False) -> Any:
        self._send(Remove(uids=list(uids), keep_cache=return_prompt_caches))
        return self.inner.remove(uids, return_prompt_caches=return_prompt_caches)

    def close(self) -> None:
        self._send(Reset())
        self.inner.close()


class BroadcastingPromptCache(PromptCache):
    def __init__(self, budget_bytes: int, send: Send) -> None:
        super().__init__(budget_bytes)
        self._send = send

    def insert(self, tokens: list[int], cache: list[Any]) -> None:
        self._send(CacheInsert(tokens=list(tokens)))
        super().insert(tokens, cache)


class ShardedBatchScheduler(BatchScheduler):
    """rank 0's BatchScheduler: the same decisions, every one of them broadcast."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_batch: int,
        prompt_cache: BroadcastingPromptCache,
        send: Send,
        on_failure: Callable[[BaseException], None],
        default_sampling: sampling_defaults.Sampling = sampling_defaults.CONSERVATIVE,
        context_length: int = 0,
        prefill_chunk: int = 0,
        meter: WorkMeter | None = None,
    ) -> None:
        self._send = send
        self._on_failure = on_failure
        super().__init__(
            model,
            tokenizer,
            max_batch=max_batch,
            prompt_cache=prompt_cache,
            default_sampling=default_sampling,
            context_length=context_length,
            prefill_chunk=prefill_chunk,
            meter=meter,
        )

    def _new_generator(self) -> Any:
        # The base class builds the generator (its settings are the scheduler's business); the
        # followers copy them from `start()`.
        return BroadcastingGenerator(super()._new_generator(), self._send, self._on_failure)

    def fail_all(self, error: EngineError, *, restart: bool = True) -> None:
        # A failed step leaves the ranks out of step for good (the generator declared the instance
        # lost): the requests fail as the instance's loss, not as their own fault. (restart=False
        # is the engine closing: that error stays as it is.)
        if restart and error.code is None:
            error = InstanceLost(f"sharded instance lost a rank: {error}")
        super().fail_all(error, restart=restart)

    def start(self, cache_bytes_per_layer: int) -> Start:
        """The `Start` message that makes a follower's batch like this one."""
        settings = generator_settings(self._generator.inner)
        return Start(max_batch=self.max_batch, cache_bytes_per_layer=cache_bytes_per_layer, **settings)

    def admit(self, request: GenRequest) -> None:
        generator: BroadcastingGenerator = self._generator
        generator.pending = sampling_defaults.resolve(request.params, self._default_sampling)
        generator.pending_seed = request.params.seed
        try:
            super().admit(request)
        finally:
            generator.pending = None


# ---- a follower ----------------------------------------------------------------------------------


class Mirror:
    """A follower's batch: applies rank 0's commands to its own generator and prompt cache."""

    def __init__(self, model: Any, tokenizer: Any, start: Start, local_layers: int) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self._start = start
        self.prompt_cache = PromptCache(start.cache_bytes_per_layer * local_layers)
        self._generator = follower_generator(model, tokenizer, start)
        # KV caches of sequences that left the batch in the last step or removal, by their tokens:
        # rank 0 says which of them go into the prompt cache (CacheInsert), in its order.
        self._held: dict[tuple[int, ...], Any] = {}
        self.steps = 0

    def apply(self, command: Command) -> None:
        if isinstance(command, Step):
            if command.prefill_step_size > 0:
                self._generator.prefill_step_size = command.prefill_step_size
            self._step()
        elif isinstance(command, Insert):
            self._insert(command)
        elif isinstance(command, Remove):
            caches = self._generator.remove(command.uids, return_prompt_caches=command.keep_cache)
            for cache, tokens in (caches or {}).values():
                self._held[tuple(tokens)] = cache
        elif isinstance(command, CacheInsert):
            cache = self._held.pop(tuple(command.tokens), None)
            if cache is None:
                raise LockstepError(
                    f"rank 0 cached a sequence of {len(command.tokens)} tokens this rank lacks"
                )
            self.prompt_cache.insert(command.tokens, cache)
        elif isinstance(command, Reset):
            self._generator.close()
            self._generator = follower_generator(self._model, self._tokenizer, self._start)
            self._held.clear()
        elif isinstance(command, Warmup):
            warm_up(self._model, self._tokenizer)

    def _step(self) -> None:
        self._held.clear()
        _, responses = self._generator.next()
        self.steps += 1
        for response in responses:
            if response.finish_reason is not None:
                self._held[tuple(response.all_tokens)] = response.prompt_cache

    def _insert(self, command: Insert) -> None:
        from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

        prompt = command.prompt
        cache, reused = self.prompt_cache.fetch(prompt)
        if command.reused == 0:
            cache = make_prompt_cache(self._model)
        elif cache is None or reused < command.reused:
            raise LockstepError(f"rank 0 reused {command.reused} cached tokens, this rank has {reused}")
        elif reused > command.reused:
            trim_prompt_cache(cache, reused - command.reused)
        sampler = make_request_sampler(command.temperature, command.top_p, command.seed)
        (uid,) = self._generator.insert(
            [prompt[command.reused :]],
            max_tokens=[command.max_tokens],
            caches=[cache],
            all_tokens=[prompt[: command.reused]],
            samplers=[sampler],
        )
        if uid != command.uid:
            raise LockstepError(f"rank 0 inserted sequence {command.uid}, this rank {uid}")

    def close(self) -> None:
        self._generator.close()
