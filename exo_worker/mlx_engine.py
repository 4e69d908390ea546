"""MlxEngine: text generation with mlx-lm, run in a thread so the event loop keeps serving.

mlx and mlx_lm are imported inside methods: importing this module stays cheap, and the sim engine
never pays for them.

Threading model. Each engine runs all its MLX work (load and generation) on one thread of its own,
`_MlxThread`, one job at a time:
- one MLX model instance is not safe for concurrent generation (mlx_lm gives no such guarantee), so
  the engine's tasks must be serialized anyway; the job queue is that lock;
- MLX 0.32 on Linux may abort the whole process at exit ("terminate called without an active
  exception") when a thread that ran compiled MLX code ends without `mx.clear_streams()`. The
  default executor's threads (`asyncio.to_thread`) end at interpreter exit where nothing can run
  that call; our own thread runs it before it ends.
Several engines in one process may generate at once, so a seeded request samples with its own PRNG
key instead of seeding MLX's global generator, which the other engines also draw from.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import json
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from exo_worker.engine import EngineError, ModelLoadError, ProgressSink, RunOutcome, TextSink
from exo_worker.models import looks_like_hub_id
from protocol.messages import ChatMessage, FinishReason, TaskKind, TaskParams, TextGenerationParams, Usage

# How often the generation thread, waiting for the loop to take a piece of text, checks that the
# loop is still there. The wait is normally far shorter.
_POLL_S = 0.05
_CANCELLED = RunOutcome(finish_reason=FinishReason.CANCELLED, usage=Usage())


class StopStringFilter:
    """Cuts a text stream at the first stop string, even when a stop string spans several pieces.

    `feed` returns the text that is safe to emit now, and whether a stop string was found. It holds
    back the longest tail that could still grow into a stop string: a tail that is a proper prefix
    of one (so at most `len(longest stop) - 1` characters, usually none). On a hit, the text from
    the stop string on is dropped. "First" means the stop string completed first (the one ending
    earliest, the longest one on a tie): that is where a streaming generator has to stop, and it
    makes the result independent of how the text was cut into pieces. `flush` returns the held-back
    tail once the stream has ended without a hit.
    """

    def __init__(self, stops: Iterable[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._buffer = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        self._buffer += piece
        best: tuple[int, int] | None = None  # (end, start) of the first completed stop string
        for stop in self._stops:
            start = self._buffer.find(stop)
            if start >= 0 and (best is None or (start + len(stop), start) < best):
                best = (start + len(stop), start)
        if best is not None:
            out, self._buffer = self._buffer[: best[1]], ""
            return out, True
        hold = max((self._partial_match(stop) for stop in self._stops), default=0)
        cut = len(self._buffer) - hold
        out, self._buffer = self._buffer[:cut], self._buffer[cut:]
        return out, False

    def _partial_match(self, stop: str) -> int:
        """Length of the longest end of the buffer that is a proper prefix of `stop`."""
        for length in range(min(len(stop) - 1, len(self._buffer)), 0, -1):
            if self._buffer.endswith(stop[:length]):
                return length
        return 0

    def flush(self) -> str:
        out, self._buffer = self._buffer, ""
        return out


def _validate(params: TextGenerationParams) -> None:
    if params.max_tokens < 1:
        raise EngineError(f"max_tokens must be at least 1, got {params.max_tokens}")
    if params.temperature < 0:
        raise EngineError(f"temperature must be >= 0, got {params.temperature}")
    if not 0 < params.top_p <= 1:
        raise EngineError(f"top_p must be in (0, 1], got {params.top_p}")
    if not params.messages:
        raise EngineError("messages must not be empty")


def _make_sampler(temperature: float, top_p: float, seed: int | None) -> Callable[[Any], Any]:
    from mlx_lm.sample_utils import apply_top_p, make_sampler

    if temperature == 0 or seed is None:
        return make_sampler(temp=temperature, top_p=top_p)
    # make_sampler draws from MLX's global generator; a seed there would be disturbed by any other
    # engine sampling in this process. So a seeded request gets the same filtering and draw, with
    # its own key split once per token.
    import mlx.core as mx

    key = mx.random.key(seed)

    def sample(logprobs: Any) -> Any:
        nonlocal key
        key, subkey = mx.random.split(key)
        if 0 < top_p < 1:
            logprobs = apply_top_p(logprobs, top_p)
        return mx.random.categorical(logprobs * (1 / temperature), key=subkey)

    return sample


@dataclass(slots=True)
class _Job:
    fn: Callable[[], Any]
    future: concurrent.futures.Future[Any]
    stopped: Callable[[], bool] | None = None  # a queued generation that may be cancelled


class _MlxThread:
    """One thread running an engine's MLX jobs in order; it clears its MLX streams before it ends."""

    def __init__(self, name: str) -> None:
        self._jobs: deque[_Job] = deque()
        self._wake = threading.Condition()
        self._closed = False
        # A daemon thread, stopped by an atexit hook: atexit runs after the interpreter has joined
        # non-daemon threads, so a non-daemon thread idling on the queue would block exit.
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def submit(
        self, fn: Callable[[], Any], stopped: Callable[[], bool] | None = None
    ) -> concurrent.futures.Future[Any]:
        job = _Job(fn, concurrent.futures.Future(), stopped)
        with self._wake:
            if self._closed:
                raise EngineError("the engine is closed")
            self._jobs.append(job)
            self._wake.notify()
        return job.future

    def settle_stopped(self) -> None:
        """Finish queued generations that were cancelled while waiting, without waiting for their turn.

        Called by the running generation once per token, so a queued task's cancel is honoured
        within one token too.
        """
        with self._wake:
            stopped = [job for job in self._jobs if job.stopped is not None and job.stopped()]
            for job in stopped:
                self._jobs.remove(job)
        for job in stopped:
            if job.future.set_running_or_notify_cancel():
                job.future.set_result(_CANCELLED)

    def close(self, timeout: float = 10.0) -> None:
        """Run what is queued, then end the thread (clearing its MLX streams)."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        atexit.unregister(self.close)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _main(self) -> None:
        while True:
            with self._wake:
                while not self._jobs and not self._closed:
                    self._wake.wait()
                if not self._jobs:
                    break
                job = self._jobs.popleft()
            if job.future.set_running_or_notify_cancel():  # False: the awaiting task gave up first
                try:
                    job.future.set_result(job.fn())
                except BaseException as exc:
                    job.future.set_exception(exc)
        if "mlx.core" in sys.modules:
            import mlx.core as mx

            mx.clear_streams()


class _Delivery:
    """Hands text from the generation thread to `on_text` on the loop thread, one piece at a time.

    Each piece is scheduled with `loop.call_soon_threadsafe` and the generation thread waits until
    the loop has run it before it asks for the next token. That gives back-pressure, and it makes
    "stops within one token" hold as the consumer sees it: a cancel set from `on_text` is visible to
    the very next check. The wait costs one loop wake-up per token (well under a token's time).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, on_text: TextSink, abandoned: threading.Event):
        self._loop = loop
        self._on_text = on_text
        self._abandoned = abandoned
        self.error: BaseException | None = None

    def __call__(self, piece: str) -> None:
        if not piece or self._abandoned.is_set():
            return
        done = threading.Event()

        def deliver() -> None:
            try:
                self._on_text(piece)
            except BaseException as exc:
                self.error = exc
            finally:
                done.set()

        try:
            self._loop.call_soon_threadsafe(deliver)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self._abandoned.set()
            return
        while not done.wait(_POLL_S):
            if self._abandoned.is_set():
                return
            if self._loop.is_closed():
                self._abandoned.set()
                return
        if self.error is not None:
            raise EngineError(f"on_text failed: {type(self.error).__name__}: {self.error}") from self.error


class MlxEngine:
    """Serves TextGeneration tasks from one MLX model (a local directory or a Hub repo id)."""

    def __init__(self, model: str | Path, label: str | None = None) -> None:
        self._source = str(model)
        self._label = label or self._source
        self._log = structlog.get_logger(__name__).bind(model=self._label)
        self._model: Any = None
        self._tokenizer: Any = None
        self._thread: _MlxThread | None = None  # started by the first load

    @property
    def kinds(self) -> tuple[TaskKind, ...]:
        return (TaskKind.TEXT_GENERATION,)

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
            self._thread = _MlxThread(f"mlx-{self._label}")
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
            self._warm_up(model, tokenizer)
        except ModelLoadError:
            raise
        except Exception as exc:  # mlx_lm raises many kinds (ValueError, FileNotFoundError, hub errors)
            raise ModelLoadError(f"cannot load model {self._source}: {_one_line(exc)}") from exc
        self._model, self._tokenizer = model, tokenizer
        report("ready", 1.0)
        self._log.info("model loaded", source=self._source)

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
            raise ModelLoadError(f"unreadable config.json in {path}: {_one_line(exc)}") from exc
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
        # would otherwise land in the first request's time to first token.
        from mlx_lm import stream_generate

        token = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        for _ in stream_generate(model, tokenizer, [token], max_tokens=2):
            pass

    # ---- run -------------------------------------------------------------------------------

    async def run(self, params: TaskParams, on_text: TextSink, cancel: threading.Event) -> RunOutcome:
        if not isinstance(params, TextGenerationParams):
            raise EngineError(f"MlxEngine serves TextGeneration only, not {params.KIND}")
        _validate(params)
        if self._model is None or self._thread is None:
            raise EngineError(f"model {self._source} is not loaded")
        abandoned = threading.Event()  # the awaiting task went away: the job must stop

        def stopped() -> bool:
            return cancel.is_set() or abandoned.is_set()

        deliver = _Delivery(asyncio.get_running_loop(), on_text, abandoned)
        job = self._thread.submit(lambda: self._generate(params, deliver, stopped), stopped)
        try:
            outcome: RunOutcome = await asyncio.wrap_future(job)
        except asyncio.CancelledError:
            abandoned.set()
            raise
        return outcome

    def _generate(
        self, params: TextGenerationParams, deliver: _Delivery, stopped: Callable[[], bool]
    ) -> RunOutcome:
        """Runs on the engine's MLX thread."""
        from mlx_lm import stream_generate

        assert self._thread is not None
        if stopped():  # cancelled while queued
            return _CANCELLED
        prompt = self._encode_prompt(params.messages)
        sampler = _make_sampler(params.temperature, params.top_p, params.seed)
        stops = StopStringFilter(params.stop)
        finish, completion_tokens = FinishReason.LENGTH, 0
        responses = stream_generate(
            self._model, self._tokenizer, prompt, max_tokens=params.max_tokens, sampler=sampler
        )
        try:
            for response in responses:
                completion_tokens = response.generation_tokens
                text, hit = stops.feed(response.text)
                deliver(text)
                if hit:
                    finish = FinishReason.STOP
                    break
                if response.finish_reason is not None:  # the last response: "stop" (EOS) or "length"
                    finish = FinishReason.STOP if response.finish_reason == "stop" else FinishReason.LENGTH
                    break
                if stopped():
                    finish = FinishReason.CANCELLED
                    break
                self._thread.settle_stopped()
            if finish is not FinishReason.CANCELLED:
                deliver(stops.flush())
        except EngineError:
            raise
        except Exception as exc:
            self._log.exception("generation failed")
            raise EngineError(f"generation failed: {_one_line(exc)}") from exc
        finally:
            responses.close()  # runs mlx_lm's clean-up now, on this thread
        usage = Usage(prompt_tokens=len(prompt), completion_tokens=completion_tokens)
        return RunOutcome(finish_reason=finish, usage=usage)

    def _encode_prompt(self, messages: tuple[ChatMessage, ...]) -> list[int]:
        chat = [{"role": m.role, "content": m.content} for m in messages]
        try:
            text = self._tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            # The template already writes any BOS token, so the tokenizer must not add another.
            ids: list[int] = self._tokenizer.encode(text, add_special_tokens=False)
        except Exception as exc:
            raise EngineError(f"cannot build the prompt: {_one_line(exc)}") from exc
        if not ids:
            raise EngineError("the prompt is empty after applying the chat template")
        return ids


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
