"""The launcher never claims someone else's cluster, and `scripts/local_cluster.py` (so `make run`)
cleans up after itself: ports checked first, readiness only from its own master, log folders."""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from exo_master.devtools.launcher import ClusterSpec, LocalCluster, wait_for
from exo_master.devtools.ports import ClusterStartError, PortInUse, free_port, free_port_pair, port_is_free
from tests.e2e.conftest import ClusterFactory

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "local_cluster.py"


class Script:
    """scripts/local_cluster.py as a child process, its output collected line by line."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        # Its own process group, as a terminal's foreground job: Ctrl-C can go to the whole group.
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--engine", "sim", "--workers", "1", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
            cwd=ROOT,
            start_new_session=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def _drain(self) -> list[str]:
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return self.seen

    def wait_line(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        def found() -> re.Match[str] | None:
            if self.proc.poll() is not None and self.lines.empty():
                raise AssertionError(f"exited with {self.proc.returncode}: {self.seen}")
            return next((m for line in self._drain() if (m := re.search(pattern, line))), None)

        match: re.Match[str] = wait_for(found, timeout, f"a line matching {pattern!r}")
        return match

    def stop(self, signal_it: bool = True) -> int:
        if signal_it and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        wait_for(lambda: self.lines.empty() or self._drain() is not None, 10, "the last lines")
        self._drain()
        return code


@pytest.fixture
def scripts() -> Iterator[list[Script]]:
    started: list[Script] = []
    yield started
    for script in started:  # by PID, only what the test started
        if script.proc.poll() is None:
            script.proc.send_signal(signal.SIGTERM)  # it stops the master and workers it started
            try:
                script.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(script.proc.pid, signal.SIGKILL)  # its own group: only what it started
                script.proc.wait()
        # A failed test must not leave its exo-cluster-* folder behind either.
        for line in script._drain():
            if match := re.search(r"logs in (\S+exo-cluster-\w+)", line):
                shutil.rmtree(match.group(1), ignore_errors=True)


def _first_cluster_untouched(cluster: LocalCluster, session: str) -> None:
    state = cluster.state()
    assert state is not None and state["session"] == session
    assert {n["node_id"] for n in state["nodes"]} == {"node1", "node2"}
    assert all(proc.poll() is None for proc in cluster.workers.values())


def test_a_second_launcher_on_taken_ports_fails_clearly_and_leaves_the_first_alone(
    start_cluster: ClusterFactory, scripts: list[Script]
) -> None:
    first = start_cluster(workers=2)
    session = first.session
    cases = [
        ([], {"EXO_API_PORT": str(first.api_port), "EXO_BUS_PORT": str(first.bus_port)}, first.api_port),
        (["--api-port", str(free_port()), "--bus-port", str(first.bus_port)], {}, first.bus_port),
        # The launcher binds BUS_PORT and BUS_PORT + 1: the first taken one is named (on a shared
        # machine the port below ours may belong to someone else).
        (
            ["--api-port", str(free_port()), "--bus-port", str(first.bus_port - 1)],
            {},
            first.bus_port if port_is_free("127.0.0.1", first.bus_port - 1) else first.bus_port - 1,
        ),
    ]
    for args, env, port in cases:
        result = subprocess.run(
            [sys.executable, str(SCRIPT), "--engine", "sim", *args],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, **env},
            cwd=ROOT,
        )
        assert result.returncode == 2, result.stdout + result.stderr
        (line,) = result.stdout.strip().splitlines()
        assert f"port {port} " in line and "already in use" in line
        suggested = re.search(r"make run API_PORT=(\d+) BUS_PORT=(\d+)", line)
        assert suggested and int(suggested.group(1)) != first.api_port
        _first_cluster_untouched(first, session)


def test_readiness_is_read_only_from_the_master_this_launcher_started(start_cluster: ClusterFactory) -> None:
    first = start_cluster(workers=2)
    other = LocalCluster(ClusterSpec(api_port=first.api_port, bus_port=free_port_pair()))
    with pytest.raises(PortInUse, match=f"port {first.api_port} "):
        other.check_ports()
    other.session = "local-not-that-one"  # as if it had started a master that is not answering
    with pytest.raises(ClusterStartError, match="another master"):
        other.wait_healthy(timeout=10)
    assert first.session.startswith("local-") and first.state() is not None


def test_local_cluster_honours_env_ports_prints_working_hints_and_removes_its_logs(
    scripts: list[Script],
) -> None:
    api_port, bus_port = free_port(), free_port_pair()
    env = {"EXO_API_PORT": str(api_port), "EXO_BUS_PORT": str(bus_port)}
    script = Script("--demo", "2", env=env)
    scripts.append(script)
    logs = Path(script.wait_line(r"logs in (\S+)").group(1))
    assert logs.name.startswith("exo-cluster-") and logs.is_dir()
    script.wait_line(rf"Ready\. OpenAI-compatible API at http://127\.0\.0\.1:{api_port}/v1")
    script.wait_line(r"^\[1/2\] node1/0 ")  # a line per answer as it arrives
    script.wait_line(r"^\[2/2\] node1/0 ")
    hint = script.wait_line(r"Load, from another shell in this folder: (.+)$").group(1)
    assert f"--api http://127.0.0.1:{api_port}" in hint
    shown = subprocess.run(
        ["bash", "-c", f"{hint} --count 1"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert shown.returncode == 0 and "ready 1/1" in shown.stdout, shown.stdout + shown.stderr
    assert script.stop() == 0
    assert not logs.exists()


def test_ctrl_c_to_the_whole_group_is_a_clean_stop(scripts: list[Script]) -> None:
    api_port, bus_port = free_port(), free_port_pair()
    script = Script("--api-port", str(api_port), "--bus-port", str(bus_port))
    scripts.append(script)
    logs = Path(script.wait_line(r"logs in (\S+)").group(1))
    script.wait_line("Ctrl-C stops everything")
    os.killpg(script.proc.pid, signal.SIGINT)  # the group this test started: what Ctrl-C does
    assert script.stop(signal_it=False) == 0, script.seen
    assert not logs.exists()
    assert all(port_is_free("127.0.0.1", port) for port in (api_port, bus_port, bus_port + 1))


def test_logs_are_kept_when_asked_or_when_the_cluster_fails(tmp_path: Path, scripts: list[Script]) -> None:
    kept = Script("--keep-logs", "--api-port", str(free_port()), "--bus-port", str(free_port_pair()))
    scripts.append(kept)
    logs = Path(kept.wait_line(r"logs in (\S+)").group(1))
    kept.wait_line("Serving")
    assert kept.stop() == 0
    assert any(f"Logs kept in {logs}" in line for line in kept.seen)
    assert (logs / "master.log").is_file()

    bad_model = tmp_path / "not-a-model"
    bad_model.mkdir()  # no config.json: the worker cannot load it and exits
    failing = Script(
        "--engine", "mlx", "--model", str(bad_model),
        "--api-port", str(free_port()), "--bus-port", str(free_port_pair()),
    )  # fmt: skip
    scripts.append(failing)
    failed_logs = Path(failing.wait_line(r"logs in (\S+)").group(1))
    failing.wait_line("cluster did not start")
    assert failing.stop(signal_it=False) == 1  # it ends by itself
    assert any(f"Logs kept in {failed_logs}" in line for line in failing.seen)
    assert (failed_logs / "node1.log").is_file()


def test_make_run_passes_its_port_variables_through() -> None:
    if subprocess.run(["make", "--version"], capture_output=True).returncode != 0:
        pytest.skip("make is not installed")
    dry = subprocess.run(
        ["make", "-n", "-W", "pyproject.toml", "run", "API_PORT=52425", "BUS_PORT=52426"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert "--api-port 52425" in dry.stdout and "--bus-port 52426" in dry.stdout
    default = subprocess.run(["make", "-n", "run"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "scripts/local_cluster.py" in default.stdout and "--api-port" not in default.stdout
