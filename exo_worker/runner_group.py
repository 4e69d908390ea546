"""The group of one worker's runners: routes the master's commands to them by instance id."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import structlog

from exo_worker.runner import Runner, Send
from protocol.ids import InstanceId, NodeId
from protocol.messages import AssignTask, CancelTask, FetchOutput, InstanceReport, TaskAck, TaskFailed

log = structlog.get_logger("exo_worker.runner")


class RunnerGroup:
    """All instances of one worker: routes AssignTask/CancelTask by instance id, builds snapshots."""

    def __init__(self, node_id: NodeId, runners: Sequence[Runner], send: Send) -> None:
        self.node_id = node_id
        self.runners: dict[InstanceId, Runner] = {r.instance_id: r for r in runners}
        self._send = send

    def handle_assign(self, assign: AssignTask) -> None:
        runner = self.runners.get(assign.instance_id)
        if runner is not None:
            runner.submit(assign)
            return
        # Not stored in any LRU: the answer is the same every time the duplicate comes back.
        log.warning("task.unknown_instance", task_id=assign.task_id, instance_id=assign.instance_id)
        known = ", ".join(self.runners) or "none"
        reason = f"unknown instance {assign.instance_id} on node {self.node_id} (instances: {known})"
        self._send(
            TaskFailed(
                node_id=self.node_id,
                task_id=assign.task_id,
                instance_id=assign.instance_id,
                reason=reason,
                refused=True,
            )
        )

    def handle_fetch(self, request: FetchOutput) -> None:
        runner = self.runners.get(request.instance_id)
        if runner is not None:
            runner.fetch(request)

    def handle_ack(self, ack: TaskAck) -> None:
        runner = self.runners.get(ack.instance_id)
        if runner is not None:
            runner.acknowledged(ack.task_id)

    def handle_cancel(self, cancel: CancelTask) -> None:
        runner = self.runners.get(cancel.instance_id)
        if runner is not None:
            runner.cancel(cancel.task_id)
            return
        # A cancel naming the wrong instance still reaches the task, wherever it runs here.
        for candidate in self.runners.values():
            candidate.cancel(cancel.task_id)

    def reports(self) -> tuple[InstanceReport, ...]:
        return tuple(r.report() for r in self.runners.values())

    async def load_all(self) -> None:
        """Load instances one after another (bounded peak memory); the first ModelLoadError stops it."""
        for runner in self.runners.values():
            await runner.load()

    async def shutdown(self, grace: float = 2.0) -> None:
        await asyncio.gather(*(r.shutdown(grace) for r in self.runners.values()))
