"""Output integrity: a task's text reaches its client whole, in order, or not at all.

PUB/SUB may lose, duplicate or (across reconnects) reorder chunks, and may lose a TaskFinished.
Chunks carry their index and TaskFinished the chunk count, so the relay can tell:
- duplicates (index already delivered or held) are dropped;
- early chunks are held in a bounded reorder window and released once the gap fills;
- a gap that does not fill within `fetch_after`, or a final that arrives before all its chunks,
  makes the master ask the worker (FetchOutput) for everything from the first missing index; the
  worker keeps a task's output until the master acknowledges it (TaskAck);
- a worker snapshot listing a task as finished whose final never arrived also triggers a fetch.
Only when the worker cannot supply the output after `max_fetches` tries does the client get an
error. So a normal finish always means exactly the engine's text.

What the relay keeps is per attempt: the task record's `held`, `final` and `fetches` are reset by
the lifecycle's `start_attempt` when the task is placed again, and a fetch scheduled for an earlier
attempt is dropped (its key names the attempt).
"""

from __future__ import annotations

from exo_master.core.affinity import AffinityIndex
from exo_master.core.config import CoreConfig
from exo_master.core.events import Step, TaskOutput
from exo_master.core.lifecycle import Fail, Finish, TaskRecord, TaskStatus
from exo_master.core.tasks import TaskBook
from protocol.ids import TaskId
from protocol.messages import FetchOutput, TaskAck, TaskFinished

Attempt = tuple[TaskId, int]  # a task id and its attempt number


def _attempt(task: TaskRecord) -> Attempt:
    return task.task_id, task.attempts


class OutputRelay:
    def __init__(self, config: CoreConfig, book: TaskBook, affinity: AffinityIndex | None) -> None:
        self.config = config
        self.affinity = affinity
        self.book = book
        self.stats = book.stats
        self.due: dict[Attempt, float] = {}  # attempts missing output -> when to ask the worker next

    def chunk(self, task: TaskRecord, index: int, text: str, step: Step) -> None:
        now = step.now
        if index < task.next_chunk or index in task.held:
            self.stats.duplicate_chunks += 1
            return
        if index > task.next_chunk:
            if len(task.held) >= self.config.reorder_window:
                self._lost(task, step, f"more than {self.config.reorder_window} chunks arrived out of order")
                return
            task.held[index] = text
            self.stats.chunks_out_of_order += 1
            self.due.setdefault(_attempt(task), now + self.config.fetch_after)
            return
        self._deliver(task, index, text, step)
        while task.next_chunk in task.held:
            self._deliver(task, task.next_chunk, task.held.pop(task.next_chunk), step)
        if task.final is not None and task.next_chunk >= (task.final.chunks or 0):
            self._complete(task, task.final, step)
        elif self.due and not task.held and task.final is None:
            self.due.pop(_attempt(task), None)  # the gap filled by itself: it was only reordering

    def finished(self, task: TaskRecord, msg: TaskFinished, step: Step) -> None:
        if msg.chunks is None or task.next_chunk >= msg.chunks:
            self._complete(task, msg, step)
            return
        task.final = msg  # chunks are still missing: hold the end until they are in
        self.due.setdefault(_attempt(task), step.now + self.config.fetch_after)

    def ended_on_worker(self, task: TaskRecord, now: float) -> None:
        """The worker's snapshot says the task ended there, but no final reached the master."""
        if task.final is None:
            self.due.setdefault(_attempt(task), now)

    def tick(self, step: Step) -> None:
        now = step.now
        for key, due in list(self.due.items()):
            task_id, attempt = key
            task = self.book.live.get(task_id)
            live = task is not None and task.status in (TaskStatus.RUNNING, TaskStatus.PENDING)
            if task is None or not live or task.attempts != attempt:  # over, or an earlier attempt's
                del self.due[key]
                continue
            if due > now:
                continue
            if task.fetches >= self.config.max_fetches:
                self._lost(task, step, f"its output could not be recovered after {task.fetches} requests")
                continue
            assert task.instance_id is not None and task.node_id is not None
            task.fetches += 1
            self.stats.output_fetches += 1
            self.due[key] = now + self.config.fetch_every
            step.emit(
                FetchOutput(
                    task_id=task_id,
                    node_id=task.node_id,
                    instance_id=task.instance_id,
                    from_index=task.next_chunk,
                    final=task.final is None,
                )
            )

    def _deliver(self, task: TaskRecord, index: int, text: str, step: Step) -> None:
        task.next_chunk = index + 1
        if task.reply_hash is not None:
            task.reply_hash.update(text.encode())
        step.emit(TaskOutput(task_id=task.task_id, index=index, text=text))

    def _complete(self, task: TaskRecord, msg: TaskFinished, step: Step) -> None:
        if self.due:
            self.due.pop(_attempt(task), None)
        node_id, instance_id = task.node_id, task.instance_id
        assert node_id is not None and instance_id is not None
        if self.affinity is not None and task.reply_hash is not None:
            # The next turn of this chat starts with the reply: its prefix is on this instance now.
            self.affinity.remember_reply(task.reply_hash.digest(), instance_id)
        self.book.advance(task, Finish(msg.finish_reason, msg.usage), step)
        step.emit(TaskAck(task_id=task.task_id, node_id=node_id, instance_id=instance_id))

    def _lost(self, task: TaskRecord, step: Step, why: str) -> None:
        self.due.pop(_attempt(task), None)
        self.stats.outputs_lost += 1
        where = f" from {task.instance_id}" if task.instance_id else ""
        message = f"output of task {task.task_id}{where} was lost: {why}"
        self.book.advance(task, Fail(message, unavailable=True), step)
