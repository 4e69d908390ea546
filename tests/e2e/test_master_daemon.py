"""The master daemon's edges: a taken port, and garbage on its bus."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import httpx
import pytest

from exo_master.devtools.launcher import wait_for
from exo_master.devtools.ports import free_port_pair
from protocol import keys
from tests.e2e.buspeer import BusPeer
from tests.e2e.conftest import ClusterFactory

pytestmark = pytest.mark.e2e


def test_a_taken_api_port_is_one_clear_line_and_exit_code_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["--api-port", str(port), "--bus-port", str(free_port_pair()), "--log-format", "json"]
        master = subprocess.run(
            [sys.executable, "-m", "exo_master.daemon", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert master.returncode == 2
    (line,) = master.stderr.strip().splitlines()
    assert json.loads(line)["event"] == "master.cannot_start"


def _malformed_frames(api_url: str) -> float:
    metrics = httpx.get(f"{api_url}/metrics", timeout=5).text
    return sum(
        float(m.split()[-1]) for m in metrics.splitlines() if m.startswith("exo_bus_malformed_frames_total")
    )


def test_garbage_on_the_bus_is_counted_and_dropped(start_cluster: ClusterFactory) -> None:
    """Even from an authorized key: garbage is counted and dropped, the cluster keeps serving."""
    cluster = start_cluster(workers=1)
    assert cluster.keys is not None
    _, secret = cluster.keys.worker("garbler")
    rogue = BusPeer(cluster, keys.load_keypair(secret), keys.load_public(cluster.keys.master_public))
    rogue.wait_admitted()
    garbage = [[b"master\x00", b"\xc1\xff not msgpack"], [b"only one frame"], [b"x", b"\x91" * 2000]]
    try:

        def counted() -> bool:
            for frames in garbage:  # PUB drops until connected (slow joiner): keep offering them
                rogue.send_raw(frames)
            return _malformed_frames(cluster.api_url) >= len(garbage)

        wait_for(counted, 15, "the master to count malformed frames")
    finally:
        rogue.close()
    assert httpx.get(f"{cluster.api_url}/health", timeout=5).json()["instances_ready"] == 1
    body = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    assert httpx.post(f"{cluster.api_url}/v1/chat/completions", json=body, timeout=30).status_code == 200
