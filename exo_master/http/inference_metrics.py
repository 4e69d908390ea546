"""Inference latency and token metrics, measured in the API shell where each reply is relayed.

The core sees scheduling; only the HTTP side sees what a client experiences: when the first token
reached the master, how long the whole reply took, how many tokens went each way. One object per
app, registered into the master's /metrics registry (MasterMetrics), so masters in one process
(tests) keep separate counts. Labels are bounded: `model` only takes values of models the core
accepted (a request for an unknown model is rejected before anything is recorded).

Metrics (all prefixed exo_):
    time_to_first_token_seconds{model}       histogram  submission to the first output at the master
    time_per_output_token_seconds{model}     histogram  (end - first output) / (tokens - 1)
    request_duration_seconds{model,outcome}  histogram  submission to end; outcome ok | error
    prompt_tokens_total{model}               counter    prompt tokens of completed requests
    generation_tokens_total{model}           counter    tokens generated for completed requests
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram

from protocol.messages import Usage

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class InferenceMetrics:
    def __init__(self) -> None:
        # registry=None: created unregistered, then added to one master's registry by register().
        self.ttft = Histogram(
            "exo_time_to_first_token_seconds",
            "Time from submission to the first output reaching the master, per model.",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=None,
        )
        self.tpot = Histogram(
            "exo_time_per_output_token_seconds",
            "Time per generated token after the first, per completed request and model.",
            ["model"],
            buckets=TPOT_BUCKETS,
            registry=None,
        )
        self.duration = Histogram(
            "exo_request_duration_seconds",
            "Time from submission to the end of the reply, per model and outcome (ok or error).",
            ["model", "outcome"],
            buckets=DURATION_BUCKETS,
            registry=None,
        )
        self.prompt_tokens = Counter(
            "exo_prompt_tokens", "Prompt tokens of completed requests, per model.", ["model"], registry=None
        )
        self.generation_tokens = Counter(
            "exo_generation_tokens",
            "Tokens generated for completed requests, per model.",
            ["model"],
            registry=None,
        )

        self._by_model: dict[str, _ModelSeries] = {}

    def register(self, registry: CollectorRegistry) -> None:
        for collector in (self.ttft, self.tpot, self.duration, self.prompt_tokens, self.generation_tokens):
            registry.register(collector)

    def _children(self, model: str) -> _ModelSeries:
        # labels() takes a lock and builds a key each call: resolve a model's series once.
        series = self._by_model.get(model)
        if series is None:
            series = self._by_model[model] = _ModelSeries(
                ttft=self.ttft.labels(model),
                tpot=self.tpot.labels(model),
                ok=self.duration.labels(model, "ok"),
                error=self.duration.labels(model, "error"),
                prompt=self.prompt_tokens.labels(model),
                generated=self.generation_tokens.labels(model),
            )
        return series

    def first_output(self, model: str, since_submit: float) -> None:
        self._children(model).ttft.observe(since_submit)

    def completed(self, model: str, duration: float, after_first: float | None, usage: Usage) -> None:
        series = self._children(model)
        series.ok.observe(duration)
        series.prompt.inc(usage.prompt_tokens)
        series.generated.inc(usage.completion_tokens)
        if after_first is not None and usage.completion_tokens > 1:
            series.tpot.observe(after_first / (usage.completion_tokens - 1))

    def failed(self, model: str, duration: float) -> None:
        self._children(model).error.observe(duration)


@dataclass(frozen=True, slots=True)
class _ModelSeries:
    ttft: Histogram
    tpot: Histogram
    ok: Histogram
    error: Histogram
    prompt: Counter
    generated: Counter
