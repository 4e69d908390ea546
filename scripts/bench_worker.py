"""One worker instance against mlx_lm.server on the same model directory: batching and prompt cache.

    python scripts/bench_worker.py                 # SmolLM2 and the tiny model, 2 rounds
    python scripts/bench_worker.py --quick         # tiny model only, small counts (a smoke test)
    python scripts/bench_worker.py --models tiny --rounds 3 --out bench/results/worker.json

Two targets serve the same local model directory, both started here as real processes on loopback:
- exo: a master and one MLX worker (one instance, --max-concurrency 8) via the dev launcher; requests
  go through the master's OpenAI API;
- mlx_lm.server (`python -m mlx_lm.server --model DIR`, offline), with its default batching.
Rounds are interleaved A/B/A/B (exo then mlx_lm.server, each round) so drifting machine load hits
both alike. Each round, for each target:
1. bursts of 1, 4 and 8 concurrent streaming requests (greedy; distinct user messages, so only the
   chat template's own prefix can come from a prompt cache): aggregate generated tokens/s (sum of
   completion tokens / burst wall time), TTFT per request, and, per burst, the ratio of the first
   request to finish to the last (1.0: all progressed together; 1/c: one at a time);
2. the shared-system-prompt test: a fresh ~100-token system prompt with one question, then the same
   system prompt with another question: TTFT of the second / TTFT of the first.
Figures are medians over rounds (TTFT p50 over every request of a concurrency). Writes JSON (see
`SCHEMA`) to --out and prints a markdown table. Every process started here is stopped by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the repository's packages (and tests/support)

from exo_master.devtools.launcher import ClusterSpec, LocalCluster, wait_for  # noqa: E402
from exo_master.devtools.ports import ClusterStartError, free_port  # noqa: E402
from tests.support.tiny_model import model_directory  # noqa: E402

SCHEMA = "exo-bench-worker/1"
CONCURRENCIES = (1, 4, 8)
REQUEST_TIMEOUT_S = 900.0
MAX_SSE_LINES = 100_000  # bounds one stream's read loop
# About 100 tokens with SmolLM2's tokenizer; a fresh "Session" line per use defeats earlier caches.
SYSTEM_PROMPT = (
    "You are the operations assistant of a small inference cluster. The cluster has one master and "
    "several workers; each worker runs model instances and reports them in heartbeats every second. "
    "The master places each chat request on the least loaded instance of its model and streams the "
    "answer back. Answer briefly and precisely, name the component you mean, and never invent "
    "numbers: when a figure is unknown, say so and explain how an operator could measure it."
)


class BenchError(RuntimeError):
    pass


@dataclass
class Sample:
    ttft_s: float
    total_s: float
    completion_tokens: int


@dataclass
class Target:
    name: str
    url: str
    model: str  # the "model" field of requests


async def stream_chat(
    client: httpx.AsyncClient, target: Target, messages: list[dict[str, str]], max_tokens: int
) -> Sample:
    body = {
        "model": target.model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft: float | None = None
    deltas, usage_tokens = 0, None
    async with client.stream("POST", f"{target.url}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            raise BenchError(f"{target.name}: HTTP {response.status_code}: {response.text[:300]}")
        lines = 0
        async for line in response.aiter_lines():
            lines += 1
            if lines > MAX_SSE_LINES:
                raise BenchError(f"{target.name}: more than {MAX_SSE_LINES} lines in one stream")
            if not line.startswith("data:"):
                continue  # blank separators, ": keepalive" comments
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("usage"):
                usage_tokens = int(chunk["usage"]["completion_tokens"])
            for choice in chunk.get("choices") or ():
                if (choice.get("delta") or {}).get("content"):
                    deltas += 1
                    if ttft is None:
                        ttft = time.perf_counter() - start
    total = time.perf_counter() - start
    if ttft is None:
        raise BenchError(f"{target.name}: a stream ended without any content")
    return Sample(ttft_s=ttft, total_s=total, completion_tokens=usage_tokens if usage_tokens else deltas)


def _question(tag: str, i: int) -> list[dict[str, str]]:
    # The distinct part comes first, so two requests share no more than the chat template's prefix.
    text = f"Request {tag}-{i}. Write a long, detailed story about a dragon who learns to bake bread."
    return [{"role": "user", "content": text}]


async def burst(
    client: httpx.AsyncClient, target: Target, concurrency: int, max_tokens: int, tag: str
) -> dict[str, Any]:
    start = time.perf_counter()
    samples = await asyncio.gather(
        *(stream_chat(client, target, _question(tag, i), max_tokens) for i in range(concurrency))
    )
    wall = time.perf_counter() - start
    totals = [s.total_s for s in samples]
    return {
        "tokens": sum(s.completion_tokens for s in samples),
        "wall_s": wall,
        "tokens_per_s": sum(s.completion_tokens for s in samples) / wall,
        "ttfts_s": [s.ttft_s for s in samples],
        "first_last_ratio": min(totals) / max(totals),
    }


async def shared_prefix(client: httpx.AsyncClient, target: Target, tag: str) -> dict[str, float]:
    system = {"role": "system", "content": f"Session {tag}. {SYSTEM_PROMPT}"}
    first = await stream_chat(
        client, target, [system, {"role": "user", "content": "Who places requests?"}], 4
    )
    second = await stream_chat(client, target, [system, {"role": "user", "content": "What is a worker?"}], 4)
    return {
        "ttft_first_s": first.ttft_s,
        "ttft_second_s": second.ttft_s,
        "ratio": second.ttft_s / first.ttft_s,
    }


# ---- the two targets ---------------------------------------------------------------------------


@contextmanager
def exo_target(path: Path, log_dir: Path, max_concurrency: int) -> Iterator[Target]:
    from exo_worker.engine_choice import served_model_id

    spec = ClusterSpec(
        workers=1, engine="mlx", model=str(path), max_concurrency=max_concurrency, log_dir=log_dir
    )
    cluster = LocalCluster(spec)
    try:
        cluster.start(ready_timeout=600)
        yield Target("exo", cluster.api_url, str(served_model_id(str(path))))
    finally:
        cluster.stop()


@contextmanager
def mlx_server_target(path: Path, log_dir: Path) -> Iterator[Target]:
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "mlx_lm_server.log", "ab") as log:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        args = ["-m", "mlx_lm.server", "--model", str(path), "--host", "127.0.0.1", "--port", str(port)]
        proc = subprocess.Popen([sys.executable, *args], stdout=log, stderr=log, env=env)
        try:
            url = f"http://127.0.0.1:{port}"

            def up() -> bool:
                if proc.poll() is not None:
                    raise BenchError(f"mlx_lm.server exited with code {proc.returncode} (see {log.name})")
                try:
                    return httpx.get(f"{url}/v1/models", timeout=2).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_for(up, 300, "mlx_lm.server")
            yield Target("mlx_lm.server", url, str(path))
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# ---- one model ---------------------------------------------------------------------------------


async def measure(targets: list[Target], rounds: int, max_tokens: int) -> dict[str, Any]:
    raw: dict[str, dict[str, Any]] = {
        t.name: {"bursts": {c: [] for c in CONCURRENCIES}, "shared": []} for t in targets
    }
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=16)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        for target in targets:  # warm-up, untimed: first-request costs are not what is compared
            await stream_chat(client, target, _question(f"warm-{target.name}", 0), 4)
        for round_ in range(rounds):
            for target in targets:  # A/B/A/B
                for concurrency in CONCURRENCIES:
                    tag = f"r{round_}-{target.name}-c{concurrency}"
                    print(f"  {tag}", file=sys.stderr, flush=True)
                    result = await burst(client, target, concurrency, max_tokens, tag)
                    raw[target.name]["bursts"][concurrency].append(result)
                raw[target.name]["shared"].append(
                    await shared_prefix(client, target, f"r{round_}-{target.name}")
                )
    return {name: _summarise(data) for name, data in raw.items()}


def _summarise(data: dict[str, Any]) -> dict[str, Any]:
    per_concurrency = {}
    for concurrency, bursts in data["bursts"].items():
        per_concurrency[str(concurrency)] = {
            "tokens_per_s": statistics.median(b["tokens_per_s"] for b in bursts),
            "ttft_p50_s": statistics.median(t for b in bursts for t in b["ttfts_s"]),
            "first_last_ratio": statistics.median(b["first_last_ratio"] for b in bursts),
            "tokens_per_burst": statistics.median(b["tokens"] for b in bursts),
            "bursts": len(bursts),
        }
    shared = data["shared"]
    return {
        "concurrency": per_concurrency,
        "shared_prefix": {
            "ttft_first_s": statistics.median(s["ttft_first_s"] for s in shared),
            "ttft_second_s": statistics.median(s["ttft_second_s"] for s in shared),
            "ratio": statistics.median(s["ratio"] for s in shared),
        },
    }


def _ratios(exo: dict[str, Any], mlx: dict[str, Any]) -> dict[str, float]:
    c1, c4 = exo["concurrency"]["1"], exo["concurrency"]["4"]
    m1, m4 = mlx["concurrency"]["1"], mlx["concurrency"]["4"]
    return {
        "tokens_per_s_c4_exo_over_mlx": c4["tokens_per_s"] / m4["tokens_per_s"],
        "tokens_per_s_c8_exo_over_mlx": exo["concurrency"]["8"]["tokens_per_s"]
        / mlx["concurrency"]["8"]["tokens_per_s"],
        "first_last_c4_exo": c4["first_last_ratio"],
        "first_last_c4_mlx": m4["first_last_ratio"],
        "batching_gain_c4_exo": c4["tokens_per_s"] / c1["tokens_per_s"],
        "batching_gain_c4_mlx": m4["tokens_per_s"] / m1["tokens_per_s"],
        "shared_prefix_ttft_exo": exo["shared_prefix"]["ratio"],
        "shared_prefix_ttft_mlx": mlx["shared_prefix"]["ratio"],
    }


def bench_model(model: str, rounds: int, max_tokens: int, log_dir: Path) -> dict[str, Any]:
    print(f"[{model}] starting exo (master + 1 MLX worker) and mlx_lm.server", file=sys.stderr, flush=True)
    with model_directory(model) as path, ExitStack() as stack:
        exo = stack.enter_context(exo_target(path, log_dir / model / "exo", max(CONCURRENCIES)))
        mlx = stack.enter_context(mlx_server_target(path, log_dir / model))
        results = asyncio.run(measure([exo, mlx], rounds, max_tokens))
    return {
        "model": model,
        "max_tokens": max_tokens,
        "rounds": rounds,
        "targets": results,
        "ratios": _ratios(results["exo"], results["mlx_lm.server"]),
    }


def machine() -> dict[str, Any]:
    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "mlx": version("mlx"),
        "mlx_lm": version("mlx-lm"),
        "exo_master": version("exo-master"),
        "commit": commit.stdout.strip() or None,
        "load_average": list(os.getloadavg()),
    }


def markdown(report: dict[str, Any]) -> str:
    rows = [
        "| model | target | c | tokens/s | TTFT p50 (s) | first/last finish |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for entry in report["models"]:
        for name, target in entry["targets"].items():
            for c, figures in target["concurrency"].items():
                rows.append(
                    f"| {entry['model']} | {name} | {c} | {figures['tokens_per_s']:.2f} | "
                    f"{figures['ttft_p50_s']:.2f} | {figures['first_last_ratio']:.2f} |"
                )
    rows += ["", "| model | ratio | value |", "| --- | --- | ---: |"]
    for entry in report["models"]:
        for name, value in entry["ratios"].items():
            rows.append(f"| {entry['model']} | {name} | {value:.2f} |")
        for name, target in entry["targets"].items():
            s = target["shared_prefix"]
            rows.append(
                f"| {entry['model']} | {name} shared-system-prompt TTFT "
                f"{s['ttft_second_s']:.2f} s / {s['ttft_first_s']:.2f} s | {s['ratio']:.2f} |"
            )
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="One exo worker instance vs mlx_lm.server (same model).")
    parser.add_argument("--quick", action="store_true", help="tiny model only, one round, few tokens")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "worker.json")
    parser.add_argument("--models", default="smollm2,tiny", help="comma-separated: smollm2, tiny")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved A/B rounds (1-20)")
    parser.add_argument("--max-tokens", type=int, default=0, help="per request; 0: 16 smollm2, 64 tiny")
    args = parser.parse_args(argv)
    args.models = ["tiny"] if args.quick else [m.strip() for m in args.models.split(",") if m.strip()]
    for model in args.models:
        if model not in ("smollm2", "tiny"):
            parser.error(f"unknown model {model!r} (smollm2 or tiny)")
    if not 1 <= args.rounds <= 20:
        parser.error("--rounds must be within 1..20")
    if not 0 <= args.max_tokens <= 4096:
        parser.error("--max-tokens must be within 0..4096")
    if args.quick:
        args.rounds = 1
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; write the JSON report to --out and print a markdown table. Returns the exit code."""
    args = parse_args(argv)
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "quick": args.quick,
        "concurrencies": list(CONCURRENCIES),
        "machine": machine(),
        "models": [],
    }
    logs = Path(tempfile.mkdtemp(prefix="exo-bench-worker-logs-"))
    for model in args.models:
        tokens = args.max_tokens or (8 if args.quick else 16 if model == "smollm2" else 64)
        try:
            report["models"].append(bench_model(model, args.rounds, tokens, logs))
        except (BenchError, TimeoutError, ClusterStartError, httpx.HTTPError) as exc:
            print(f"bench_worker: {model}: {exc} (process logs kept in {logs})", file=sys.stderr)
            return 1
    shutil.rmtree(logs, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
