"""ShardedEngine: rank 0 of a sharded instance, behind the ordinary Engine interface.

The runner talks to it like to an `MlxEngine` (which it extends): requests are admitted,
continuously batched, cancelled and cached by the same `BatchScheduler` code, on the same kind of
MLX thread. What differs:
- loading: wait (bounded) until every follower has said hello over the control channel, join the
  MLX ring, load this rank's shard, tell the followers the batch settings (`Start`), and warm up
  together;
- every batch operation is broadcast to the followers (lockstep.py);
- an unseeded request gets a seed, so a sampled token is the same on every rank;
- losing a rank (a silent or failed follower, or a failed step) ends the instance: every request
  in flight fails at once with an `EngineError` naming the lost rank, new ones fail too, the
  remaining followers are told to abort, and `wait_lost()` returns so the process can end (a
  collective on a lost peer may never return: leaving the process is the only sure way out).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
from pathlib import Path

import msgspec
import zmq

from exo_worker import sampling_defaults
from exo_worker.batch_scheduler import one_line
from exo_worker.distributed.control import Leader, Warmup
from exo_worker.distributed.lockstep import BroadcastingPromptCache, ShardedBatchScheduler, warm_up
from exo_worker.distributed.shard_load import load_shard
from exo_worker.distributed.topology import ShardSpec, init_group
from exo_worker.engine import InstanceLost, ModelLoadError, ProgressSink, RunOutcome, TextSink
from exo_worker.mlx_engine import MlxEngine
from protocol.messages import TaskParams, TextGenerationParams


class ShardedEngine(MlxEngine):
    def __init__(
        self,
        model: str | Path,
        spec: ShardSpec,
        label: str | None = None,
        *,
        max_batch: int = 4,
        prompt_cache_bytes: int | None = None,
        prefill_chunk: int = 0,
    ) -> None:
        if spec.rank != 0:
            raise ValueError("ShardedEngine is rank 0; ranks > 0 run exo_worker.distributed.follower")
        super().__init__(
            model,
            label,
            max_batch=max_batch,
            prompt_cache_bytes=prompt_cache_bytes,
            prefill_chunk=prefill_chunk,
        )
        self.spec = spec
        self._leader: Leader | None = None
        self._lost_reason: str | None = None
        self._lost_event = asyncio.Event()  # bound to the loop that first waits on it
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- loss ------------------------------------------------------------------------------

    @property
    def lost_reason(self) -> str | None:
        return self._lost_reason

    async def wait_lost(self) -> str:
        """Return (the reason) once the instance has lost a rank."""
        await self._lost_event.wait()
        assert self._lost_reason is not None
        return self._lost_reason

    def _on_lost(self, reason: str) -> None:  # on the leader thread
        self._lost_reason = reason
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
                self._loop.call_soon_threadsafe(self._lost_event.set)

    def _lost_error(self) -> InstanceLost:
        return InstanceLost(f"sharded instance lost a rank: {self._lost_reason}")

    # ---- load ------------------------------------------------------------------------------

    async def load(self, progress: ProgressSink | None = None) -> None:
        if self._model is not None:
            return
        self._loop = asyncio.get_running_loop()
        if self._leader is None:
            try:
                self._leader = Leader(
                    self.spec.control_bind, self.spec.size, self.spec.loss_timeout, self._on_lost
                )
            except (OSError, zmq.ZMQError) as exc:  # the port is taken, the host is not ours or unknown
                raise ModelLoadError(f"cannot listen on {self.spec.control_endpoint}: {exc}") from exc
        loading = asyncio.ensure_future(super().load(progress))
        lost = asyncio.ensure_future(self._lost_event.wait())
        try:
            timeout = self.spec.load_timeout
            await asyncio.wait({loading, lost}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if not loading.done() and self._lost_reason is None:
                self._leader.lose(f"the sharded load did not finish within {timeout:.0f} s")
                await asyncio.wait({lost}, timeout=5)  # the leader thread declares it at once
        finally:
            lost.cancel()
            if not loading.done():
                loading.cancel()
                loading.add_done_callback(lambda t: t.cancelled() or t.exception())
        if loading.done() and not loading.cancelled() and loading.exception() is not None:
            loading.result()  # rank 0's own load error says more than the loss it caused
        if self._lost_reason is not None or not loading.done():
            raise ModelLoadError(f"sharded load failed: {self._lost_reason or 'timed out'}")
        loading.result()

    def _load_blocking(self, report: ProgressSink) -> None:
        if self._model is not None:
            return
        leader = self._leader
        assert leader is not None
        report("checking model files", 0.0)
        self._check_source()
        report("waiting for the other ranks", 0.05)
        try:
            hellos = leader.wait_for_followers(self.spec.join_timeout)
        except (TimeoutError, RuntimeError) as exc:
            leader.lose(str(exc))
            raise ModelLoadError(f"sharded load failed: {exc}") from exc
        mine = self.spec.describe()
        for rank, hello in sorted(hellos.items()):
            if hello.spec != mine:
                leader.lose(f"rank {rank} disagrees on the instance: {hello.spec} vs rank 0's {mine}")
                raise ModelLoadError(f"rank {rank} was started with {hello.spec}, rank 0 with {mine}")
        try:
            report("joining the ring", 0.1)
            if not leader.flush(self.spec.loss_timeout):
                raise ModelLoadError("the control channel did not send rank 0's word to the followers")
            group = init_group(self.spec)
            leader.refresh()
            report("loading this rank's shard", 0.2)
            model, tokenizer, local_layers = load_shard(self._source, self.spec, group)
            if not getattr(tokenizer, "has_chat_template", False):
                raise ModelLoadError(f"cannot load model {self._source}: its tokenizer has no chat_template")
            per_layer = self._cache_bytes // max(1, local_layers)
            prompt_cache = BroadcastingPromptCache(per_layer * local_layers, leader.send)
            scheduler = ShardedBatchScheduler(
                model,
                tokenizer,
                max_batch=self._max_batch,
                prompt_cache=prompt_cache,
                send=leader.send,
                on_failure=lambda exc: leader.lose(f"a step failed on rank 0: {one_line(exc)}"),
                default_sampling=sampling_defaults.for_model(self._source),
                context_length=int(getattr(getattr(model, "args", None), "max_position_embeddings", 0) or 0),
                prefill_chunk=self._prefill_chunk,
                meter=self._meter,
            )
            leader.send(scheduler.start(per_layer))
            report("warming up", 0.8)
            leader.send(Warmup())
            warm_up(model, tokenizer)
        except ModelLoadError:
            leader.lose("rank 0 could not load")
            raise
        except Exception as exc:  # the ring, mlx_lm and the loader raise many kinds
            leader.lose(f"rank 0 could not load: {one_line(exc)}")
            raise ModelLoadError(f"cannot load shard 0 of {self._source}: {one_line(exc)}") from exc
        assert self._thread is not None
        self._thread.attach(scheduler)
        self._model, self._tokenizer, self._prompt_cache = model, tokenizer, prompt_cache
        self._context_length = scheduler.context_length
        self._scheduler = scheduler
        report("ready", 1.0)
        self._log.info(
            "shard.ready",
            rank=0,
            ranks=self.spec.size,
            sharding=self.spec.sharding.value,
            layers=local_layers,
        )

    # ---- run -------------------------------------------------------------------------------

    async def run(self, params: TaskParams, on_text: TextSink, cancel: threading.Event) -> RunOutcome:
        if self._lost_reason is not None:
            raise self._lost_error()
        if isinstance(params, TextGenerationParams) and params.seed is None:
            # Every rank samples with this seed's key, so a sampled token is the same everywhere.
            params = msgspec.structs.replace(params, seed=secrets.randbits(62))
        running = asyncio.ensure_future(super().run(params, on_text, cancel))
        lost = asyncio.ensure_future(self._lost_event.wait())
        try:
            await asyncio.wait({running, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
            if not running.done():
                running.cancel()  # MlxEngine.run marks the request abandoned: its text stops
                running.add_done_callback(lambda t: t.cancelled() or t.exception())
        if running.done() and not running.cancelled() and running.exception() is None:
            return running.result()  # it ended just as a rank was lost: the answer is whole
        if self._lost_reason is not None:
            raise self._lost_error()
        return running.result()

    def close(self) -> None:
        super().close()  # the MLX thread ends its current step first (bounded)
        if self._leader is not None:
            self._leader.close()
