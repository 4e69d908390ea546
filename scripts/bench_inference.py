"""Real inference speed of one model: in-process MlxEngine vs the same engine behind the master.

    python scripts/bench_inference.py --model tiny
    python scripts/bench_inference.py --model smollm2 --runs 3 --max-tokens 32
    python scripts/bench_inference.py --model ~/models/my-mlx-model --json

It measures, greedy (temperature 0), with the same prompt every time:
(a) direct: a fresh `MlxEngine` per run is loaded (load time, which includes the engine's warm-up
    generation; mlx_lm is imported beforehand, so not counted), then the last one generates:
    one untimed warm-up, then `--runs` timed runs of time to first token (TTFT: `run()` called ->
    first non-empty text) and decode tokens/s ((completion tokens - 1) / (end - first token));
(b) through the master: a `LocalCluster` of 1 master + 1 MLX worker (time from start to ready:
    process start, imports, load, warm-up, first heartbeat), then one untimed warm-up and `--runs`
    sequential streaming /v1/chat/completions requests on one kept-alive HTTP connection: TTFT
    (request sent -> first non-empty content delta), decode tokens/s and total latency ([DONE]);
(c) what the master adds to TTFT: median through master - median direct;
(d) the aggregate throughput of a concurrent burst of 4 requests (total completion tokens / wall
    time, median over `--runs` bursts after one untimed warm-up burst) with 1 worker vs 2 workers.

Every figure is a median. Prints a markdown table (or JSON with --json) on stdout; progress goes
to stderr. Every process started here is stopped before it returns.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import typer
from benchkit.inference_report import BURST, Burst, Sample, Side, build_report, render
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/support, from a checkout

from exo_master.devtools.launcher import ClusterSpec, LocalCluster
from exo_master.devtools.ports import ClusterStartError
from tests.support.loadgen import BurstFailed, burst_responses

console = Console(stderr=True, soft_wrap=True)
REQUEST_TIMEOUT_S = 600.0  # per request (httpx); the clusters' ready wait has its own bound
READY_TIMEOUT_S = 600.0
MAX_SSE_LINES = 100_000  # a stream is never longer than this (bounds the read loop)


class BenchError(RuntimeError):
    pass


# ---- the model ---------------------------------------------------------------------------------


@contextmanager
def model_directory(model: str) -> Iterator[Path]:
    """smollm2 / tiny / a path -> a local MLX model directory (tiny: built into a temp dir)."""
    from exo_worker.engine import ModelLoadError
    from tests.support.tiny_model import model_directory as prepared

    try:
        with prepared(model) as resolved:
            if not resolved.is_dir():
                raise BenchError(f"{model!r} is not a local model directory (Hub ids are not benchmarked)")
            yield resolved
    except ModelLoadError as exc:
        raise BenchError(str(exc)) from exc


# ---- (a) direct ----------------------------------------------------------------------------------


async def _direct_once(engine: Any, params: Any) -> Sample:
    first: float | None = None

    def on_text(piece: str) -> None:
        nonlocal first
        if piece and first is None:
            first = time.perf_counter()

    started = time.perf_counter()
    outcome = await engine.run(params, on_text, threading.Event())
    ended = time.perf_counter()
    if first is None:
        raise BenchError(f"the engine produced no text (finish reason {outcome.finish_reason})")
    return Sample(
        ttft_s=first - started,
        total_s=ended - started,
        completion_tokens=outcome.usage.completion_tokens,
        prompt_tokens=outcome.usage.prompt_tokens,
    )


async def measure_direct(path: Path, model_id: str, prompt: str, max_tokens: int, runs: int) -> Side:
    import mlx_lm  # noqa: F401  imported here so that no load time below includes the import

    from exo_worker.mlx_engine import MlxEngine
    from protocol.ids import ModelId
    from protocol.messages import ChatMessage, TextGenerationParams

    side = Side()
    params = TextGenerationParams(
        model=ModelId(model_id),
        messages=(ChatMessage(role="user", content=prompt),),
        max_tokens=max_tokens,
        temperature=0.0,
    )
    engine: MlxEngine | None = None
    try:
        for i in range(runs):
            if engine is not None:
                engine.close()
            engine = MlxEngine(path, label=f"bench-{i}")
            started = time.perf_counter()
            await engine.load()
            side.ready_s.append(time.perf_counter() - started)
            console.print(f"  direct load {i + 1}/{runs}: {side.ready_s[-1]:.2f} s")
        assert engine is not None
        await _direct_once(engine, params)  # warm-up, untimed
        for i in range(runs):
            side.samples.append(await _direct_once(engine, params))
            s = side.samples[-1]
            console.print(f"  direct run {i + 1}/{runs}: TTFT {s.ttft_s * 1000:.1f} ms, {s.total_s:.2f} s")
    finally:
        if engine is not None:
            engine.close()
    return side


# ---- (b) through the master ----------------------------------------------------------------------


def chat_body(model_id: str, prompt: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model_id,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


def stream_once(client: httpx.Client, model_id: str, prompt: str, max_tokens: int) -> Sample:
    body = chat_body(model_id, prompt, max_tokens, stream=True)
    first: float | None = None
    ended: float | None = None
    usage: dict[str, int] | None = None
    started = time.perf_counter()
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            response.read()
            raise BenchError(f"HTTP {response.status_code}: {response.text[:200]}")
        for count, line in enumerate(response.iter_lines()):
            if count >= MAX_SSE_LINES:
                raise BenchError(f"the stream went on past {MAX_SSE_LINES} lines")
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                ended = time.perf_counter()
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise BenchError(f"the stream failed: {chunk['error']}")
            if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                first = time.perf_counter()
            if chunk.get("usage"):
                usage = chunk["usage"]
    if first is None or ended is None or usage is None:
        raise BenchError("the stream ended without content, usage or [DONE]")
    return Sample(
        ttft_s=first - started,
        total_s=ended - started,
        completion_tokens=int(usage["completion_tokens"]),
        prompt_tokens=int(usage["prompt_tokens"]),
    )


def start_cluster(cluster: LocalCluster) -> float:
    started = time.perf_counter()
    try:
        cluster.start(ready_timeout=READY_TIMEOUT_S)
    except (ClusterStartError, TimeoutError) as exc:
        raise BenchError(f"the cluster did not start: {exc} (logs in {cluster.spec.log_dir})") from exc
    return time.perf_counter() - started


def measure_master(cluster: LocalCluster, model_id: str, prompt: str, max_tokens: int, runs: int) -> Side:
    side = Side()
    with httpx.Client(base_url=cluster.api_url, timeout=REQUEST_TIMEOUT_S) as client:
        stream_once(client, model_id, prompt, max_tokens)  # warm-up (and the connection), untimed
        for i in range(runs):
            side.samples.append(stream_once(client, model_id, prompt, max_tokens))
            s = side.samples[-1]
            console.print(f"  master run {i + 1}/{runs}: TTFT {s.ttft_s * 1000:.1f} ms, {s.total_s:.2f} s")
    return side


# ---- (d) bursts ------------------------------------------------------------------------------------


async def burst_once(
    api_url: str, model_id: str, prompt: str, max_tokens: int, n: int
) -> tuple[float, int, list[int]]:
    """n concurrent non-streaming requests: (wall seconds, total completion tokens, per-instance counts)."""
    body = chat_body(model_id, prompt, max_tokens, stream=False)
    started = time.perf_counter()
    try:
        responses = await burst_responses(api_url, n, body)
    except BurstFailed as exc:
        raise BenchError(f"burst request: {exc}") from exc
    wall = time.perf_counter() - started
    tokens = 0
    instances: Counter[str] = Counter()
    for response in responses:
        tokens += int(response.json()["usage"]["completion_tokens"])
        instances[response.headers.get("x-exo-instance", "?")] += 1
    return wall, tokens, sorted(instances.values(), reverse=True)


def measure_burst(
    cluster: LocalCluster, ready_s: float, model_id: str, prompt: str, max_tokens: int, runs: int
) -> Burst:
    workers = cluster.spec.workers
    result = Burst(workers=workers, ready_s=ready_s)
    # Warm-up: one request per instance at once (the balancer spreads them), untimed.
    asyncio.run(burst_once(cluster.api_url, model_id, prompt, max_tokens, workers))
    for i in range(runs):
        wall, tokens, spread = asyncio.run(burst_once(cluster.api_url, model_id, prompt, max_tokens, BURST))
        result.wall_s.append(wall)
        result.tokens.append(tokens)
        result.spread.append(spread)
        console.print(
            f"  burst of {BURST}, {workers} worker(s), {i + 1}/{runs}: {tokens} tokens in {wall:.2f} s "
            f"({tokens / wall:.1f} tokens/s), per instance {spread}"
        )
    return result


# ---- CLI -------------------------------------------------------------------------------------------


def main(
    model: str = typer.Option("smollm2", help="smollm2, tiny (the offline test model) or an MLX model dir."),
    runs: int = typer.Option(3, min=1, max=100, help="Timed runs per measurement (medians)."),
    max_tokens: int = typer.Option(64, min=1, max=4096, help="max_tokens of every request."),
    prompt: str = typer.Option("What is the capital of France?", help="The user message."),
    json_output: bool = typer.Option(False, "--json", help="Print JSON instead of markdown."),
) -> None:
    from exo_worker.engine_choice import served_model_id
    from protocol.logs import LogFormat, configure_logging

    configure_logging(LogFormat.AUTO, level="warning")  # stdout is for the report only
    log_root = Path(tempfile.mkdtemp(prefix="exo-bench-logs-"))
    try:
        with model_directory(model) as path:
            model_id = str(served_model_id(str(path)))
            console.print(
                f"[bold]{model}[/bold] -> {path} (served as {model_id!r}); logs (kept on failure): {log_root}"
            )

            console.print("(a) direct, in-process MlxEngine")
            direct = asyncio.run(measure_direct(path, model_id, prompt, max_tokens, runs))

            bursts: list[Burst] = []
            console.print("(b) through the master: 1 master + 1 MLX worker")
            spec = ClusterSpec(workers=1, engine="mlx", model=str(path), log_dir=log_root / "1-worker")
            with LocalCluster(spec) as cluster:
                ready = start_cluster(cluster)
                console.print(f"  cluster ready in {ready:.2f} s")
                master = measure_master(cluster, model_id, prompt, max_tokens, runs)
                master.ready_s.append(ready)
                console.print(f"(d) burst of {BURST} through 1 worker")
                bursts.append(measure_burst(cluster, ready, model_id, prompt, max_tokens, runs))

            console.print(f"(d) burst of {BURST} through 2 workers")
            spec = ClusterSpec(workers=2, engine="mlx", model=str(path), log_dir=log_root / "2-workers")
            with LocalCluster(spec) as cluster:
                ready = start_cluster(cluster)
                console.print(f"  cluster ready in {ready:.2f} s")
                bursts.append(measure_burst(cluster, ready, model_id, prompt, max_tokens, runs))

            report = build_report(model, path, runs, max_tokens, prompt, direct, master, bursts)
    except BenchError as exc:
        console.print(f"[red]error: {exc}[/red]")
        raise typer.Exit(1) from None
    shutil.rmtree(log_root, ignore_errors=True)
    print(json.dumps(report, indent=2) if json_output else render(report))


if __name__ == "__main__":
    typer.run(main)
