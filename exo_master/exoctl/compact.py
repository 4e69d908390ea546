"""Narrow layouts of exoctl's tables, for terminals of 80 columns; the full ones are in `render`.

The full load table needs about 150 columns. When it does not fit (and `--wide` is not given), the
compact layout shows the same rows with fewer, shorter columns and no vertical rules: ids are
never cut (a column that holds ids keeps its widest cell), each model gets its own small table
with the model as its title, and reasons ("why not ready", task errors) go below the table as lines that wrap.
Pure: views in, renderables out.
"""

from __future__ import annotations

import io
from collections.abc import Callable

from rich.console import Console, Group, RenderableType
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from exo_master.exoctl import render
from protocol.cluster_view import ClusterView, ModelRow, TaskRow


def fits(renderable: RenderableType, width: int) -> bool:
    """Whether `renderable` prints in `width` columns without shrinking a column."""
    # Measured on a very wide console: rich clamps a table's measure to the console it is given.
    measuring = Console(width=10_000, file=io.StringIO())
    return Measurement.get(measuring, measuring.options, renderable).maximum <= width


def fitted(
    full: Callable[[ClusterView], RenderableType],
    compact: Callable[[ClusterView], RenderableType],
    width: int,
) -> Callable[[ClusterView], RenderableType]:
    """A table function that draws the full layout when it fits in `width`, else the compact one."""

    def draw(view: ClusterView) -> RenderableType:
        table = full(view)
        return table if fits(table, width) else compact(view)

    return draw


def narrow_table(title: str) -> Table:
    """The compact layout's table: no rules, one space either side of a cell."""
    # No rules and one space either side of a cell: two columns between cells, none at the edges.
    return Table(
        title=title,
        box=None,
        pad_edge=False,
        padding=(0, 1),
        title_justify="left",
        title_style="bold",
        header_style="bold underline",
    )


def _id_column(table: Table, header: str, ids: list[str]) -> None:
    # An id is copied into other commands: it is never shortened, whatever the terminal.
    table.add_column(header, no_wrap=True, min_width=max([len(header), *map(len, ids)]))


def _reasons(pairs: list[tuple[str, str]]) -> list[Text]:
    return [Text.assemble((name, "bold"), ": ", (reason, "red")) for name, reason in pairs if reason]


def load_compact(view: ClusterView) -> RenderableType:
    """One small table per model (the model is its title), then the cluster's totals."""
    nodes = {n.node_id: n for n in view.nodes}
    tables: list[RenderableType] = []
    models: list[ModelRow | None] = [*view.models] or [None]
    for model in models:
        rows = [row for row in view.instances if model is None or row.model == model.model]
        title = f"{model.model} · {model.ready}/{model.instances} ready" if model else "load · no instance"
        table = narrow_table(title)
        _id_column(table, "instance", [row.instance_id for row in rows])
        table.add_column("status")
        table.add_column("busy", justify="right")  # in-flight + pending / max concurrency
        for name in ("queued", "done", "failed", "reused"):
            table.add_column(name, justify="right")
        for row in rows:
            table.add_row(
                row.instance_id,
                Text(row.status, style=render.INSTANCE_STYLE.get(row.status, "")),
                f"{row.in_flight}+{row.pending}/{row.max_concurrency}",
                str(row.queued),
                str(row.completed),
                str(row.failed),
                render.cache_token_share(row),
            )
        tables.append(table)
    totals = render.load_totals(view)
    summary = Text.assemble(
        ("total ", "bold"),
        f"{totals['instances']} instances · busy {totals['in_flight']}+{totals['pending']}/"
        f"{totals['max_concurrency']} · queued {totals['queued']} · done {totals['completed']} · "
        f"failed {totals['failed']}",
    )
    notes = Text(
        f"policy {view.policy} · busy: in-flight + pending / max concurrency · reused: prompt tokens "
        f"from the cache · {render.affinity_summary(view)} · --wide: every column",
        style="dim",
    )
    why = [(row.instance_id, render.not_ready_reason(row, nodes)) for row in view.instances]
    return Group(*tables, summary, *_reasons(why), notes)


def nodes_compact(view: ClusterView) -> RenderableType:
    alive = sum(1 for n in view.nodes if n.alive)
    table = narrow_table(f"nodes · {alive}/{len(view.nodes)} alive")
    _id_column(table, "node", [row.node_id for row in view.nodes])
    table.add_column("state")
    table.add_column("heartbeat", justify="right")
    table.add_column("memory", justify="right")  # used/total
    table.add_column("inst.", justify="right")
    table.add_column("gaps", justify="right")
    for row in view.nodes:
        state = Text("alive", style="green") if row.alive else Text("dead", style="bold red")
        if not row.subscribed:
            state.append(" unsub.", style="yellow")
        table.add_row(
            row.node_id,
            state,
            render.format_age(row.last_heartbeat_age),
            render.node_memory(row),
            str(len(row.instances)),
            Text(str(row.sequence_gaps), style="yellow" if row.sequence_gaps else ""),
        )
    return Group(table, Text("--wide: addresses and instance ids", style="dim"))


def tasks_compact(tasks: list[TaskRow], status: str | None = None) -> RenderableType:
    table = narrow_table(f"tasks · {len(tasks)} shown" + (f" · status {status}" if status else ""))
    _id_column(table, "task", [row.task_id for row in tasks])
    table.add_column("status")
    table.add_column("instance", overflow="fold")
    table.add_column("age", justify="right")
    for row in tasks:
        table.add_row(
            row.task_id,
            Text(row.status, style=render.TASK_STYLE.get(row.status, "")),
            row.instance_id or "-",
            render.format_age(row.age),
        )
    return Group(table, *_reasons([(row.task_id, row.error or "") for row in tasks]))
