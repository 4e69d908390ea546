"""The master places a sharded instance on three workers started without a model (tiny llama, MLX
ring on loopback), as the README shows: `exoctl instances place MODEL --shards 3 --sharding
pipeline --wait`.

- its greedy answer equals the single-node answer; a stream closed mid-way is cancelled on every
  rank (the next answer is still exact);
- kill -9 one follower rank mid-stream: the client gets a clean error within the liveness window,
  every other rank process of that instance exits, every worker survives, and the master places
  the whole instance again, which answers exactly.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from exo_master.devtools.launcher import LocalCluster, wait_for
from exo_master.devtools.ports import free_port
from tests.e2e.conftest import ClusterFactory
from tests.e2e.test_sharded import PROMPTS, single_node, tiny3_dir  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.e2e, pytest.mark.mlx]

LIVENESS = 10.0  # seconds: the workers' --shard-timeout (3) plus heartbeats, with room for a busy CPU


def exoctl(cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "exo_master.exoctl.cli", "--api", cluster.api_url, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)


def rank_processes(worker_pids: list[int]) -> dict[int, str]:
    """The rank processes the workers started (children, by /proc): pid -> its module."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if ppid in worker_pids and b"-m" in cmdline:
            module = cmdline[cmdline.index(b"-m") + 1].decode()
            if module.startswith("exo_worker.distributed."):
                found[int(entry.name)] = module
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def ready_row(cluster: LocalCluster, placement_id: str, besides: set[str]) -> dict[str, Any] | None:
    row: dict[str, Any] = httpx.get(f"{cluster.api_url}/v1/instances/{placement_id}", timeout=5).json()
    ranks = {r["instance_id"] for r in row["instances"] if r["state"] == "ready"}
    return row if row["status"] == "ready" and len(ranks) == 3 and not ranks & besides else None


def test_the_master_places_a_pipeline_instance_that_answers_like_one_node_and_heals_a_lost_rank(
    start_cluster: ClusterFactory,
    tiny3_dir: Path,  # noqa: F811
) -> None:
    expected = single_node(tiny3_dir, PROMPTS[:1], 12)[0]
    first = free_port()
    ring = ["--ring-ports", f"{first}-{first + 30}", "--shard-timeout", "3"]
    cluster = start_cluster(
        workers=3,
        engine="mlx",
        managed=True,
        max_concurrency=4,
        worker_args=["--models-dir", str(tiny3_dir.parent), *ring],
    )
    place = ["instances", "place", tiny3_dir.name, "--shards", "3", "--sharding", "pipeline", "--wait"]
    placed = exoctl(cluster, *place)
    assert placed.returncode == 0, placed.stdout + placed.stderr
    row = httpx.get(f"{cluster.api_url}/v1/instances", timeout=5).json()["data"][0]
    placement_id = row["id"]
    assert sorted(r["rank"] for r in row["instances"]) == [0, 1, 2]
    first_ranks = {r["instance_id"] for r in row["instances"]}
    wait_for(lambda: ready_row(cluster, placement_id, set()), 180, "the sharded instance ready")
    shown = exoctl(cluster, "instances", "show", placement_id)
    assert "3 pipeline shards each" in shown.stdout and "2/3" in shown.stdout, shown.stdout

    url = f"{cluster.api_url}/v1/chat/completions"
    body = {
        "model": tiny3_dir.name,
        "messages": [{"role": "user", "content": PROMPTS[0]}],
        "max_tokens": 12,
        "temperature": 0,
    }
    answer = httpx.post(url, json=body, timeout=60)
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == expected

    # A stream closed mid-way is cancelled on rank 0 and so on every follower (else the next
    # step's collectives would not match: a hang or an error).
    long = {**body, "max_tokens": 1500, "stream": True}
    with httpx.stream("POST", url, json=long, timeout=60) as response:
        assert next(response.iter_lines()).startswith("data: ")
    again = httpx.post(url, json=body, timeout=60)
    assert again.status_code == 200 and again.json()["choices"][0]["message"]["content"] == expected

    workers = {name: proc.pid for name, proc in cluster.workers.items()}
    ranks = rank_processes(list(workers.values()))
    assert sorted(ranks.values()).count("exo_worker.distributed.follower") == 2, ranks
    victim = next(pid for pid, module in ranks.items() if module.endswith(".follower"))
    with httpx.stream("POST", url, json=long, timeout=60) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        os.kill(victim, 9)
        killed = time.monotonic()
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert '"error"' in rest[-2] and "lost" in rest[-2], rest[-2:]
    assert time.monotonic() - killed < LIVENESS
    # Every other rank of that instance ends (none left spinning in a collective); workers live on.
    wait_for(lambda: not any(alive(pid) for pid in ranks), LIVENESS, "every old rank process to exit")
    assert all(proc.poll() is None for proc in cluster.workers.values())

    # The master places the whole instance again (new ranks, new ports), and it answers exactly.
    healed = wait_for(lambda: ready_row(cluster, placement_id, first_ranks), 180, "the instance again")
    assert {r["rank"] for r in healed["instances"] if r["state"] == "ready"} == {0, 1, 2}
    after = httpx.post(url, json=body, timeout=60)
    assert after.status_code == 200 and after.json()["choices"][0]["message"]["content"] == expected
