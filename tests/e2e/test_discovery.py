"""Discovery with real processes on this host only: the master advertises on loopback
(`--advertise`), a worker with no `--master` finds it by mDNS on 127.0.0.1 and joins, `exoctl
discover` lists it, and a worker holding another master key refuses to join (exit codes and the
refusal line itself: `tests/protocol/test_discovery.py`)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from exo_master.exoctl.cli import app as exoctl_app
from exo_worker.bus_auth import load_client_curve
from exo_worker.discover import find_master
from protocol import keys
from protocol.discovery import DiscoveryError
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

    # exoctl discover (in-process: the same browse, without another interpreter start).
    listed = CliRunner().invoke(
        exoctl_app, ["discover", "--interface", "127.0.0.1", "--timeout", "5", "--json"]
    )
    assert listed.exit_code == 0, listed.output
    mine = [m for m in json.loads(listed.stdout)["masters"] if m["cluster"] == cluster_name]
    assert len(mine) == 1 and mine[0]["bus_port"] == cluster.bus_port
    assert mine[0]["api"] == cluster.api_url and mine[0]["session"] == cluster.session

    # A worker that trusts another master key never connects: exo-worker logs this one line and
    # exits 2 (`worker.no_master`). Checked here on the worker's own discovery step.
    other_public, _ = keys.generate(tmp_path / "other", "other")
    _, secret = cluster.keys.worker("node2", authorize=False)
    wary = load_client_curve(secret, other_public)
    with pytest.raises(DiscoveryError, match="refusing to join it"):
        find_master(cluster_name, 10, ["127.0.0.1"], wary)
    trusting = load_client_curve(secret, cluster.keys.master_public)
    address, advert = find_master(cluster_name, 10, ["127.0.0.1"], trusting)
    assert (address.host, address.port, advert.session) == ("127.0.0.1", cluster.bus_port, cluster.session)


def test_a_worker_that_finds_no_master_says_so_in_one_line_and_exits_2() -> None:
    # A process of its own: the daemon configures logging for the whole interpreter.
    result = subprocess.run(
        [str(BIN / "exo-worker"), "--cluster", f"none-{uuid.uuid4().hex[:8]}", "--mdns-interface",
         "127.0.0.1", "--discover-timeout", "0.5", "--log-format", "json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    output = result.stdout + result.stderr
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert [line["event"] for line in lines] == ["worker.no_master"]
    assert "pass --master HOST:PORT" in lines[0]["error"]
