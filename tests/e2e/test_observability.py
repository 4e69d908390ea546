"""exoctl, /metrics and the master's logs against a real master and sim workers holding a burst."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner, Result

from exo_master.devtools.launcher import LocalCluster, wait_for
from exo_master.devtools.ports import free_port
from exo_master.exoctl.cli import app
from tests.e2e.conftest import ClusterFactory

pytestmark = pytest.mark.e2e
MODEL = "sim-model"
SLOTS = 2  # per worker
BURST = 7  # 2 workers x 2 slots run, 3 wait in the master's queue
ACCEPT_DELAY = 2.0  # seconds a sim worker holds a task before confirming it (when supported)


@functools.cache
def accept_delay_supported() -> bool:
    """Does exo-worker have --sim-accept-delay (tasks stay *pending* in the ledger for a while)?"""
    help_text = subprocess.run(
        [sys.executable, "-m", "exo_worker.daemon", "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "250", "NO_COLOR": "1"},
        timeout=60,
    ).stdout
    return "--sim-accept-delay" in help_text


class HeldBurst:
    """`n` streaming chat completions held open from a background event loop until closed.

    A stream's headers arrive once its task is placed, so `placed` maps the task ids the client
    has seen to their instance (x-exo-task, x-exo-instance); queued requests are not in it yet.
    """

    def __init__(self, api_url: str, n: int) -> None:
        self.api_url, self.n = api_url, n
        self.placed: dict[str, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def __enter__(self) -> HeldBurst:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def placed_ids(self) -> dict[str, str]:
        with self._lock:
            return dict(self.placed)

    async def _main(self) -> None:
        limits = httpx.Limits(max_connections=self.n + 4)
        async with httpx.AsyncClient(base_url=self.api_url, timeout=120, limits=limits) as http:
            held = [asyncio.create_task(self._hold(http)) for _ in range(self.n)]
            await asyncio.to_thread(self._stop.wait)
            for task in held:
                task.cancel()  # closing the streams cancels their tasks at the master
            await asyncio.gather(*held, return_exceptions=True)

    async def _hold(self, http: httpx.AsyncClient) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}
        async with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
            assert response.status_code == 200
            with self._lock:
                self.placed[response.headers["x-exo-task"]] = response.headers["x-exo-instance"]
            await asyncio.Event().wait()


runner = CliRunner()


def exoctl(*args: str) -> Result:
    return runner.invoke(app, list(args), env={"COLUMNS": "200", "NO_COLOR": "1"})


def exoctl_json(cluster: LocalCluster, *args: str) -> Any:
    result = exoctl(*args, "--json", "--api", cluster.api_url)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def load_when(cluster: LocalCluster, what: str, **totals: int) -> dict[str, Any]:
    """Poll `exoctl load --json` until its totals match; return that document."""

    def matches() -> dict[str, Any] | None:
        doc: dict[str, Any] = exoctl_json(cluster, "load")
        return doc if all(doc["totals"][k] == v for k, v in totals.items()) else None

    result: dict[str, Any] = wait_for(matches, 20, what)
    return result


def scrape(cluster: LocalCluster) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """GET /metrics, parsed: sample name -> {sorted labels: value}."""
    response = httpx.get(f"{cluster.api_url}/metrics", timeout=5)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def total(metrics: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str) -> float:
    return sum(metrics.get(name, {}).values())


def placement_lines(log_dir: Path | None) -> list[dict[str, Any]]:
    """The master's JSON log lines for placement decisions (the launcher writes master.log)."""
    assert log_dir is not None
    lines = (log_dir / "master.log").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    return [r for r in records if r.get("event") == "placement"]


def parse_totals_row(table: str) -> list[str]:
    row = next(line for line in table.splitlines() if line.lstrip("│ ").startswith("total"))
    return [cell.strip() for cell in row.split("│") if cell.strip()]


def test_exoctl_metrics_and_logs_agree_with_a_held_burst(start_cluster: ClusterFactory) -> None:
    delay = accept_delay_supported()
    cluster = start_cluster(
        workers=2,
        max_concurrency=SLOTS,
        sim_tokens_per_s=2,  # tasks stay in flight for the whole test
        worker_args=["--sim-accept-delay", str(ACCEPT_DELAY)] if delay else [],
    )
    with HeldBurst(cluster.api_url, BURST) as burst:
        running = 2 * SLOTS
        if delay:
            # Placed but not yet confirmed: the ledger's pending count, balanced over both instances.
            doc = load_when(cluster, "the burst to be pending", pending=running, queued=BURST - running)
            assert doc["totals"]["in_flight"] == 0
            assert [i["pending"] for i in doc["instances"]] == [SLOTS, SLOTS]
        doc = load_when(cluster, "the burst to be confirmed", in_flight=running, queued=BURST - running)
        totals = doc["totals"]
        assert totals["pending"] == 0
        assert totals["in_flight"] + totals["pending"] + totals["queued"] == BURST
        assert [(i["instance_id"], i["in_flight"], i["queued"]) for i in doc["instances"]] == [
            ("node1/0", SLOTS, BURST - running),
            ("node2/0", SLOTS, BURST - running),
        ]
        assert doc["models"] == [{"model": MODEL, "instances": 2, "ready": 2, "queued": BURST - running}]
        assert totals["max_concurrency"] == running and totals["instances"] == 2

        # The human table: one row per instance and a totals row with the same numbers.
        table = exoctl("load", "--api", cluster.api_url)
        assert table.exit_code == 0, table.output
        assert "node1/0" in table.stdout and "node2/0" in table.stdout
        cells = parse_totals_row(table.stdout)
        in_flight, pending, queued = (int(c) for c in cells[2:5])
        assert in_flight + pending + queued == BURST and queued == BURST - running

        # --watch --json: one JSON document per line per refresh.
        watched = exoctl("load", "--api", cluster.api_url, "--json", "--watch", "--count", "2", "-n", "0.05")
        assert watched.exit_code == 0, watched.output
        documents = [json.loads(line) for line in watched.stdout.splitlines()]
        assert len(documents) == 2 and all(d["totals"]["queued"] == BURST - running for d in documents)

        nodes = exoctl_json(cluster, "nodes")["nodes"]
        assert [(n["node_id"], n["alive"], n["subscribed"], n["instances"]) for n in nodes] == [
            ("node1", True, True, ["node1/0"]),
            ("node2", True, True, ["node2/0"]),
        ]
        assert all(n["sequence_gaps"] == 0 and n["last_heartbeat_age"] < 3 for n in nodes)

        placed = wait_for(lambda: p if len(p := burst.placed_ids()) == running else None, 10, "headers")
        tasks = exoctl_json(cluster, "tasks", "--status", "running")["tasks"]
        assert {t["task_id"]: t["instance_id"] for t in tasks} == placed
        assert all(t["status"] == "running" and t["model"] == MODEL for t in tasks)
        waiting = exoctl_json(cluster, "tasks", "--status", "queued", "--limit", "2")["tasks"]
        assert len(waiting) == 2 and all(t["instance_id"] is None for t in waiting)

        metrics = scrape(cluster)
        in_flight_m = total(metrics, "exo_instance_in_flight")
        pending_m = total(metrics, "exo_instance_pending")
        assert (in_flight_m, pending_m, total(metrics, "exo_queue_depth")) == (running, 0, BURST - running)
        assert (
            metrics["exo_instance_in_flight"][(("instance", "node1/0"), ("model", MODEL), ("node", "node1"))]
            == SLOTS
        )
        assert metrics["exo_live_tasks"] == {
            (("status", "queued"),): BURST - running,
            (("status", "pending"),): 0,
            (("status", "running"),): running,
        }
        assert total(metrics, "exo_placements_total") == running
        assert total(metrics, "exo_ledger_reservations_total") == running
        assert total(metrics, "exo_ledger_confirmations_total") == running
        assert total(metrics, "exo_ledger_expiries_total") == 0
        assert total(metrics, "exo_placement_decision_seconds_count") == BURST
        assert 0 < total(metrics, "exo_placement_decision_seconds_sum") < 0.1 * BURST
        assert total(metrics, "exo_rejections_total") == 0
        assert total(metrics, "exo_tasks_ended_total") == 0
        assert metrics["exo_node_up"] == {(("node", "node1"),): 1, (("node", "node2"),): 1}
        assert metrics["exo_bus_messages_received_total"][(("type", "TaskAccepted"),)] >= running
        assert metrics["exo_bus_messages_sent_total"][(("type", "AssignTask"),)] >= running
        assert total(metrics, "exo_bus_malformed_frames_total") == 0
        assert total(metrics, "exo_bus_sequence_gaps_total") == 0

        # One JSON placement line per placed request, with its context as fields.
        lines = placement_lines(cluster.spec.log_dir)
        assert {line["task_id"]: line["instance_id"] for line in lines} == placed
        assert all(line["node_id"] == line["instance_id"].split("/")[0] for line in lines)
        assert len(lines) == total(metrics, "exo_placements_total")


def test_exoctl_cancel_frees_the_slot_for_the_queued_request(start_cluster: ClusterFactory) -> None:
    cluster = start_cluster(workers=1, max_concurrency=1, sim_tokens_per_s=2)
    with HeldBurst(cluster.api_url, 2) as burst:
        load_when(cluster, "one running and one queued", in_flight=1, queued=1)
        (first,) = wait_for(burst.placed_ids, 10, "the first placement")

        result = exoctl("cancel", first, "--api", cluster.api_url)
        assert result.exit_code == 0, result.output
        assert result.stdout.strip() == f"cancelled {first}"

        # The queued request takes the freed slot; the cancelled task is listed as such.
        load_when(cluster, "the queued request to run", in_flight=1, queued=0)
        second = wait_for(lambda: set(burst.placed_ids()) - {first}, 10, "the second placement")
        cancelled = exoctl_json(cluster, "tasks", "--status", "cancelled")["tasks"]
        assert [(t["task_id"], t["error"]) for t in cancelled] == [(first, "cancelled by operator")]
        assert [t["task_id"] for t in exoctl_json(cluster, "tasks", "--status", "running")["tasks"]] == list(
            second
        )
        metrics = scrape(cluster)
        assert metrics["exo_tasks_ended_total"][(("status", "cancelled"),)] == 1
        assert total(metrics, "exo_placements_total") == 2
        assert total(metrics, "exo_queue_wait_seconds_count") == 2
        assert {line["task_id"] for line in placement_lines(cluster.spec.log_dir)} == {first, *second}

        # No such live task any more: the API's message on one line, exit 1.
        again = exoctl("cancel", first, "--api", cluster.api_url)
        assert again.exit_code == 1
        assert again.stderr.strip().splitlines() == [f"exoctl: no live task {first} (HTTP 404)"]
        assert again.stdout == ""
        bad = httpx.get(f"{cluster.api_url}/v1/cluster/state", params={"status": "bogus"}, timeout=5)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "status"
        # Not the master's API at that path: an HTTP error, exit 1, one line.
        wrong = exoctl("nodes", "--api", f"{cluster.api_url}/not-here")
        assert wrong.exit_code == 1 and len(wrong.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("command", [["load"], ["nodes"], ["tasks"], ["cancel", "t1"], ["load", "--watch"]])
def test_exoctl_against_a_closed_port_exits_2_with_one_line(command: list[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = exoctl(*command, "--api", url)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"exoctl: cannot reach the master at {url}")
    assert "Traceback" not in result.output and result.stdout == ""
