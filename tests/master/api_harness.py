"""The HTTP app in-process: a real MasterRuntime and core, no bus, and a fake worker.

The fake worker watches the runtime's effects: for each AssignTask it answers (on the next loop
turn, never re-entrantly) with TaskAccepted, a few TaskChunks and TaskFinished, the way a worker
would over the bus (cut at the request's earliest stop string, which it then names). Modes let a
test refuse a node's assignments (to force a re-placement) or hold a task after its first chunk
(to stop the master mid-stream), or claim a stop sequence nobody asked for.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from starlette.testclient import TestClient
from starlette.types import ASGIApp

from exo_master.core import CoreConfig, MasterCore
from exo_master.core.events import Effect, NodeSubscribed
from exo_master.http.api import Api, build_app
from exo_master.http.bounds import ApiLimits
from exo_master.http.inference_metrics import InferenceMetrics
from exo_master.http.metrics import metrics_route
from exo_master.runtime import MasterRuntime
from protocol.messages import (
    AssignTask,
    FinishReason,
    TaskAccepted,
    TaskChunk,
    TaskFailed,
    TaskFinished,
    TextGenerationParams,
    Usage,
)
from tests.master.cluster import heartbeat, node_of, report

WORDS = ("alpha", "beta", "gamma", "delta")


@dataclass
class FakeWorker:
    runtime: MasterRuntime
    refuse_nodes: set[str] = field(default_factory=set)
    hold_after_first: bool = False
    assigned: list[AssignTask] = field(default_factory=list)
    first_chunk_sent: asyncio.Event | None = None
    forged_stop: str | None = None  # a stop sequence it claims ended every answer, asked for or not

    def __call__(self, effect: Effect) -> None:
        if isinstance(effect, AssignTask):
            self.assigned.append(effect)
            asyncio.get_running_loop().create_task(self._run(effect))

    async def _run(self, assign: AssignTask) -> None:
        ids = {"node_id": assign.node_id, "task_id": assign.task_id, "instance_id": assign.instance_id}
        if assign.node_id in self.refuse_nodes:
            await self.runtime.deliver(TaskFailed(**ids, reason="refused by the test", refused=True))
            return
        await self.runtime.deliver(TaskAccepted(**ids))
        params = assign.params
        count = min(params.max_tokens, len(WORDS)) if isinstance(params, TextGenerationParams) else 1
        pieces = [WORDS[index] if index == 0 else " " + WORDS[index] for index in range(count)]
        stop = None
        if not isinstance(params, TextGenerationParams):
            pieces = ["aW1hZ2U="]  # "image", base64
        else:
            pieces, stop = cut_at_stop(pieces, params.stop)
        for index, text in enumerate(pieces):
            await self.runtime.deliver(TaskChunk(**ids, index=index, text=text))
            if self.hold_after_first:
                if self.first_chunk_sent is not None:
                    self.first_chunk_sent.set()
                return  # never finishes: the test ends it
        reason = FinishReason.LENGTH if count == getattr(params, "max_tokens", -1) else FinishReason.STOP
        stop = self.forged_stop or stop
        reason = FinishReason.STOP if stop is not None else reason
        usage = Usage(prompt_tokens=3, completion_tokens=count)
        finished = TaskFinished(**ids, finish_reason=reason, usage=usage, stop_sequence=stop)
        await self.runtime.deliver(finished)


def cut_at_stop(pieces: list[str], stops: tuple[str, ...]) -> tuple[list[str], str | None]:
    """The pieces up to the earliest stop string in their text, and that stop (None: no cut)."""
    text = "".join(pieces)
    found = min(((text.find(s), len(s), s) for s in stops if s and s in text), default=None)
    if found is None:
        return pieces, None
    kept, at = [], 0
    for piece in pieces:
        if at + len(piece) > found[0]:
            piece = piece[: found[0] - at]
        if piece:
            kept.append(piece)
        at += len(piece)
        if at >= found[0]:
            break
    return kept, found[2]


def make_runtime(nodes: int = 2) -> MasterRuntime:
    runtime = MasterRuntime(MasterCore(CoreConfig(queue_limit=8)), bus=None)
    now = runtime.clock()
    for i in range(nodes):
        runtime.core.handle(NodeSubscribed(node_id=node_of(i)), now)
        runtime.core.handle(heartbeat(i, report(i, max_concurrency=4)), now)
    return runtime


@dataclass
class InProcess:
    runtime: MasterRuntime
    worker: FakeWorker
    app: ASGIApp
    inference: InferenceMetrics
    api: Api

    def client(self) -> TestClient:
        return TestClient(self.app)


def in_process(nodes: int = 2, limits: ApiLimits | None = None, **worker: object) -> InProcess:
    runtime = make_runtime(nodes)
    fake = FakeWorker(runtime, **worker)  # type: ignore[arg-type]
    runtime.effect_observers.append(fake)
    inference = InferenceMetrics()
    api = Api(runtime, limits or ApiLimits(), inference)
    app = build_app(runtime, extra_routes=[metrics_route(runtime, inference)], api=api)
    return InProcess(runtime, fake, app, inference, api)
