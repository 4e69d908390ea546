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
"""

from __future__ import annotations

from exo_master.core.affinity import AffinityIndex, reply_hasher
from exo_master.core.config import CoreConfig, CoreStats
from exo_master.core.events import Effect, TaskOutput
from exo_master.core.lifecycle import TaskRecord, TaskStatus
from exo_master.core.tasks import TaskBook
from protocol.ids import TaskId
from protocol.messages import FetchOutput, TaskAck, TaskFinished


class OutputRelay:
    def __init__(
        self,
        config: CoreConfig,
        book: TaskBook,
        stats: CoreStats,
        out: list[Effect],
        affinity: AffinityIndex | None = None,
    ) -> None:
        self.config = config
        self.affinity = affinity
        self.book = book
        self.stats = stats
        self.out = out
        self.due: dict[TaskId, float] = {}  # tasks missing output -> when to ask the worker next

    def chunk(self, task: TaskRecord, index: int, text: str, now: float) -> None:
        if index < task.next_chunk or index in task.held:
            self.stats.duplicate_chunks += 1
            return
        if index > task.next_chunk:
            if len(task.held) >= self.config.reorder_window:
                self._lost(task, now, f"more than {self.config.reorder_window} chunks arrived out of order")
                return
            task.held[index] = text
            self.stats.chunks_out_of_order += 1
            self.due.setdefault(task.task_id, now + self.config.fetch_after)
            return
        self._deliver(task, index, text)
        while task.next_chunk in task.held:
            self._deliver(task, task.next_chunk, task.held.pop(task.next_chunk))
        if task.final is not None and task.next_chunk >= (task.final.chunks or 0):
            self._complete(task, task.final, now)
        elif not task.held and task.final is None:
            self.due.pop(task.task_id, None)  # the gap filled by itself: it was only reordering

    def finished(self, task: TaskRecord, msg: TaskFinished, now: float) -> None:
        if msg.chunks is None or task.next_chunk >= msg.chunks:
            self._complete(task, msg, now)
            return
        task.final = msg  # chunks are still missing: hold the end until they are in
        self.due.setdefault(task.task_id, now + self.config.fetch_after)

    def ended_on_worker(self, task: TaskRecord, now: float) -> None:
        """The worker's snapshot says the task ended there, but no final reached the master."""
        if task.final is None:
            self.due.setdefault(task.task_id, now)

    def reset(self, task: TaskRecord) -> None:
        """A new attempt starts from nothing (called when the task is bound again)."""
        task.held.clear()
        task.final = None
        task.fetches = 0
        hashing = self.affinity is not None and task.chat_hash  # (an empty index is falsy: say "not None")
        task.reply_hash = reply_hasher(task.chat_hash) if hashing else None
        self.due.pop(task.task_id, None)

    def tick(self, now: float) -> None:
        for task_id, due in list(self.due.items()):
            task = self.book.live.get(task_id)
            if task is None or task.status not in (TaskStatus.RUNNING, TaskStatus.PENDING):
                del self.due[task_id]
                continue
            if due > now:
                continue
            if task.fetches >= self.config.max_fetches:
                self._lost(task, now, f"its output could not be recovered after {task.fetches} requests")
                continue
            assert task.instance_id is not None and task.node_id is not None
            task.fetches += 1
            self.stats.output_fetches += 1
            self.due[task_id] = now + self.config.fetch_every
            self.out.append(
                FetchOutput(
                    task_id=task_id,
                    node_id=task.node_id,
                    instance_id=task.instance_id,
                    from_index=task.next_chunk,
                    final=task.final is None,
                )
            )

    def _deliver(self, task: TaskRecord, index: int, text: str) -> None:
        task.next_chunk = index + 1
        if task.reply_hash is not None:
            task.reply_hash.update(text.encode())
        self.out.append(TaskOutput(task_id=task.task_id, index=index, text=text))

    def _complete(self, task: TaskRecord, msg: TaskFinished, now: float) -> None:
        self.due.pop(task.task_id, None)
        node_id, instance_id = task.node_id, task.instance_id
        assert node_id is not None and instance_id is not None
        if self.affinity is not None and task.reply_hash is not None:
            # The next turn of this chat starts with the reply: its prefix is on this instance now.
            self.affinity.remember_reply(task.reply_hash.digest(), instance_id)
        self.book.finish(task, now, msg.finish_reason, msg.usage, msg.tool_calls)
        self.out.append(TaskAck(task_id=task.task_id, node_id=node_id, instance_id=instance_id))

    def _lost(self, task: TaskRecord, now: float, why: str) -> None:
        self.due.pop(task.task_id, None)
        self.stats.outputs_lost += 1
        where = f" from {task.instance_id}" if task.instance_id else ""
        self.book.fail(task, now, f"output of task {task.task_id}{where} was lost: {why}", unavailable=True)
