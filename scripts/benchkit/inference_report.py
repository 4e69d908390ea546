"""The inference benchmark's results (scripts/bench_inference.py): samples, medians, the report.

`build_report` makes the JSON document (`--json`), `render` the markdown table printed by default.
No measuring here: the script times the runs and fills `Side` and `Burst`.
"""

from __future__ import annotations

import os
import platform
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BURST = 4  # concurrent requests per burst (measurement (d))


@dataclass
class Sample:
    ttft_s: float
    total_s: float
    completion_tokens: int
    prompt_tokens: int

    @property
    def decode_tps(self) -> float | None:
        """Completion tokens after the first / time after the first token."""
        after_first = self.total_s - self.ttft_s
        if self.completion_tokens < 2 or after_first <= 0:
            return None
        return (self.completion_tokens - 1) / after_first


@dataclass
class Side:
    """One column of the table: direct or through the master."""

    ready_s: list[float] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)

    def summary(self) -> dict[str, float | None]:
        decode = [d for s in self.samples if (d := s.decode_tps) is not None]
        return {
            "ready_s": median(self.ready_s),
            "ttft_ms": _scale(median([s.ttft_s for s in self.samples]), 1000),
            "decode_tokens_per_s": median(decode),
            "total_s": median([s.total_s for s in self.samples]),
            "completion_tokens": median([float(s.completion_tokens) for s in self.samples]),
            "prompt_tokens": median([float(s.prompt_tokens) for s in self.samples]),
        }


@dataclass
class Burst:
    workers: int
    ready_s: float
    wall_s: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    spread: list[list[int]] = field(default_factory=list)  # requests per instance, per burst

    @property
    def throughputs(self) -> list[float]:
        return [t / w for t, w in zip(self.tokens, self.wall_s, strict=True) if w > 0]

    @property
    def throughput(self) -> float | None:
        return median(self.throughputs)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _scale(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


def fmt(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def render(report: dict[str, Any]) -> str:
    d, m = report["direct"], report["master"]
    b1, b2 = report["burst"]["1"], report["burst"]["2"]
    lines = [
        f"Model `{report['model']}` ({report['prompt_tokens']} prompt tokens, max_tokens "
        f"{report['max_tokens']}, greedy), medians of {report['runs']} runs, {report['machine']}.",
        "",
        "| measurement | direct (MlxEngine in-process) | through master (1 worker, HTTP stream) |",
        "|---|---|---|",
        f"| load -> ready (s) | {fmt(d['ready_s'], 2)} (engine load + warm-up) "
        f"| {fmt(m['ready_s'], 2)} (cluster start -> instance ready) |",
        f"| time to first token (ms) | {fmt(d['ttft_ms'], 1)} | {fmt(m['ttft_ms'], 1)} |",
        f"| decode (tokens/s) | {fmt(d['decode_tokens_per_s'], 1)} | {fmt(m['decode_tokens_per_s'], 1)} |",
        f"| total latency (s) | {fmt(d['total_s'], 3)} | {fmt(m['total_s'], 3)} |",
        f"| completion tokens | {fmt(d['completion_tokens'], 0)} | {fmt(m['completion_tokens'], 0)} |",
        "",
        f"Master overhead on TTFT: {report['master_ttft_overhead_ms']:+.1f} ms "
        f"(through master - direct); on total latency: {report['master_total_overhead_ms']:+.1f} ms.",
        "",
        f"Burst of {BURST} concurrent requests: 1 worker {fmt(b1['tokens_per_s'], 1)} tokens/s, "
        f"2 workers {fmt(b2['tokens_per_s'], 1)} tokens/s (x{fmt(report['burst']['speedup'], 2)}; "
        f"per-instance split {b2['spread'][-1] if b2['spread'] else '?'}). "
        f"This machine has {report['cpu_count']} CPU cores and MLX runs on {report['mlx_device']}, "
        "so both workers (and the master, and this client) share the same cores: the speed-up shows "
        "how much CPU one worker leaves idle, not how adding a machine (with its own cores) scales.",
    ]
    return "\n".join(lines)


def build_report(
    model: str,
    path: Path,
    runs: int,
    max_tokens: int,
    prompt: str,
    direct: Side,
    master: Side,
    bursts: list[Burst],
) -> dict[str, Any]:
    import importlib.metadata

    import mlx.core as mx

    d, m = direct.summary(), master.summary()
    mlx_version = importlib.metadata.version("mlx")
    by_workers: dict[str, dict[str, Any]] = {
        str(b.workers): {
            "ready_s": b.ready_s,
            "tokens_per_s": b.throughput,
            "throughputs": b.throughputs,
            "wall_s": b.wall_s,
            "tokens": b.tokens,
            "spread": b.spread,
        }
        for b in bursts
    }
    throughput = {b.workers: b.throughput for b in bursts}
    t1, t2 = throughput.get(1), throughput.get(2)

    def diff_ms(key: str, scale: float) -> float:
        a, b = d[key], m[key]
        return 0.0 if a is None or b is None else (b - a) * scale

    return {
        "model": model,
        "model_path": str(path),
        "prompt": prompt,
        "prompt_tokens": int(d["prompt_tokens"] or 0),
        "runs": runs,
        "max_tokens": max_tokens,
        "cpu_count": os.cpu_count(),
        "mlx_device": str(mx.default_device()),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, MLX {mlx_version}",
        "direct": d,
        "master": m,
        "master_ttft_overhead_ms": diff_ms("ttft_ms", 1),
        "master_total_overhead_ms": diff_ms("total_s", 1000),
        "burst": {**by_workers, "speedup": (t2 / t1) if t1 and t2 else None},
        "samples": {
            "direct": [asdict(s) for s in direct.samples],
            "master": [asdict(s) for s in master.samples],
        },
    }
