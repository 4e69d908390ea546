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

from protocol.messages import FinishReason, PromptCacheStats, TaskKind, TaskParams, ToolCall, Usage


class ModelLoadError(RuntimeError):
    """The model cannot be loaded (missing path, unreadable weights, bad config). One clear line."""


class EngineError(RuntimeError):
    """One task cannot be run (bad parameters for this model, backend failure). The task fails."""


@dataclass(frozen=True, slots=True)
class RunOutcome:
    finish_reason: FinishReason
    usage: Usage
    tool_calls: tuple[ToolCall, ...] = ()  # parsed from the output (exo_worker.tool_calls)


TextSink = Callable[[str], None]
ProgressSink = Callable[[str, float], None]  # (what is happening, fraction done 0..1)


class Engine(Protocol):
    @property
    def kinds(self) -> tuple[TaskKind, ...]: ...

    async def load(self, progress: ProgressSink | None = None) -> None: ...

    async def run(self, params: TaskParams, on_text: TextSink, cancel: threading.Event) -> RunOutcome: ...


@runtime_checkable
class ReportsPromptCache(Protocol):
    """An engine that keeps a prompt (KV) cache; the runner puts its stats into every heartbeat."""

    def prompt_cache_stats(self) -> PromptCacheStats: ...
