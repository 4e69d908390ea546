"""MlxEngine: text generation with mlx-lm, continuously batched, on a thread of its own.

mlx and mlx_lm are imported inside methods: importing this module stays cheap, and the sim engine
never pays for them.

All MLX work of an engine (load, warm-up, batch steps) runs on its `MlxThread` (see mlx_thread.py
for why). `run()` hands a request to that thread and awaits its outcome; up to `max_batch` requests
decode together in one `BatchScheduler` batch (batch_scheduler.py), the rest wait for a slot. Each
engine keeps a `PromptCache` (prompt_cache.py), so a prompt sharing a prefix with an earlier one
only processes its new tokens.

Prompts are processed in chunks between decode steps (`prefill_chunk`, 0: sized automatically from
the measured prefill rate; see batch_scheduler.py), so a long prompt neither stalls the sequences
already decoding nor delays its own cancel by more than one chunk. The engine measures its prefill
and decode rates and reports its work (`work()`) for the worker's heartbeats.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import threading
from pathlib import Path
from typing import Any

import msgspec
import structlog

from exo_worker import sampling_defaults
from exo_worker.batch_scheduler import BatchScheduler, GenRequest, one_line
from exo_worker.engine import EngineError, ModelLoadError, ProgressSink, RunOutcome, TextSink, fit_completion
from exo_worker.mlx_thread import MlxThread
from exo_worker.models import looks_like_hub_id
from exo_worker.prompt_cache import PromptCache, default_budget_bytes
from exo_worker.text_delivery import Delivery
from exo_worker.tool_calls import format_of, run_with_tools
from exo_worker.work_meter import WorkMeter
from protocol.messages import InstanceWork, PromptCacheStats, TaskKind, TaskParams, TextGenerationParams


def _validate(params: TextGenerationParams) -> None:
    if params.max_tokens < 1:
        raise EngineError(f"max_tokens must be at least 1, got {params.max_tokens}")
    if params.temperature is not None and params.temperature < 0:
        raise EngineError(f"temperature must be >= 0, got {params.temperature}")
    if params.top_p is not None and not 0 < params.top_p <= 1:
        raise EngineError(f"top_p must be in (0, 1], got {params.top_p}")
    if not params.messages and params.prompt is None:
        raise EngineError("messages must not be empty")


class MlxEngine:
    """Serves TextGeneration tasks from one MLX model (a local directory or a Hub repo id).

    `max_batch` sequences decode together (the worker passes its --max-concurrency); the prompt
    cache holds at most `prompt_cache_bytes` (default: from the memory available at start).
    """

    def __init__(
        self,
        model: str | Path,
        label: str | None = None,
        *,
        max_batch: int = 4,
        prompt_cache_bytes: int | None = None,
        prefill_chunk: int = 0,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if prefill_chunk < 0:
            raise ValueError(f"prefill_chunk must be >= 0 (0: automatic), got {prefill_chunk}")
        self._prefill_chunk = prefill_chunk
        self._meter = WorkMeter(prefill_chunk)
        self._context_length = 0
        self._source = str(model)
        self._label = label or self._source
        self._log = structlog.get_logger(__name__).bind(model=self._label)
        self._max_batch = max_batch
        self._cache_bytes = default_budget_bytes() if prompt_cache_bytes is None else prompt_cache_bytes
        if self._cache_bytes < 0:
            raise ValueError(f"prompt_cache_bytes must be >= 0, got {self._cache_bytes}")
        self._model: Any = None
        self._tokenizer: Any = None
        self._prompt_cache: PromptCache | None = None
        self._thread: MlxThread | None = None  # started by the first load
        self._scheduler: BatchScheduler | None = None

    @property
    def kinds(self) -> tuple[TaskKind, ...]:
        return (TaskKind.TEXT_GENERATION,)

    @property
    def max_batch(self) -> int:
        return self._max_batch

    @property
    def context_length(self) -> int:
        """The model's context in tokens (its max_position_embeddings); 0 before load or unknown."""
        return self._context_length

    def work(self) -> InstanceWork:
        snapshot = self._meter.snapshot
        waiting = self._thread.waiting if self._thread is not None else 0
        return msgspec.structs.replace(snapshot, waiting=waiting) if waiting else snapshot

    def prompt_cache_stats(self) -> PromptCacheStats:
        if self._prompt_cache is None:
            return PromptCacheStats(budget_bytes=self._cache_bytes)
        return self._prompt_cache.stats()

    def close(self) -> None:
        """Stop the engine's MLX thread (also done at interpreter exit). The engine cannot run again."""
        if self._thread is not None:
            self._thread.close()

    # ---- load ------------------------------------------------------------------------------

    async def load(self, progress: ProgressSink | None = None) -> None:
        if self._model is not None:
            return
        loop = asyncio.get_running_loop()

        def report(what: str, fraction: float) -> None:
            if progress is not None:
                with contextlib.suppress(RuntimeError):  # the loop is gone: nobody to tell
                    loop.call_soon_threadsafe(progress, what, fraction)

        if self._thread is None:
            self._thread = MlxThread(f"mlx-{self._label}")
        try:
            await asyncio.wrap_future(self._thread.submit(lambda: self._load_blocking(report)))
        except ModelLoadError:
            # A failed engine is usually dropped: do not keep an idle thread (a retry starts a new one).
            self.close()
            self._thread = None
            raise

    def _load_blocking(self, report: ProgressSink) -> None:
        if self._model is not None:  # two concurrent load() calls: the second job finds it done
            return
        report("checking model files", 0.0)
        self._check_source()
        report("loading weights", 0.1)
        try:
            import mlx_lm

            model, tokenizer = mlx_lm.load(self._source)[:2]
            if not getattr(tokenizer, "has_chat_template", False):
                raise ModelLoadError(
                    f"cannot load model {self._source}: its tokenizer has no chat_template "
                    "(tokenizer_config.json), which text generation needs"
                )
            report("warming up", 0.8)
            prompt_cache = PromptCache(self._cache_bytes)
            default_sampling = sampling_defaults.for_model(self._source)
            context_length = int(getattr(getattr(model, "args", None), "max_position_embeddings", 0) or 0)
            scheduler = BatchScheduler(
                model,
                tokenizer,
                max_batch=self._max_batch,
                prompt_cache=prompt_cache,
                default_sampling=default_sampling,
                context_length=context_length,
                prefill_chunk=self._prefill_chunk,
                meter=self._meter,
            )
            self._warm_up(model, tokenizer)
        except ModelLoadError:
            raise
        except Exception as exc:  # mlx_lm raises many kinds (ValueError, FileNotFoundError, hub errors)
            raise ModelLoadError(f"cannot load model {self._source}: {one_line(exc)}") from exc
        assert self._thread is not None
        self._thread.attach(scheduler)
        self._model, self._tokenizer, self._prompt_cache = model, tokenizer, prompt_cache
        self._context_length = context_length
        self._scheduler = scheduler
        report("ready", 1.0)
        self._log.info("model loaded", source=self._source, default_sampling=default_sampling)

    def _check_source(self) -> None:
        """Fail with one clear line before mlx_lm does (a missing path gives a confusing hub error)."""
        path = Path(self._source).expanduser()
        if not path.exists():
            if looks_like_hub_id(self._source):
                return  # mlx_lm fetches it from the Hub; failures are wrapped by the caller
            raise ModelLoadError(f"model path does not exist: {path}")
        if not path.is_dir():
            raise ModelLoadError(f"model path is not a directory: {path}")
        config_path = path / "config.json"
        try:
            config = json.loads(config_path.read_text())
        except FileNotFoundError:
            raise ModelLoadError(f"no config.json in model directory {path}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"unreadable config.json in {path}: {one_line(exc)}") from exc
        if not isinstance(config, dict) or "model_type" not in config:
            raise ModelLoadError(f"bad config.json in {path}: expected an object with a model_type")
        if not any(path.glob("model*.safetensors")):
            raise ModelLoadError(f"no model*.safetensors weights in {path}")
        self._source = str(path)

    @staticmethod
    def _warm_up(model: Any, tokenizer: Any) -> None:
        # Two reasons to generate before reporting ready: a model that loads but cannot run fails
        # here, as a load error, not in every task; and on a machine whose MLX kernel cache
        # ($TMPDIR/mlx) is cold, the first call JIT-compiles kernels (0.5-0.7 s measured), which
        # would otherwise land in the first request's time to first token. Two sequences, so the
        # batched kernels are compiled too. The warm-up's prompts bypass the prompt cache.
        from mlx_lm.generate import BatchGenerator

        token = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        generator = BatchGenerator(model, completion_batch_size=2, prefill_batch_size=2)
        try:
            generator.insert([[token, token], [token]], max_tokens=[2, 2])
            for _ in range(16):  # a handful of steps ends it; the bound is a guard
                prompts, generated = generator.next()
                if not prompts and not generated:
                    break
        finally:
            generator.close()

    # ---- run -------------------------------------------------------------------------------

    async def run(self, params: TaskParams, on_text: TextSink, cancel: threading.Event) -> RunOutcome:
        fmt = format_of(self._tokenizer)
        required = isinstance(params, TextGenerationParams) and params.tool_choice == "required"

        async def generate(sink: TextSink) -> RunOutcome:
            return await self._generate(params, sink, cancel)

        return await run_with_tools(fmt, params, on_text, generate, opened=required)

    async def _generate(self, params: TaskParams, on_text: TextSink, cancel: threading.Event) -> RunOutcome:
        if not isinstance(params, TextGenerationParams):
            raise EngineError(f"MlxEngine serves TextGeneration only, not {params.KIND}")
        _validate(params)
        if self._model is None or self._thread is None or self._scheduler is None:
            raise EngineError(f"model {self._source} is not loaded")
        # Tokenized here, off the MLX thread: a prompt over the context fails now, not after
        # waiting for a batch step or a free slot behind a long prefill.
        prompt = await asyncio.to_thread(self._scheduler.tokenize, params)
        fit_completion(params, len(prompt), self._context_length)
        # `cancel` is the request's one stop signal: the runner sets it to cancel, and so does this
        # coroutine when its awaiting task goes away. The future only carries the outcome back (it is
        # shielded, so the MLX thread never finds it cancelled).
        delivery = Delivery(asyncio.get_running_loop(), on_text, cancel)
        request = GenRequest(
            params=params,
            delivery=delivery,
            stopped=cancel.is_set,
            future=concurrent.futures.Future(),
            prompt=prompt,
        )
        self._thread.enqueue(request)
        outcome = asyncio.wrap_future(request.future)
        try:
            return await asyncio.shield(outcome)
        except asyncio.CancelledError:
            delivery.abandon()
            outcome.add_done_callback(_discard)  # settled later by the MLX thread; nobody reads it
            raise


def _discard(outcome: asyncio.Future[RunOutcome]) -> None:
    if not outcome.cancelled():
        outcome.exception()  # retrieved, so asyncio does not log it as never retrieved
