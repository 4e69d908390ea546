"""The issue-21 "done when" flow, timed, on this machine: three workers started without a model; the
master places SmolLM2 as one instance over several of them, exactly as the README shows
(`exoctl instances place smollm2 --shards 3 --sharding tensor --wait`); the README's France
question (temperature 0) must get the single-node text; then one rank is killed with -9 mid-stream.

    python scripts/shard_flow.py                                   # tensor:3 then pipeline:2
    python scripts/shard_flow.py --configs pipeline:3 --model tiny # the tiny llama, quicker

For each configuration: the time to ready, TTFT and decode tokens/s of the answer, whether it equals
the single-node text, then, after `kill -9` of a follower rank mid-stream, how long the client
waited for its error, whether every other rank process of the instance exited (none left
spinning), whether every worker lived on, and how long the master took to place the whole
instance again. Results: bench/results/shard_flow.json; exits 1 at the first step that does not
hold. Not part of `make test` (real models take minutes on a 2-core CPU).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import typer
from benchkit.procs import ROOT, load_average, machine_info

sys.path.insert(0, str(ROOT))
from exo_master.devtools.launcher import ClusterSpec, LocalCluster, wait_for
from exo_master.devtools.ports import free_port
from tests.e2e.test_sharded_by_master import alive, rank_processes
from tests.support.tiny_model import build_tiny_model

QUESTION = "What is the capital of France?"


def exoctl(cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "exo_master.exoctl.cli", "--api", cluster.api_url, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=1800, check=False)


def ask(cluster: LocalCluster, model: str, max_tokens: int) -> dict[str, Any]:
    """The question, streamed: the text, TTFT and decode tokens/s."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.monotonic()
    first = last = 0.0
    pieces: list[str] = []
    tokens = 0
    with httpx.stream("POST", f"{cluster.api_url}/v1/chat/completions", json=body, timeout=900) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                text = choice.get("delta", {}).get("content") or ""
                if text:
                    first = first or time.monotonic()
                    last = time.monotonic()
                    pieces.append(text)
    decode = (tokens - 1) / (last - first) if tokens > 1 and last > first else 0.0
    return {"text": "".join(pieces), "ttft_s": round(first - start, 2), "decode_tok_s": round(decode, 2)}


def place(cluster: LocalCluster, model: str, args: list[str]) -> tuple[dict[str, Any], float]:
    """`exoctl instances place MODEL ARGS --wait`, as the README shows it: the row once it is ready."""
    start = time.monotonic()
    result = exoctl(cluster, "instances", "place", model, *args, "--wait", "--wait-timeout", "1500", "--json")
    if result.returncode != 0:
        raise SystemExit(f"place {model} {' '.join(args)} failed: {result.stdout}{result.stderr}")
    row = json.loads(result.stdout[result.stdout.index("{") :])
    return ready_again(cluster, row["id"], set()), round(time.monotonic() - start, 1)


def ready_again(cluster: LocalCluster, placement_id: str, besides: set[str]) -> dict[str, Any]:
    """The placement's row once every rank is ready and none is one of `besides`."""

    def ready() -> dict[str, Any] | None:
        row: dict[str, Any] = httpx.get(f"{cluster.api_url}/v1/instances/{placement_id}", timeout=10).json()
        ids = {r["instance_id"] for r in row["instances"] if r["state"] == "ready"}
        return row if row["status"] == "ready" and len(ids) == row["shards"] and not ids & besides else None

    row: dict[str, Any] = wait_for(ready, 1500, f"{placement_id} ready")
    return row


def kill_mid_stream(cluster: LocalCluster, model: str) -> dict[str, Any]:
    workers = [p.pid for p in cluster.workers.values()]
    ranks = rank_processes(workers)
    victim = next(pid for pid, module in ranks.items() if module.endswith(".follower"))
    body = {"model": model, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 400}
    with httpx.stream(
        "POST", f"{cluster.api_url}/v1/chat/completions", json={**body, "stream": True}, timeout=900
    ) as response:
        lines = response.iter_lines()
        while not next(lines).startswith("data: {"):
            pass
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        rest = [line for line in lines if line]
    error_after = time.monotonic() - killed
    clean_error = rest[-1] == "data: [DONE]" and '"error"' in rest[-2]
    try:
        wait_for(lambda: not any(alive(pid) for pid in ranks), 60, "the old ranks to exit")
        ranks_exited = time.monotonic() - killed
    except TimeoutError:
        ranks_exited = -1.0
    return {
        "error_after_s": round(error_after, 2),
        "clean_error": clean_error,
        "error_line": rest[-2][:300] if len(rest) > 1 else "",
        "old_ranks_exited_after_s": round(ranks_exited, 2),
        "workers_alive": all(p.poll() is None for p in cluster.workers.values()),
    }


def main(
    configs: str = typer.Option("tensor:3,pipeline:2", help="SHARDING:K, comma-separated."),
    model: str = typer.Option("smollm2", help="smollm2, or tiny (a tiny llama built here)."),
    max_tokens: int = typer.Option(16, help="Tokens of each timed answer."),
    out: Path = typer.Option(ROOT / "bench/results/shard_flow.json", help="Where the results go."),
) -> None:
    scratch = Path(tempfile.mkdtemp(prefix="exo-shard-flow-"))
    worker_args = ["--shard-timeout", "30"]  # a busy 2-core CPU must not look like a lost rank
    name = model
    if model == "tiny":
        shape = {"num_attention_heads": 6, "num_key_value_heads": 3, "hidden_size": 96}
        build_tiny_model(
            scratch / "models" / "tiny3",
            whole_characters=True,
            num_hidden_layers=3,
            intermediate_size=192,
            **shape,
        )
        worker_args += ["--models-dir", str(scratch / "models")]
        name = "tiny3"
    first = free_port()
    worker_args += ["--ring-ports", f"{first}-{first + 60}"]
    spec = ClusterSpec(
        workers=3,
        engine="mlx",
        managed=True,
        max_concurrency=4,
        log_dir=scratch / "logs",
        worker_args=worker_args,
    )
    results: dict[str, Any] = {"machine": machine_info(), "model": name, "load_before": load_average()}
    with LocalCluster(spec) as cluster:
        cluster.start(ready_timeout=600)
        single_row, single_load = place(cluster, name, ["--shards", "1"])
        single = ask(cluster, name, max_tokens)
        typer.echo(f"one node: ready in {single_load} s, {single}")
        results["single"] = {"ready_s": single_load, **single}
        exoctl(cluster, "instances", "delete", single_row["id"])
        for config in configs.split(","):
            sharding, _, k = config.partition(":")
            row, ready_s = place(cluster, name, ["--shards", k, "--sharding", sharding])
            answer = ask(cluster, name, max_tokens)
            same = answer["text"] == single["text"]
            typer.echo(f"{config}: ready in {ready_s} s, {answer}, same text as one node: {same}")
            loss = kill_mid_stream(cluster, name)
            typer.echo(f"{config}: kill -9 of a follower mid-stream: {loss}")
            first_ranks = {r["instance_id"] for r in row["instances"]}
            again = time.monotonic()
            ready_again(cluster, row["id"], first_ranks)
            again_s = round(time.monotonic() - again + loss["error_after_s"], 1)
            typer.echo(f"{config}: placed again and ready in {again_s} s after the kill")
            results[config] = {
                "ready_s": ready_s,
                **answer,
                "same_text": same,
                **loss,
                "replaced_ready_s": again_s,
            }
            exoctl(cluster, "instances", "delete", row["id"])
            if not (
                same
                and loss["clean_error"]
                and loss["workers_alive"]
                and loss["old_ranks_exited_after_s"] >= 0
            ):
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(results, indent=2))
                raise SystemExit(f"{config}: a step did not hold (logs in {scratch / 'logs'})")
    results["load_after"] = load_average()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    typer.echo(f"results in {out}")


if __name__ == "__main__":
    typer.run(main)
