"""The issue-20 "done when" flow, timed, on this machine: three workers without a model, two
replicas placed, a replica's worker killed -9, a delete under load, a master restart, a 409.

    python scripts/instances_flow.py --engine mlx       # SmolLM2 on real MLX workers
    python scripts/instances_flow.py --engine sim       # the same with the sim engine

Prints one line per step with its timing; exits 1 at the first step that does not hold. Not part
of `make test` (real models take minutes on a 2-core CPU).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import typer

from exo_master.devtools.launcher import ClusterSpec, LocalCluster, wait_for


def _exoctl(cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "exo_master.exoctl.cli", "--api", cluster.api_url, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)


def _row(cluster: LocalCluster, placement: str) -> dict[str, Any]:
    row: dict[str, Any] = httpx.get(f"{cluster.api_url}/v1/instances/{placement}", timeout=10).json()
    return row


def _ready_nodes(cluster: LocalCluster, placement: str) -> list[str]:
    return sorted(i["node_id"] for i in _row(cluster, placement)["instances"] if i["state"] == "ready")


def _loads(log_dir: Path) -> int:
    return sum(p.read_text().count('"event": "instance.load"') for p in log_dir.glob("node*.log"))


async def _ask(api: str, model: str, n: int, max_tokens: int) -> list[httpx.Response]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Name a colour."}],
        "max_tokens": max_tokens,
    }
    async with httpx.AsyncClient(base_url=api, timeout=600) as http:
        return list(await asyncio.gather(*(http.post("/v1/chat/completions", json=body) for _ in range(n))))


def _step(name: str, started: float, detail: str = "") -> None:
    print(f"{name:<44} {time.monotonic() - started:7.1f} s  {detail}", flush=True)


def _fail(message: str) -> None:
    print(f"FAILED: {message}", flush=True)
    raise typer.Exit(1)


def main(
    engine: str = typer.Option("mlx", help="mlx (SmolLM2) or sim."),
    heartbeat: float = typer.Option(1.0, help="Heartbeat interval (liveness is 3 of them)."),
    max_tokens: int = typer.Option(16, help="Tokens per answer."),
) -> None:
    model = "smollm2" if engine == "mlx" else "sim-model"
    log_dir = Path(tempfile.mkdtemp(prefix="exo-instances-"))
    spec = ClusterSpec(
        workers=3,
        engine=engine,
        managed=True,
        heartbeat_interval=heartbeat,
        log_dir=log_dir,
        max_concurrency=4,
        master_args=["--state-dir", str(log_dir / "state")],
        worker_args=["--sim-memory", "4GiB", "--sim-model", "sim-model=1GiB:3"] if engine == "sim" else [],
    )
    print(f"logs in {log_dir}")
    with LocalCluster(spec) as cluster, ThreadPoolExecutor(2) as pool:
        t = time.monotonic()
        cluster.start(ready_timeout=600)
        _step("3 workers joined without a model", t)

        t = time.monotonic()
        placed = _exoctl(cluster, "instances", "place", model, "--replicas", "2", "--wait", "--json")
        if placed.returncode != 0:
            _fail(placed.stderr)
        placement = json.loads(placed.stdout)["id"]
        first = _ready_nodes(cluster, placement)
        _step("place 2 replicas --wait", t, f"{placement} on {first}")

        t = time.monotonic()
        answers = asyncio.run(_ask(cluster.api_url, model, 8, max_tokens))
        spread = Counter(r.headers.get("x-exo-instance") for r in answers)
        if any(r.status_code != 200 for r in answers) or len(spread) != 2:
            _fail(f"burst: {[r.status_code for r in answers]} {spread}")
        _step("8 requests, balanced", t, str(dict(spread)))

        t = time.monotonic()
        victim = first[0]
        process = cluster.workers.pop(victim)
        during = pool.submit(asyncio.run, _ask(cluster.api_url, model, 4, max_tokens))
        process.kill()
        process.wait()
        spare = ({"node1", "node2", "node3"} - set(first)).pop()
        healed = sorted({first[1], spare})
        wait_for(lambda: _ready_nodes(cluster, placement) == healed, 900, "the healed replica", interval=0.2)
        _step(f"kill -9 {victim}: replica ready on {spare}", t)
        codes = [r.status_code for r in during.result()]
        _step("requests sent at the kill", t, str(codes))

        t = time.monotonic()
        loads = _loads(log_dir)
        assert cluster.master is not None
        cluster.stop_process(cluster.master)
        cluster.start_master()
        cluster.wait_healthy(60)
        wait_for(lambda: _ready_nodes(cluster, placement) == healed, 60, "adopted replicas", interval=0.2)
        reloaded = _loads(log_dir) - loads
        if reloaded:
            _fail(f"{reloaded} replica(s) loaded again after the restart")
        _step("master restart: adopted, 0 loads", t)

        t = time.monotonic()
        # Workers on one machine each see all of its memory: ask for more than any node has by
        # wanting a full context in each of 4,096 slots (hundreds of GiB of KV headroom; the sim
        # models have no KV, so 40 replicas of 1 GiB over three 4 GiB nodes).
        too_big = {"model": model, "max_concurrency": 4096, "replicas": 40 if engine == "sim" else 1}
        refused = httpx.post(f"{cluster.api_url}/v1/instances", json=too_big, timeout=10)
        if refused.status_code != 409:
            _fail(f"expected a 409, got {refused.status_code}")
        _step("more than fits: 409", t, refused.json()["error"]["message"][:160])

        t = time.monotonic()
        during = pool.submit(asyncio.run, _ask(cluster.api_url, model, 4, max_tokens * 4))
        wait_for(
            lambda: sum(
                i["in_flight"] for i in httpx.get(f"{cluster.api_url}/v1/cluster/state").json()["instances"]
            ),
            120,
            "requests in flight",
        )
        deleted = _exoctl(cluster, "instances", "delete", placement)
        codes = [r.status_code for r in during.result()]
        if deleted.returncode != 0 or codes != [200] * 4:
            _fail(f"delete: {deleted.stderr} {codes}")
        wait_for(lambda: not httpx.get(f"{cluster.api_url}/v1/instances").json()["data"], 120, "unloaded")
        _step("delete under load: all 200, then unloaded", t, str(codes))


if __name__ == "__main__":
    typer.run(main)
