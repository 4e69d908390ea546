"""Output integrity: a task's text reaches its client whole, in order, or not at all.

PUB/SUB may lose, duplicate or (across reconnects) reorder chunks, and may lose a TaskFinished.
Chunks carry their index and TaskFinished the chunk count, so the relay can tell:
- duplicates (index already delivered or held) are dropped;
- early chunks are held in a bounded reorder window and released once the gap fills (past the
  window a chunk is dropped and fetched again later, so a long stream never fails for its length);
- a gap that does not fill within `fetch_after`, or a final that arrives before all its chunks,
  makes the master ask the worker (FetchOutput) for exactly the missing ranges: every gap below
  the highest chunk held, plus the tail when the stream is known to have ended; the worker keeps a
  task's output until the master acknowledges it (TaskAck);
- a worker snapshot listing a task as finished whose final never arrived also triggers a fetch.

The fetch budget is per gap, not per task: a round is asked every `fetch_every` while anything is
missing, and the task fails only when its lowest gap has seen `max_fetches` rounds without
progress (no missing chunk filled there, no final arrived). Later gaps ride along in the same
requests, so a 1,000-chunk stream at heavy loss costs rounds in proportion to the loss, not to
the stream, and a normal finish still always means exactly the engine's text.

What the relay keeps is per attempt: the task record's `held`, `final` and `fetches` are reset by
the lifecycle's `start_attempt` when the task is placed again, and a recovery left from an earlier
attempt is dropped (its key names the attempt).
"""

from __future__ import annotations

from dataclasses import dataclass

from exo_master.core.affinity import AffinityIndex
from exo_master.core.config import CoreConfig
from exo_master.core.events import Step, TaskOutput
from exo_master.core.lifecycle import Fail, Finish, TaskRecord, TaskStatus
from exo_master.core.tasks import TaskBook
from protocol.ids import TaskId
from protocol.messages import MAX_COUNT, MAX_GAPS_PER_FETCH, FetchOutput, TaskAck, TaskFinished

Attempt = tuple[TaskId, int]  # a task id and its attempt number


def _attempt(task: TaskRecord) -> Attempt:
    return task.task_id, task.attempts


@dataclass(slots=True)
class _Recovery:
    """What the relay knows about one attempt that is missing output."""

    due: float  # when to ask the worker next
    rounds: int = 0  # requests since the lowest gap last made progress
    mark: tuple[int, bool] = (-1, False)  # (next_chunk, final known) at that progress
    tail: bool = False  # the stream ended on the worker (or overflowed the window): ask past `held`


class OutputRelay:
    def __init__(self, config: CoreConfig, book: TaskBook, affinity: AffinityIndex | None) -> None:
        self.config = config
        self.affinity = affinity
        self.book = book
        self.stats = book.stats
        self.missing: dict[Attempt, _Recovery] = {}  # attempts missing output

    def chunk(self, task: TaskRecord, index: int, text: str, step: Step) -> None:
        now = step.now
        if index < task.next_chunk or index in task.held:
            self.stats.duplicate_chunks += 1
            return
        if index > task.next_chunk:
            if len(task.held) >= self.config.reorder_window:
                # Past the window: drop it, and ask for everything past what is held later on.
                self.stats.chunks_beyond_window += 1
                self._expect(task, now + self.config.fetch_after).tail = True
                return
            task.held[index] = text
            self.stats.chunks_out_of_order += 1
            self._expect(task, now + self.config.fetch_after)
            return
        self._deliver(task, index, text, step)
        while task.next_chunk in task.held:
            self._deliver(task, task.next_chunk, task.held.pop(task.next_chunk), step)
        if task.final is not None and task.next_chunk >= (task.final.chunks or 0):
            self._complete(task, task.final, step)
            return
        if self.missing and not task.held and task.final is None:
            key = _attempt(task)
            rec = self.missing.get(key)
            if rec is not None and not rec.tail:
                del self.missing[key]  # the gap filled by itself: it was only reordering

    def finished(self, task: TaskRecord, msg: TaskFinished, step: Step) -> None:
        if msg.chunks is None or task.next_chunk >= msg.chunks:
            self._complete(task, msg, step)
            return
        task.final = msg  # chunks are still missing: hold the end until they are in
        self._expect(task, step.now + self.config.fetch_after)

    def ended_on_worker(self, task: TaskRecord, now: float) -> None:
        """The worker's snapshot says the task ended there, but no final reached the master."""
        if task.final is None:
            rec = self._expect(task, now)
            rec.tail = True
            rec.due = min(rec.due, now)

    def tick(self, step: Step) -> None:
        now = step.now
        for key, rec in list(self.missing.items()):
            task_id, attempt = key
            task = self.book.live.get(task_id)
            live = task is not None and task.status in (TaskStatus.RUNNING, TaskStatus.PENDING)
            if task is None or not live or task.attempts != attempt:  # over, or an earlier attempt's
                del self.missing[key]
                continue
            if rec.due > now:
                continue
            progress = (task.next_chunk, task.final is not None)
            if progress != rec.mark:
                rec.mark, rec.rounds = progress, 0
            if rec.rounds >= self.config.max_fetches:
                why = f"chunk {task.next_chunk} did not arrive after {rec.rounds} requests"
                self._lost(task, step, f"its output could not be recovered: {why}")
                continue
            assert task.instance_id is not None and task.node_id is not None
            rec.rounds += 1
            task.fetches += 1
            self.stats.output_fetches += 1
            rec.due = now + self.config.fetch_every
            step.emit(
                FetchOutput(
                    task_id=task_id,
                    node_id=task.node_id,
                    instance_id=task.instance_id,
                    from_index=task.next_chunk,  # an older worker sends everything from here on
                    final=task.final is None,
                    gaps=missing_ranges(task, tail=rec.tail),
                )
            )

    def _expect(self, task: TaskRecord, due: float) -> _Recovery:
        key = _attempt(task)
        rec = self.missing.get(key)
        if rec is None:
            rec = self.missing[key] = _Recovery(due=due)
        return rec

    def _deliver(self, task: TaskRecord, index: int, text: str, step: Step) -> None:
        task.next_chunk = index + 1
        if task.reply_hash is not None:
            task.reply_hash.update(text.encode())
        step.emit(TaskOutput(task_id=task.task_id, index=index, text=text))

    def _complete(self, task: TaskRecord, msg: TaskFinished, step: Step) -> None:
        if self.missing:
            self.missing.pop(_attempt(task), None)
        node_id, instance_id = task.node_id, task.instance_id
        assert node_id is not None and instance_id is not None
        if self.affinity is not None and task.reply_hash is not None:
            # The next turn of this chat starts with the reply: its prefix is on this instance now.
            self.affinity.remember_reply(task.reply_hash.digest(), instance_id)
        finish = Finish(msg.finish_reason, msg.usage, msg.tool_calls, msg.stop_sequence)
        self.book.advance(task, finish, step)
        step.emit(TaskAck(task_id=task.task_id, node_id=node_id, instance_id=instance_id))

    def _lost(self, task: TaskRecord, step: Step, why: str) -> None:
        self.missing.pop(_attempt(task), None)
        self.stats.outputs_lost += 1
        where = f" from {task.instance_id}" if task.instance_id else ""
        message = f"output of task {task.task_id}{where} was lost: {why}"
        self.book.advance(task, Fail(message, unavailable=True), step)


def missing_ranges(task: TaskRecord, *, tail: bool) -> tuple[tuple[int, int], ...]:
    """The [start, end) index ranges the master lacks, lowest first, at most MAX_GAPS_PER_FETCH.

    Below the highest held chunk every hole is a gap. Past it, what is missing is known only when
    the final is in (up to its chunk count) or the stream ended on the worker (up to the end)."""
    ranges: list[tuple[int, int]] = []
    start = task.next_chunk
    for index in sorted(task.held):
        if index > start:
            ranges.append((start, index))
        start = index + 1
    if task.final is not None and task.final.chunks is not None:
        if task.final.chunks > start:
            ranges.append((start, task.final.chunks))
    elif tail:
        ranges.append((start, MAX_COUNT))
    return tuple(ranges[:MAX_GAPS_PER_FETCH])
