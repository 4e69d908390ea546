"""exoctl and the daemons at 80 columns: compact tables with whole ids, `--wide` for every column,
help screens that never cut an option name and show flags as flags."""

from __future__ import annotations

import click
import pytest
import typer
from rich.table import Table
from typer.main import get_command
from typer.testing import CliRunner

from exo_master.daemon import app as master_app
from exo_master.exoctl import cli, compact, render
from exo_master.exoctl.cli import app as exoctl_app
from exo_worker.daemon import app as worker_app
from protocol.cluster_view import ClusterView, InstanceRow, ModelRow, NodeRow, TaskRow

runner = CliRunner()
# Ids as a real home lab makes them: hostname, a random suffix, the instance index.
NODES = ["studio-m2-ultra-3f9a", "macbook-pro-de-marie-0c41"]


def big_view(models: tuple[str, ...] = ("mlx-community/SmolLM2-135M-Instruct",)) -> ClusterView:
    instances = [
        InstanceRow(
            instance_id=f"{node}/{i}", node_id=node, model=models[i % len(models)], kinds=["TextGeneration"],
            status="ready" if i else "loading", in_flight=12, pending=3, queued=140, capacity=2.5,
            max_concurrency=16, completed=123456, failed=7, prompt_cache_hits=9, prompt_cache_misses=3,
            prompt_cache_reused_tokens=900, prompt_tokens=1000,
        )
        for node in NODES
        for i in range(2)
    ]  # fmt: skip
    return ClusterView(
        policy="least-loaded",
        session="0123456789ab",
        nodes=[
            NodeRow(
                node_id=node,
                address="192.168.1.20",
                alive=n == 0,
                subscribed=True,
                last_heartbeat_age=0.4,
                instances=[f"{node}/0", f"{node}/1"],
            )
            for n, node in enumerate(NODES)
        ],
        instances=instances,
        models=[ModelRow(model=m, instances=2, ready=1, queued=140) for m in models],
        tasks=[
            TaskRow(
                task_id="chatcmpl-0123456789abcdef01234567",
                kind="TextGeneration",
                model=models[0],
                status="failed",
                instance_id=instances[0].instance_id,
                node_id=NODES[0],
                age=3.0,
                attempts=2,
                error="the worker ran out of memory while loading the model weights",
            )
        ],
    )


class FakeClient:
    def __init__(self, view: ClusterView) -> None:
        self.view = view

    def state(self, tasks: int = 0, status: str | None = None) -> ClusterView:
        return self.view

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.fixture
def fake_master(monkeypatch: pytest.MonkeyPatch) -> ClusterView:
    view = big_view(("mlx-community/SmolLM2-135M-Instruct", "sim-model"))
    monkeypatch.setattr(cli, "connected", lambda api, timeout, api_key=None: FakeClient(view))
    return view


@pytest.mark.parametrize("command", ["load", "nodes", "tasks"])
def test_at_80_columns_every_line_fits_and_every_id_is_whole(fake_master: ClusterView, command: str) -> None:
    result = runner.invoke(exoctl_app, [command], env={"COLUMNS": "80", "EXO_API": None})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(map(len, lines)) <= 80, result.output
    ids = {
        "load": [row.instance_id for row in fake_master.instances],
        "nodes": [row.node_id for row in fake_master.nodes],
        "tasks": [row.task_id for row in fake_master.tasks],
    }[command]
    for ident in ids:
        assert any(ident in line for line in lines), (ident, result.output)
    assert "…" not in result.output


def test_the_compact_load_keeps_the_numbers_and_says_why_not_ready(fake_master: ClusterView) -> None:
    out = runner.invoke(exoctl_app, ["load"], env={"COLUMNS": "80", "EXO_API": None}).output
    assert "12+3/16" in out  # in-flight + pending / max concurrency
    assert "90%" in out  # prompt tokens reused
    assert f"{NODES[1]}/0: node {NODES[1]}: no heartbeat" not in out  # loading, the node is dead:
    assert f"{NODES[0]}/0: loading the model" in out
    assert "--wide" in out


def test_wide_shows_the_full_table_with_every_column(fake_master: ClusterView) -> None:
    out = runner.invoke(exoctl_app, ["load", "--wide"], env={"COLUMNS": "80", "EXO_API": None}).output
    for header in ("node", "capacity", "max conc.", "cache hits", "tokens reused", "why not ready"):
        assert header in out, out
    assert "…" not in out


def test_a_wide_terminal_gets_the_full_layout_without_asking() -> None:
    view = big_view()
    assert compact.fits(render.load_table(view), 300)
    assert not compact.fits(render.load_table(view), 80)
    assert isinstance(compact.fitted(render.load_table, compact.load_compact, 300)(view), Table)
    assert not isinstance(compact.fitted(render.load_table, compact.load_compact, 80)(view), Table)


def _commands(app: typer.Typer) -> list[tuple[list[str], click.Command]]:
    """Every command of an app with the arguments that reach its help screen."""
    root = get_command(app)
    found: list[tuple[list[str], click.Command]] = [([], root)]
    if isinstance(root, click.Group):
        for name, command in root.commands.items():
            found.append(([name], command))
            if isinstance(command, click.Group):
                found += [([name, sub], c) for sub, c in command.commands.items()]
    return found


@pytest.mark.parametrize("app", [master_app, worker_app, exoctl_app], ids=["master", "worker", "exoctl"])
def test_no_help_screen_cuts_an_option_name_or_shows_a_flag_as_taking_a_value(app: typer.Typer) -> None:
    for path, command in _commands(app):
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "80"})
        assert result.exit_code == 0, (path, result.output)
        assert "…" not in result.output, (path, result.output)
        assert "<bool>" not in result.output, (path, result.output)
        for param in command.params:
            for name in param.opts:
                if name.startswith("--"):
                    assert name in result.output, (path, name, result.output)
