"""Measure what the README's failure table states: detection and recovery times, with real
processes on loopback (sim workers, default 1 s heartbeats unless noted). Prints a markdown table
and writes JSON (--out).

    python scripts/measure_failures.py --out bench/results/failures.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exo_master.devtools.launcher import ClusterSpec, LocalCluster, wait_for
from exo_master.devtools.ports import free_port_pair
from tests.e2e.test_bus_faults import BURST, burst, expected_text

BODY = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 400}


async def stream_then_kill(cluster: LocalCluster) -> float:
    """Seconds from SIGKILL of the serving worker to the client's error event."""
    async with (
        httpx.AsyncClient(base_url=cluster.api_url, timeout=60) as http,
        http.stream("POST", "/v1/chat/completions", json={**BODY, "stream": True}) as r,
    ):
        lines = r.aiter_lines()
        async for line in lines:
            if '"content":"' in line and '"content":""' not in line:
                break
        killed = time.monotonic()
        cluster.workers[r.headers["x-exo-node"]].kill()
        async for line in lines:
            if '"error"' in line:
                return time.monotonic() - killed
    raise RuntimeError("no error event after the kill")


def faulty_burst(drop: float, seed: int, tmp: Path) -> dict[str, Any]:
    listen = free_port_pair()
    cluster = LocalCluster(
        ClusterSpec(
            workers=2,
            max_concurrency=16,
            sim_tokens_per_s=400.0,
            worker_master=f"127.0.0.1:{listen}",
            curve=False,
        )
    )
    stats = tmp / f"proxy-{drop}-{seed}.json"
    proxy = subprocess.Popen(
        [sys.executable, "-m", "tests.support.fault_proxy", "--upstream", f"127.0.0.1:{cluster.bus_port}",
         "--listen", f"127.0.0.1:{listen}", f"--drop={drop}", f"--seed={seed}", "--stats", str(stats)],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proxy.stdout is not None
        proxy.stdout.readline()
        cluster.start()
        started = time.monotonic()
        replies = asyncio.run(burst(cluster.api_url))
        elapsed = time.monotonic() - started
        exact = sum(text == expected_text(i) for i, (text, _) in enumerate(replies))
    finally:
        cluster.stop()
        proxy.send_signal(signal.SIGTERM)
        proxy.wait(timeout=10)
    counts = json.loads(stats.read_text())
    return {
        "drop": drop,
        "seed": seed,
        "exact": exact,
        "of": BURST,
        "burst_s": round(elapsed, 3),
        "proxy": counts,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        results["bursts"] = [faulty_burst(0.0, 1, tmp)] + [faulty_burst(0.1, seed, tmp) for seed in (1, 2, 3)]
        with LocalCluster(ClusterSpec(workers=2, sim_tokens_per_s=50)) as cluster:
            cluster.start()
            results["worker_kill_to_client_error_s"] = round(asyncio.run(stream_then_kill(cluster)), 3)
        with LocalCluster(ClusterSpec(workers=2)) as cluster:
            cluster.start()
            assert cluster.master is not None
            cluster.stop_process(cluster.master)
            started = time.monotonic()
            cluster.start_master()
            cluster.wait_ready(2, timeout=30)
            results["master_restart_to_ready_s"] = round(time.monotonic() - started, 3)
        with LocalCluster(ClusterSpec(workers=1)) as cluster:
            cluster.start()
            original = cluster.workers["node1"]
            started = time.monotonic()
            duplicate = cluster.start_worker("node1")
            cluster.workers["node1"] = original
            results["duplicate_node_exit_code"] = duplicate.wait(timeout=30)
            results["duplicate_node_refused_after_s"] = round(time.monotonic() - started, 3)
            original.kill()
            original.wait()
            started = time.monotonic()
            cluster.workers["node1"] = cluster.start_worker("node1")
            wait_for(lambda: asyncio.run(_served(cluster.api_url)), timeout=30, what="the restarted worker")
            results["worker_restart_same_id_to_serving_s"] = round(time.monotonic() - started, 3)
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


async def _served(api_url: str) -> bool:
    async with httpx.AsyncClient(timeout=5) as http:
        body = {**BODY, "max_tokens": 2}
        return (await http.post(f"{api_url}/v1/chat/completions", json=body)).status_code == 200


if __name__ == "__main__":
    raise SystemExit(main())
