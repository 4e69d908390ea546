"""Driving a Runner without sockets: a recording sink, engines a test controls, assignments."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from exo_worker.engine import ProgressSink, RunOutcome, TextSink
from exo_worker.runner import Runner
from protocol.ids import InstanceId, ModelId, NodeId, TaskId
from protocol.messages import (
    AssignTask,
    ChatMessage,
    FinishReason,
    TaskAccepted,
    TaskChunk,
    TaskFailed,
    TaskFinished,
    TaskKind,
    TaskParams,
    TextGenerationParams,
    Usage,
)

NODE = NodeId("node-a")
INSTANCE = InstanceId("node-a/0")
MODEL = ModelId("sim-model")
TIMEOUT = 5.0

Event = TaskAccepted | TaskChunk | TaskFinished | TaskFailed


class Recorder:
    """Collects runner events; lets a test await a condition on them (no sleeping)."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._changed = asyncio.Event()

    def send(self, event: Event) -> None:
        self.events.append(event)
        self._changed.set()

    async def until(self, predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    def of(self, task_id: str, kind: type[Event] | None = None) -> list[Event]:
        return [e for e in self.events if e.task_id == task_id and (kind is None or isinstance(e, kind))]

    def final(self, task_id: str) -> TaskFinished | TaskFailed | None:
        finals = [e for e in self.of(task_id) if isinstance(e, TaskFinished | TaskFailed)]
        return finals[-1] if finals else None

    async def final_of(self, task_id: str) -> TaskFinished | TaskFailed:
        await self.until(lambda: self.final(task_id) is not None)
        final = self.final(task_id)
        assert final is not None
        return final


class GateEngine:
    """A test engine whose tasks run until the test releases them (or they are cancelled)."""

    def __init__(self, kinds: tuple[TaskKind, ...] = (TaskKind.TEXT_GENERATION,)) -> None:
        self._kinds = kinds
        self.started: list[str] = []
        self.gates: dict[str, asyncio.Event] = {}
        self.started_changed = asyncio.Event()
        self.released_all = False

    @property
    def kinds(self) -> tuple[TaskKind, ...]:
        return self._kinds

    async def load(self, progress: ProgressSink | None = None) -> None:
        return None

    async def run(self, params: TaskParams, on_text: TextSink, cancel: threading.Event) -> RunOutcome:
        assert isinstance(params, TextGenerationParams)
        key = params.messages[0].content
        gate = self.gates.setdefault(key, asyncio.Event())
        if self.released_all:
            gate.set()
        self.started.append(key)
        self.started_changed.set()
        on_text(f"start {key}")
        await gate.wait()
        return RunOutcome(FinishReason.STOP, Usage(prompt_tokens=1, completion_tokens=1))

    def release(self, key: str) -> None:
        self.gates.setdefault(key, asyncio.Event()).set()

    def release_all(self) -> None:
        """Release every task, including those that have not started yet."""
        self.released_all = True
        for gate in self.gates.values():
            gate.set()

    async def until_started(self, count: int) -> None:
        async with asyncio.timeout(TIMEOUT):
            while len(self.started) < count:
                self.started_changed.clear()
                await self.started_changed.wait()


class FailingEngine(GateEngine):
    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    async def run(self, params: TaskParams, on_text: TextSink, cancel: threading.Event) -> RunOutcome:
        on_text("partial")
        raise self.error


def assign(
    task_id: str, content: str | None = None, max_tokens: int = 5, instance: str = INSTANCE
) -> AssignTask:
    params = TextGenerationParams(
        model=MODEL, messages=(ChatMessage(role="user", content=content or task_id),), max_tokens=max_tokens
    )
    return AssignTask(task_id=TaskId(task_id), node_id=NODE, instance_id=InstanceId(instance), params=params)


def make_runner(engine: Any, recorder: Recorder, **kwargs: Any) -> Runner:
    return Runner(
        node_id=NODE, instance_id=INSTANCE, model=MODEL, engine=engine, send=recorder.send, **kwargs
    )


def arun(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """Run an async test on a fresh event loop, with an overall deadline."""

    def wrapper() -> None:
        async def bounded() -> None:
            await asyncio.wait_for(test(), timeout=30)

        asyncio.run(bounded())

    wrapper.__name__ = test.__name__
    return wrapper


async def ready_runner(engine: Any, recorder: Recorder, **kwargs: Any) -> Runner:
    runner = make_runner(engine, recorder, **kwargs)
    await runner.load()
    return runner


async def close(runner: Runner, engine: Any = None) -> None:
    if isinstance(engine, GateEngine):
        engine.release_all()
    await runner.shutdown(grace=TIMEOUT)


def kinds_of(events: list[Event]) -> list[str]:
    return [type(e).__name__ for e in events]
