"""exoctl instances: the progress line, the preview table, and one-line errors when the master is
down (exit 2) or refuses (exit 1)."""

from __future__ import annotations

from rich.console import Console
from typer.testing import CliRunner

from exo_master.devtools.ports import free_port
from exo_master.exoctl.cli import app
from exo_master.exoctl.instances import placements_table, plan_table, progress_line
from protocol.instance_view import PlacementRow, PlanView, ReplicaRow


def _text(renderable: object) -> str:
    console = Console(width=200, record=True)
    console.print(renderable)
    return console.export_text()


ROW = PlacementRow(
    id="smollm2-abc",
    model="smollm2",
    status="loading",
    managed=True,
    replicas=2,
    ready=1,
    nodes=["a", "b"],
    max_concurrency=4,
    capacity=1.0,
    need_bytes=2**29,
    instances=[
        ReplicaRow(
            instance_id="a/smollm2-abc.0", node_id="a", state="ready", progress=1.0, memory_bytes=2**29
        ),
        ReplicaRow(instance_id="b/smollm2-abc.1", node_id="b", state="loading", progress=0.4, memory_bytes=0),
    ],
)


def test_the_progress_line_shows_each_replica_and_its_percent() -> None:
    assert progress_line(ROW) == "smollm2-abc: loading 1/2 ready | a ready, b loading 40%"


def test_the_list_marks_unmanaged_instances() -> None:
    unmanaged = PlacementRow(
        id="c/0",
        model="m",
        status="ready",
        managed=False,
        replicas=1,
        ready=1,
        nodes=["c"],
        max_concurrency=1,
        capacity=1.0,
        need_bytes=0,
    )
    text = _text(placements_table([ROW, unmanaged]))
    assert "c/0 (unmanaged)" in text and "0.50 GiB" in text and "1/2" in text


def test_the_preview_table_has_a_row_per_node_with_its_reason() -> None:
    plan = PlanView(
        model="m", replicas=2, fits=False, need_bytes=2**30, nodes=["a"], reasons={"b": "too small"}
    )
    text = _text(plan_table(plan))
    assert "does not fit" in text
    rows = {line.split()[1]: line.split()[3] for line in text.splitlines() if line.startswith(("│ a", "│ b"))}
    assert rows == {"a": "1", "b": "0"}
    assert "too small" in text


def test_an_unreachable_master_is_one_line_and_exit_2() -> None:
    result = CliRunner().invoke(app, ["instances", "list", "--api", f"http://127.0.0.1:{free_port()}"])
    assert result.exit_code == 2
    assert result.output.startswith("exoctl: cannot reach the master")
