"""WorkMeter: an engine's measured speeds, smoothed, and its latest work snapshot for heartbeats.

Rates are exponentially weighted sums of (tokens, seconds) rather than an average of per-step
rates: a step that processed 2 tokens in 1 ms counts for 1 ms, not as a wild 2,000 tokens/s. The
chars-per-token ratio is smoothed the same way (prompt characters over prompt tokens), so the
master, which has no tokenizer, can estimate a prompt's tokens from its length.

Written by the engine's own thread, read by the event loop: every reading is one attribute load of
an immutable value, which is atomic in CPython.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.messages import InstanceWork


@dataclass(slots=True)
class RatioMeter:
    """Smoothed amount / time (or chars / tokens); 0.0 until something was measured."""

    decay: float = 0.8  # weight of the past per observation: about the last 5 observations count
    _amount: float = 0.0
    _base: float = 0.0

    def add(self, amount: float, base: float) -> None:
        if base <= 0 or amount < 0:
            return
        self._amount = self._amount * self.decay + amount
        self._base = self._base * self.decay + base

    @property
    def value(self) -> float:
        return self._amount / self._base if self._base > 0 else 0.0


class WorkMeter:
    def __init__(self, prefill_chunk: int = 0) -> None:
        self.prefill = RatioMeter()  # prompt tokens per second of prompt processing
        self.decode = RatioMeter()  # decode steps per second of decoding
        self.chars_per_token = RatioMeter(decay=0.95)
        self.prefill_chunk = prefill_chunk
        self.snapshot = InstanceWork(prefill_chunk=prefill_chunk)

    def publish(self, *, prefill_tokens: int, decoding: int, waiting: int = 0) -> None:
        self.snapshot = InstanceWork(
            prefill_tokens=prefill_tokens,
            decoding=decoding,
            waiting=waiting,
            prefill_rate=round(self.prefill.value, 3),
            decode_rate=round(self.decode.value, 3),
            chars_per_token=round(self.chars_per_token.value, 3),
            prefill_chunk=self.prefill_chunk,
        )
