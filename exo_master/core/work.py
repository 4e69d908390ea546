"""Work estimates for placement: when would a new request get its first token on an instance?

The master has no tokenizer and its picture of each instance is a heartbeat old, so the estimate is
built from what it can know cheaply and honestly:

    ahead   = prompt tokens the instance reported still to prefill (its engine's own count, so it
              includes work no task owns any more, such as a cancelled prompt being stopped)
            + the estimated prompt tokens of tasks bound to it since that report (not in it yet)
    wait    = (ahead + this request's prompt tokens) / the instance's measured prefill rate

Prompt tokens are estimated from characters with the chars-per-token ratio the model's instances
measure (a default until one has). The prefill rate is the instance's smoothed measurement, or
`DEFAULT_PREFILL_RATE` x capacity before it has one, so equal unmeasured instances compare equal.
All pure: numbers in, numbers out.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from protocol.ids import InstanceId, TaskId
from protocol.messages import InstanceWork, TaskParams, TextGenerationParams

DEFAULT_CHARS_PER_TOKEN = 4.0  # English prose with a BPE tokenizer, until a worker measured one
DEFAULT_PREFILL_RATE = 100.0  # prompt tokens/s assumed before an instance has measured its own
# "One short request": the placement may pick a less loaded instance over the fastest estimate
# when the difference is at most the prefill of this many tokens. It keeps the least-loaded rule
# (and a burst's ceil(N/k) balance) whenever the work estimates are close.
SHORT_REQUEST_TOKENS = 64


def prompt_chars(params: TaskParams) -> int:
    """The characters of a request's prompt, as the workers count them for chars_per_token."""
    if isinstance(params, TextGenerationParams):
        if params.prompt is not None:
            return len(params.prompt)
        return sum(len(m.content) for m in params.messages)
    return len(params.prompt)


def estimate_tokens(chars: int, chars_per_token: float) -> int:
    """Prompt tokens from characters (at least 1: every prompt costs something)."""
    ratio = chars_per_token if chars_per_token > 0 else DEFAULT_CHARS_PER_TOKEN
    return max(1, math.ceil(chars / ratio))


def prefill_rate(work: InstanceWork | None, capacity: float) -> float:
    if work is not None and work.prefill_rate > 0:
        return work.prefill_rate
    return DEFAULT_PREFILL_RATE * capacity


def first_token_wait(ahead_tokens: int, prompt_tokens: int, rate: float) -> float:
    """Seconds until a request of `prompt_tokens` gets its first token behind `ahead_tokens`."""
    assert rate > 0, "prefill rates are positive"
    return (ahead_tokens + prompt_tokens) / rate


def short_request_wait(rate: float) -> float:
    """The slack of placement by work: the prefill time of one short request."""
    return SHORT_REQUEST_TOKENS / rate


class UnreportedWork:
    """Per instance, the estimated prompt tokens of the tasks placed there that no heartbeat has
    listed yet, with their sum kept incrementally (a lookup is O(1)). An entry leaves when a report
    lists its task (the report's own count covers it from then on) or when the task is no longer
    bound there (ended, or moved)."""

    def __init__(self) -> None:
        self._tasks: dict[InstanceId, dict[TaskId, int]] = {}
        self._sums: dict[InstanceId, int] = {}

    def add(self, iid: InstanceId, task_id: TaskId, tokens: int) -> None:
        tasks = self._tasks.setdefault(iid, {})
        self._sums[iid] = self._sums.get(iid, 0) + tokens - tasks.get(task_id, 0)
        tasks[task_id] = tokens

    def keep(self, iid: InstanceId, wanted: Callable[[TaskId], bool]) -> None:
        """Drop the instance's entries whose task is not `wanted` any more."""
        tasks = self._tasks.get(iid)
        if not tasks:
            return
        for task_id in [t for t in tasks if not wanted(t)]:
            self._sums[iid] -= tasks.pop(task_id)
        if not tasks:
            del self._tasks[iid], self._sums[iid]

    def tokens(self, iid: InstanceId) -> int:
        return self._sums.get(iid, 0)
