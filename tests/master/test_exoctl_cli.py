"""exoctl's command line without a master: --version, completion, where --api comes from, the
why-not-ready column and the one-line-per-refresh rendering used when --watch goes into a pipe."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from rich.console import Console
from rich.table import Table
from typer.testing import CliRunner

from exo_master.daemon import app as master_app
from exo_master.devtools.ports import free_ports
from exo_master.exoctl import cli, render
from exo_master.exoctl.cli import app as exoctl_app
from exo_worker.daemon import app as worker_app
from protocol.cluster_view import ClusterView, InstanceRow, ModelRow, NodeRow
from protocol.version import package_version

runner = CliRunner()
BIN = Path(sys.prefix) / "bin"


@pytest.mark.parametrize(
    ("app", "name"), [(exoctl_app, "exoctl"), (master_app, "exo-master"), (worker_app, "exo-worker")]
)
def test_version_comes_from_the_package_metadata(app: object, name: str) -> None:
    result = runner.invoke(app, ["--version"])  # type: ignore[arg-type]
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"{name} {package_version()}"
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", package_version())


@pytest.mark.parametrize("command", ["exoctl", "exo-master", "exo-worker"])
def test_the_installed_commands_offer_shell_completion(command: str) -> None:
    path = BIN / command
    if not path.exists():
        pytest.skip(f"{command} is not installed in {BIN}")
    wide = {**os.environ, "COLUMNS": "200"}  # rich shortens long option names in a narrow help table
    help_text = subprocess.run(
        [str(path), "--help"], capture_output=True, text=True, timeout=60, check=True, env=wide
    )
    assert "--install-completion" in help_text.stdout
    # What the installed completion runs (`--show-completion` prints the same script, but it looks
    # for the shell among its ancestors, and a test run may have none): the script, then an answer.
    var = f"_{command.replace('-', '_').upper()}_COMPLETE"
    script = subprocess.run(
        [str(path)], capture_output=True, text=True, timeout=60, env={**os.environ, var: "source_bash"}
    )
    assert script.returncode == 0, script.stderr
    assert f"_{command.replace('-', '_')}_completion()" in script.stdout
    asked = {**os.environ, var: "complete_bash", "COMP_WORDS": f"{command} --vers", "COMP_CWORD": "1"}
    answer = subprocess.run([str(path)], capture_output=True, text=True, timeout=60, env=asked)
    assert answer.stdout.split() == ["--version"], answer.stderr
    version = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=60, check=True)
    assert version.stdout.strip() == f"{command} {package_version()}"


def _unreachable(args: list[str], env: dict[str, str] | None = None) -> str:
    """Run exoctl against closed ports; return the URL its one error line names."""
    result = runner.invoke(exoctl_app, args, env=env)
    assert result.exit_code == 2, result.output
    match = re.search(r"the master at (\S+?):? ", result.output)
    assert match, result.output
    return match.group(1)


def test_api_works_before_and_after_the_command_and_after_wins() -> None:
    first, second, third = (f"http://127.0.0.1:{port}" for port in free_ports(3))
    no_env = {"EXO_API": None}
    assert _unreachable(["--api", first, "load"], no_env) == first  # type: ignore[arg-type]
    assert _unreachable(["load", "--api", first], no_env) == first  # type: ignore[arg-type]
    assert _unreachable(["--api", first, "nodes", "--api", second], no_env) == second  # type: ignore[arg-type]
    assert _unreachable(["tasks"], {"EXO_API": third}) == third
    # An explicit --api, before or after the command, beats the environment.
    assert _unreachable(["--api", first, "tasks"], {"EXO_API": third}) == first
    assert _unreachable(["cancel", "t1", "--api", second], {"EXO_API": third}) == second


def test_without_any_api_the_default_url_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    used: list[str] = []

    def record(api: str, timeout: float, api_key: str | None = None) -> None:
        used.append(api)
        raise typer.Exit(0)  # never contact whatever listens on the default port

    monkeypatch.setattr(cli, "connected", record)
    for command in (["load"], ["nodes"], ["tasks"], ["cancel", "t1"]):
        result = runner.invoke(exoctl_app, command, env={"EXO_API": None})
        assert result.exit_code == 0, result.output
    assert used == [cli.DEFAULT_API] * 4 == ["http://127.0.0.1:52415"] * 4


def view(status: str = "ready", error: str | None = None, alive: bool = True) -> ClusterView:
    return ClusterView(
        policy="least-loaded",
        session="s1",
        nodes=[
            NodeRow(
                node_id="n1", address="a", alive=True, subscribed=True, last_heartbeat_age=0.2,
                instances=["n1/0"],
            ),
            NodeRow(
                node_id="n2", address="b", alive=alive, subscribed=alive, last_heartbeat_age=75,
                instances=["n2/0"],
            ),
        ],
        instances=[
            InstanceRow(
                instance_id="n1/0", node_id="n1", model="m", kinds=["TextGeneration"], status="ready",
                in_flight=2, pending=1, queued=0, capacity=1, max_concurrency=4, completed=5, failed=0,
            ),
            InstanceRow(
                instance_id="n2/0", node_id="n2", model="m", kinds=["TextGeneration"], status=status,
                in_flight=0, pending=0, queued=0, capacity=1, max_concurrency=4, completed=1, failed=2,
                error=error,
            ),
        ],
        models=[ModelRow(model="m", instances=2, ready=1 + (status == "ready"), queued=0)],
        tasks=[],
    )  # fmt: skip


def text_of(table: Table) -> str:
    out = io.StringIO()
    Console(file=out, width=250, color_system=None).print(table)
    return out.getvalue()


@pytest.mark.parametrize(
    ("status", "error", "alive", "reason"),
    [
        ("failed", "cannot load model x: no config.json", True, "cannot load model x: no config.json"),
        ("failed", None, True, "without a reason"),
        ("loading", None, True, "loading the model"),
        ("dead", None, False, "node n2: no heartbeat for 1m15s"),
    ],
)
def test_the_load_table_says_why_an_instance_is_not_ready(
    status: str, error: str | None, alive: bool, reason: str
) -> None:
    v = view(status, error, alive)
    text = text_of(render.load_table(v))
    assert "why not ready" in text
    row = next(line for line in text.splitlines() if "n2/0" in line)
    assert status in row and reason in row
    n1 = next(line for line in text.splitlines() if "n1/0" in line)
    assert "no heartbeat" not in n1 and "loading" not in n1
    assert reason in render.load_line(v, "12:00:00")


def test_a_healthy_cluster_has_no_reason_column() -> None:
    assert "why not ready" not in text_of(render.load_table(view()))


def test_one_line_per_refresh_carries_the_totals_and_every_instance() -> None:
    line = render.load_line(view("dead", None, False), "12:00:00")
    assert "\n" not in line
    assert line.startswith("12:00:00 ready 1/2 · in-flight 2 · pending 1 · queued 0 · completed 6 · failed 2")
    assert "n1/0 ready 2+1" in line and "n2/0 dead 0+0" in line
    nodes = render.nodes_line(view("dead", None, False), "12:00:00")
    assert nodes == "12:00:00 alive 1/2 | n1 alive 0.2s ago, n2 dead 1m15s ago unsubscribed"
