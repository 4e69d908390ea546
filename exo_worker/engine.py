"""The Engine interface: what a worker needs from an inference backend.

One engine object serves one model instance. `load` runs once before the instance reports ready.
`run` executes one task: it hands each piece of output text to `on_text` *on the event loop
thread*, checks `cancel` at least once per token, and returns how the task ended. Backends whose
work blocks (MLX) run it in a thread and marshal text back with `loop.call_soon_threadsafe`, so the
worker's bus keeps heartbeating while a model generates.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from protocol.messages import (
    INSTANCE_LOST,
    FinishReason,
    InstanceWork,
    PromptCacheStats,
    TaskKind,
    TaskParams,
    TextGenerationParams,
    ToolCall,
    Usage,
)


class ModelLoadError(RuntimeError):
    """The model cannot be loaded (missing path, unreadable weights, bad config). One clear line."""


class EngineError(RuntimeError):
    """One task cannot be run (bad parameters for this model, backend failure). The task fails."""

    # For clients, when the request itself is at fault (the master maps known codes to a 4xx).
    code: str | None = None


class ContextLengthExceeded(EngineError):
    """The prompt plus the completion asked for do not fit the model's context (HTTP 400)."""

    code = "context_length_exceeded"


class InstanceLost(EngineError):
    """The instance itself broke under the task (a sharded instance lost a rank): the master
    re-places the task when no output reached the client, else ends it with a 503."""

    code = INSTANCE_LOST


def fit_completion(params: TextGenerationParams, prompt_tokens: int, context_length: int) -> int:
    """The completion budget for a prompt of `prompt_tokens`: `params.max_tokens` when it fits the
    context, else capped by what the context leaves when the client gave no max_tokens; a request
    that cannot fit raises ContextLengthExceeded naming the numbers, as OpenAI and vLLM do.
    `context_length` 0 means unlimited."""
    wanted = params.max_tokens
    if context_length <= 0 or prompt_tokens + wanted <= context_length:
        return wanted
    room = context_length - prompt_tokens
    if not params.max_tokens_given and room >= 1:
        return room
    completion = wanted if params.max_tokens_given else 1
    raise ContextLengthExceeded(
        f"This model's maximum context length is {context_length} tokens. However, you requested "
        f"{prompt_tokens + completion} tokens ({prompt_tokens} in the messages, {completion} in the "
        "completion). Please reduce the length of the messages or completion."
    )


@dataclass(frozen=True, slots=True)
class RunOutcome:
    finish_reason: FinishReason
    usage: Usage
    tool_calls: tuple[ToolCall, ...] = ()  # parsed from the output (exo_worker.tool_calls)
    # The request's stop string that ended the answer (StopStringFilter.matched); None when the
    # answer ended otherwise (the model's end token, max_tokens, a cancel).
    stop_sequence: str | None = None

    def __post_init__(self) -> None:
        assert self.stop_sequence is None or self.finish_reason is FinishReason.STOP, (
            f"a stop sequence ended a run that finished with {self.finish_reason}"
        )


TextSink = Callable[[str], None]
ProgressSink = Callable[[str, float], None]  # (what is happening, fraction done 0..1)


class Engine(Protocol):
    @property
    def kinds(self) -> tuple[TaskKind, ...]: ...

    async def load(self, progress: ProgressSink | None = None) -> None: ...

    async def run(self, params: TaskParams, on_text: TextSink, cancel: threading.Event) -> RunOutcome: ...


@runtime_checkable
class ReportsWork(Protocol):
    """An engine that counts its own work; the runner puts it into every heartbeat."""

    @property
    def context_length(self) -> int: ...

    def work(self) -> InstanceWork: ...


@runtime_checkable
class ReportsPromptCache(Protocol):
    """An engine that keeps a prompt (KV) cache; the runner puts its stats into every heartbeat."""

    def prompt_cache_stats(self) -> PromptCacheStats: ...


@runtime_checkable
class ReportsFailure(Protocol):
    """An engine that can break after it loaded (a sharded instance that lost a rank): while
    `failure` is not None the runner reports the instance FAILED with it as the error."""

    @property
    def failure(self) -> str | None: ...
