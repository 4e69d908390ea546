"""Discovery with real processes on this host only: the master advertises on loopback
(`--advertise`), a worker with no `--master` finds it by mDNS on 127.0.0.1 and joins, `exoctl
discover` lists it, and a worker holding another master key refuses to join."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from exo_master.devtools.launcher import wait_for
from protocol import keys
from tests.e2e.conftest import ClusterFactory

pytestmark = pytest.mark.e2e
BIN = Path(sys.prefix) / "bin"


def test_a_worker_without_master_joins_by_discovery_and_checks_the_key(
    start_cluster: ClusterFactory, tmp_path: Path
) -> None:
    cluster_name = f"t-{uuid.uuid4().hex[:10]}"  # unique: other tests' masters may advertise too
    cluster = start_cluster(workers=1, discovery_cluster=cluster_name)  # returns once it serves
    state = cluster.state()
    assert state is not None and [n["node_id"] for n in state["nodes"]] == ["node1"]
    log = (cluster.spec.log_dir / "node1.log").read_text()  # type: ignore[operator]
    joined = [json.loads(line) for line in log.splitlines() if '"worker.discovered"' in line]
    assert joined and joined[0]["cluster"] == cluster_name
    assert joined[0]["master"] == f"127.0.0.1:{cluster.bus_port}"
    assert cluster.keys is not None
    assert joined[0]["master_key"] == keys.fingerprint(keys.load_public(cluster.keys.master_public))

    listed = subprocess.run(
        [str(BIN / "exoctl"), "discover", "--interface", "127.0.0.1", "--timeout", "2", "--json"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    mine = [m for m in json.loads(listed.stdout)["masters"] if m["cluster"] == cluster_name]
    assert len(mine) == 1 and mine[0]["bus_port"] == cluster.bus_port
    assert mine[0]["api"] == cluster.api_url and mine[0]["session"] == cluster.session

    # A worker that trusts another master key never connects: one line, exit code 2.
    other_public, _ = keys.generate(tmp_path / "other", "other")
    _, secret = cluster.keys.worker("node2")
    impostor = subprocess.run(
        [str(BIN / "exo-worker"), "--cluster", cluster_name, "--mdns-interface", "127.0.0.1",
         "--node-id", "node2", "--secret-key", str(secret), "--master-key", str(other_public),
         "--log-format", "json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert impostor.returncode == 2, impostor.stdout + impostor.stderr
    assert "refusing to join it" in impostor.stdout + impostor.stderr
    wait_for(lambda: cluster.state() is not None, 5, "the master")
    state = cluster.state()
    assert state is not None and [n["node_id"] for n in state["nodes"]] == ["node1"]
