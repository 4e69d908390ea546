"""Recent performance for the dashboard's charts: TTFT, tokens/s and queue wait, a point every few
seconds over the last minutes.

Read from what the master already measures, never measured twice: the inference histograms and
counters (`InferenceMetrics`, fed where replies are relayed) give the TTFT sum and count and the
generated tokens; the queue wait comes from the runtime's placement effects. Each point is the
average over its window (None when nothing happened in it), so a chart shows "how is it now",
which a cumulative histogram cannot.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from prometheus_client import Counter, Histogram

from exo_master.core.events import Effect, TaskPlaced
from exo_master.http.inference_metrics import InferenceMetrics


@dataclass(frozen=True, slots=True)
class StatsPoint:
    t: float  # wall-clock seconds (the browser draws it as a time)
    ttft_ms: float | None  # mean time to first token in the window
    tokens_per_s: float  # tokens generated per second, cluster-wide
    queue_wait_ms: float | None  # mean wait from submission to placement
    requests: int  # requests that got their first token in the window

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "t": round(self.t, 3),
            "ttft_ms": None if self.ttft_ms is None else round(self.ttft_ms, 1),
            "tokens_per_s": round(self.tokens_per_s, 2),
            "queue_wait_ms": None if self.queue_wait_ms is None else round(self.queue_wait_ms, 1),
            "requests": self.requests,
        }


def _histogram_totals(histogram: Histogram) -> tuple[float, float]:
    """(sum, count) over every label of a histogram."""
    total, count = 0.0, 0.0
    for metric in histogram.collect():
        for sample in metric.samples:
            if sample.name.endswith("_sum"):
                total += sample.value
            elif sample.name.endswith("_count"):
                count += sample.value
    return total, count


def _counter_total(counter: Counter) -> float:
    return sum(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total"))


class LiveStats:
    """A bounded ring of StatsPoints; `sample(now)` adds one from the deltas since the last."""

    def __init__(self, inference: InferenceMetrics | None, keep: int = 150) -> None:
        self.inference = inference
        self.points: deque[StatsPoint] = deque(maxlen=keep)
        self._wait_sum = 0.0
        self._wait_count = 0
        self._last: tuple[float, float, float, float, float, int] | None = None

    def on_effect(self, effect: Effect) -> None:
        """A runtime effect observer: every placement's queue wait."""
        if isinstance(effect, TaskPlaced):
            self._wait_sum += effect.waited
            self._wait_count += 1

    def _totals(self, now: float) -> tuple[float, float, float, float, float, int]:
        if self.inference is None:
            ttft_sum = ttft_count = tokens = 0.0
        else:
            ttft_sum, ttft_count = _histogram_totals(self.inference.ttft)
            tokens = _counter_total(self.inference.generation_tokens)
        return now, ttft_sum, ttft_count, tokens, self._wait_sum, self._wait_count

    def sample(self, now: float) -> StatsPoint | None:
        """The point for the window that ends now (None for the very first call: no window yet)."""
        current = self._totals(now)
        last, self._last = self._last, current
        if last is None:
            return None
        elapsed = max(current[0] - last[0], 1e-6)
        ttft_n = current[2] - last[2]
        waits = current[5] - last[5]
        point = StatsPoint(
            t=now,
            ttft_ms=1000 * (current[1] - last[1]) / ttft_n if ttft_n else None,
            tokens_per_s=max(0.0, current[3] - last[3]) / elapsed,
            queue_wait_ms=1000 * (current[4] - last[4]) / waits if waits else None,
            requests=int(ttft_n),
        )
        self.points.append(point)
        return point

    def history(self) -> list[dict[str, float | int | None]]:
        return [p.as_dict() for p in self.points]
