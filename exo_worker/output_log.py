"""What a worker keeps of each task's output so that nothing lost on the bus is lost for good.

Chunks and the final message are kept from the task's start until the master acknowledges its end
(TaskAck). Until then the worker lists the task in its heartbeat (`finished_tasks`), and answers a
FetchOutput by sending the asked chunks and the final again. Bounded: at most `max_tasks` ended,
unacknowledged tasks and `max_chars` of their text; past either, the oldest ended task is
forgotten, and a later fetch for it gets a clear failure instead of silence.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from protocol.ids import TaskId
from protocol.messages import TaskFailed, TaskFinished

FinalMessage = TaskFinished | TaskFailed


@dataclass(slots=True)
class _Output:
    chunks: list[str] = field(default_factory=list)
    chars: int = 0
    final: FinalMessage | None = None


class OutputLog:
    def __init__(self, max_tasks: int = 1024, max_chars: int = 32 * 1024 * 1024) -> None:
        self.max_tasks = max_tasks
        self.max_chars = max_chars
        self._live: dict[TaskId, _Output] = {}
        self._ended: OrderedDict[TaskId, _Output] = OrderedDict()  # oldest first
        self._ended_chars = 0

    def started(self, task_id: TaskId) -> None:
        """A new attempt: whatever an earlier attempt of this id produced is void."""
        self.forget(task_id)
        self._live[task_id] = _Output()

    def chunk(self, task_id: TaskId, text: str) -> int:
        """Record the next chunk; return its index."""
        out = self._live[task_id]
        out.chunks.append(text)
        out.chars += len(text)
        return len(out.chunks) - 1

    def count(self, task_id: TaskId) -> int:
        out = self._live.get(task_id) or self._ended.get(task_id)
        return len(out.chunks) if out else 0

    def ended(self, task_id: TaskId, final: FinalMessage) -> None:
        """Keep the output and its final until the master acknowledges it."""
        out = self._live.pop(task_id, None) or _Output()
        out.final = final
        self._ended[task_id] = out
        self._ended_chars += out.chars
        while self._ended and (len(self._ended) > self.max_tasks or self._ended_chars > self.max_chars):
            _, oldest = self._ended.popitem(last=False)
            self._ended_chars -= oldest.chars

    def forget(self, task_id: TaskId) -> None:
        """Acknowledged by the master, or cancelled: nobody will ask for it again."""
        self._live.pop(task_id, None)
        out = self._ended.pop(task_id, None)
        if out is not None:
            self._ended_chars -= out.chars

    def unacknowledged(self) -> tuple[TaskId, ...]:
        return tuple(self._ended)

    def replay(
        self, task_id: TaskId, from_index: int, final: bool, gaps: tuple[tuple[int, int], ...] = ()
    ) -> tuple[list[tuple[int, str]], FinalMessage | None] | None:
        """The asked chunks as (index, text): those in `gaps` ([start, end) ranges) if any are given,
        else all from `from_index` on; and (if asked and known) the final. None if not held."""
        out = self._live.get(task_id) or self._ended.get(task_id)
        if out is None:
            return None
        ranges = gaps or ((from_index, len(out.chunks)),)
        chunks = [
            (index, out.chunks[index])
            for start, end in ranges
            for index in range(max(0, start), min(end, len(out.chunks)))
        ]
        return chunks, out.final if final else None
