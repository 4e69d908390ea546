"""Pure rendering for `exoctl`: ClusterView rows in, rich Tables and JSON-ready dicts out.

No I/O here (`exoctl.client` fetches, `exoctl.watch` prints), so every helper is unit-testable.
JSON documents reuse the ClusterView field names unchanged (see `protocol.cluster_view`); the only
additions are `totals` and `affinity` (for `load`) and the wrapper keys documented in
`exo_master.exoctl.cli`.
"""

from __future__ import annotations

from typing import Any

import msgspec
from rich.table import Table
from rich.text import Text

from protocol.cluster_view import ClusterView, InstanceRow, NodeRow, TaskRow

INSTANCE_STYLE = {
    "ready": "green",
    "loading": "yellow",
    "draining": "magenta",
    "failed": "red",
    "dead": "bold red",
}
TASK_STYLE = {
    "queued": "yellow",
    "pending": "cyan",
    "running": "green",
    "finished": "dim",
    "failed": "red",
    "cancelled": "magenta",
}


def format_age(seconds: float) -> str:
    """A short human duration: 0.4s, 12s, 3m05s, 2h07m."""
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def _rows(rows: list[Any]) -> list[dict[str, Any]]:
    return [msgspec.to_builtins(row) for row in rows]


# ---- load ---------------------------------------------------------------------------------------


def load_totals(view: ClusterView) -> dict[str, Any]:
    """Cluster-wide sums. `queued` is summed per model: an instance row repeats its model's queue."""
    instances = view.instances
    return {
        "instances": len(instances),
        "in_flight": sum(i.in_flight for i in instances),
        "pending": sum(i.pending for i in instances),
        "queued": sum(m.queued for m in view.models),
        "capacity": round(sum(i.capacity for i in instances), 6),
        "max_concurrency": sum(i.max_concurrency for i in instances),
        "completed": sum(i.completed for i in instances),
        "failed": sum(i.failed for i in instances),
    }


def load_json(view: ClusterView) -> dict[str, Any]:
    return {
        "policy": view.policy,
        "session": view.session,
        "instances": _rows(view.instances),
        "models": _rows(view.models),
        "totals": load_totals(view),
        "affinity": {
            "enabled": view.prefix_affinity,
            "lookups": view.affinity_lookups,
            "hits": view.affinity_hits,
        },
    }


def affinity_summary(view: ClusterView) -> str:
    """How prefix-aware placement fared, for the load table's caption."""
    if not view.prefix_affinity:
        return "prefix affinity off"
    if not view.affinity_lookups:
        return "prefix affinity on: no chat with a known prefix placed yet"
    share = 100 * view.affinity_hits / view.affinity_lookups
    return (
        f"prefix affinity: {view.affinity_hits}/{view.affinity_lookups} chats with a known prefix "
        f"placed on its holder ({share:.0f}%)"
    )


def _instance_status(row: InstanceRow) -> Text:
    return Text(row.status, style=INSTANCE_STYLE.get(row.status, ""))


def not_ready_reason(row: InstanceRow, nodes: dict[str, NodeRow]) -> str:
    """Why an instance takes no requests ("" when it is ready): the worker's own error first."""
    if row.status == "ready":
        return ""
    if row.error:
        return row.error
    if row.status == "dead":
        node = nodes.get(row.node_id)
        if node is not None:
            return f"node {row.node_id}: no heartbeat for {format_age(node.last_heartbeat_age)}"
        return f"node {row.node_id} stopped heartbeating"
    if row.status == "loading":
        return "loading the model"
    if row.status == "failed":
        return "the worker reported a failure without a reason (see its log)"
    return row.status


def load_line(view: ClusterView, clock: str) -> str:
    """One line per refresh for `exoctl load --watch` into a pipe: totals, then each instance."""
    totals = load_totals(view)
    nodes = {n.node_id: n for n in view.nodes}
    ready = sum(1 for i in view.instances if i.status == "ready")
    parts = [
        f"{clock} ready {ready}/{totals['instances']}",
        f"in-flight {totals['in_flight']}",
        f"pending {totals['pending']}",
        f"queued {totals['queued']}",
        f"completed {totals['completed']}",
        f"failed {totals['failed']}",
    ]
    rows = []
    for row in view.instances:
        text = f"{row.instance_id} {row.status} {row.in_flight}+{row.pending}"
        reason = not_ready_reason(row, nodes)
        rows.append(f"{text} ({reason})" if reason else text)
    return " · ".join(parts) + (" | " + ", ".join(rows) if rows else "")


def cache_hit_rate(row: InstanceRow) -> str:
    """The share of requests that reused the instance's prompt cache ("-": none reported yet)."""
    seen = row.prompt_cache_hits + row.prompt_cache_misses
    return f"{100 * row.prompt_cache_hits / seen:.0f}%" if seen else "-"


def cache_token_share(row: InstanceRow) -> str:
    """The share of prompt tokens the cache spared the model ("-": none reported yet)."""
    return f"{100 * row.prompt_cache_reused_tokens / row.prompt_tokens:.0f}%" if row.prompt_tokens else "-"


def load_table(view: ClusterView) -> Table:
    table = Table(
        title=f"load · policy {view.policy} · session {view.session}",
        caption="queued: requests waiting at the master for the instance's model\n"
        "in-flight +N: tasks the engine still runs for nobody (cancelled, being stopped)\n"
        "prefill tok / decoding: the engine's work (prompt tokens to process, sequences decoding)\n"
        "tokens reused: the share of prompt tokens served from the instance's prompt cache\n"
        + affinity_summary(view),
        show_footer=False,
    )
    table.add_column("instance")
    table.add_column("node")
    table.add_column("model")
    table.add_column("status")
    for name in (
        "in-flight",
        "pending",
        "queued",
        "capacity",
        "max conc.",
        "completed",
        "failed",
        "cache hits",
        "tokens reused",
        "prefill tok",
        "decoding",
    ):
        table.add_column(name, justify="right")
    nodes = {n.node_id: n for n in view.nodes}
    reasons = [not_ready_reason(row, nodes) for row in view.instances]
    # Only when something is not ready: a healthy cluster keeps its narrow table.
    with_reasons = any(reasons)
    if with_reasons:
        table.add_column("why not ready", overflow="fold", style="red")
    for row, reason in zip(view.instances, reasons, strict=True):
        table.add_row(
            row.instance_id,
            row.node_id,
            row.model,
            _instance_status(row),
            f"{row.in_flight}+{row.unowned}" if row.unowned else str(row.in_flight),
            str(row.pending),
            str(row.queued),
            f"{row.capacity:g}",
            str(row.max_concurrency),
            str(row.completed),
            str(row.failed),
            cache_hit_rate(row),
            cache_token_share(row),
            str(row.prefill_tokens),
            str(row.decoding),
            *([reason] if with_reasons else []),
        )
    totals = load_totals(view)
    table.add_section()
    table.add_row(
        Text("total", style="bold"),
        "",
        f"{len(view.models)} model(s)",
        "",
        str(totals["in_flight"]),
        str(totals["pending"]),
        str(totals["queued"]),
        f"{totals['capacity']:g}",
        str(totals["max_concurrency"]),
        str(totals["completed"]),
        str(totals["failed"]),
        "",
        "",
        "",
        "",
        *([""] if with_reasons else []),
        style="bold",
    )
    return table


# ---- nodes --------------------------------------------------------------------------------------


def nodes_json(view: ClusterView) -> dict[str, Any]:
    return {"nodes": _rows(view.nodes)}


def _node_state(row: NodeRow) -> Text:
    return Text("alive", style="green") if row.alive else Text("dead", style="bold red")


def nodes_line(view: ClusterView, clock: str) -> str:
    """One line per refresh for `exoctl nodes --watch` into a pipe."""
    alive = sum(1 for n in view.nodes if n.alive)
    rows = [
        f"{n.node_id} {'alive' if n.alive else 'dead'} {format_age(n.last_heartbeat_age)} ago"
        + ("" if n.subscribed else " unsubscribed")
        + (f" gaps {n.sequence_gaps}" if n.sequence_gaps else "")
        for n in view.nodes
    ]
    return f"{clock} alive {alive}/{len(view.nodes)}" + (" | " + ", ".join(rows) if rows else "")


def _ids(ids: list[str], shown: int = 4) -> str:
    if len(ids) <= shown:
        return ", ".join(ids)
    return ", ".join(ids[:shown]) + f" (+{len(ids) - shown})"


def gib(count: int) -> str:
    return f"{count / 2**30:.1f}"


def node_memory(row: NodeRow) -> str:
    """'3.2/16.0 GiB' (used of total; used = total - available), '-' when the node does not say."""
    if row.memory_total <= 0:
        return "-"
    used = max(0, row.memory_total - row.memory_available)
    return f"{gib(used)}/{gib(row.memory_total)} GiB"


def nodes_table(view: ClusterView) -> Table:
    alive = sum(1 for n in view.nodes if n.alive)
    table = Table(title=f"nodes · {alive}/{len(view.nodes)} alive")
    table.add_column("node")
    table.add_column("address")
    table.add_column("heartbeat", justify="right")
    table.add_column("state")
    table.add_column("subscribed")
    table.add_column("memory used/total", justify="right")
    table.add_column("instances")
    table.add_column("seq. gaps", justify="right")
    for row in view.nodes:
        table.add_row(
            row.node_id,
            row.address,
            format_age(row.last_heartbeat_age) + " ago",
            _node_state(row),
            "yes" if row.subscribed else Text("no", style="yellow"),
            node_memory(row),
            _ids(row.instances),
            Text(str(row.sequence_gaps), style="yellow" if row.sequence_gaps else ""),
        )
    return table


# ---- tasks --------------------------------------------------------------------------------------


def filter_tasks(tasks: list[TaskRow], status: str | None, limit: int) -> list[TaskRow]:
    """Keep tasks in `status` (all when None), at most `limit` of them, in the server's order."""
    kept = [t for t in tasks if status is None or t.status == status]
    return kept[: max(0, limit)]


def tasks_json(tasks: list[TaskRow]) -> dict[str, Any]:
    return {"tasks": _rows(tasks)}


def tasks_table(tasks: list[TaskRow], status: str | None = None) -> Table:
    title = f"tasks · {len(tasks)} shown" + (f" · status {status}" if status else "")
    table = Table(title=title)
    table.add_column("task")
    table.add_column("kind")
    table.add_column("model")
    table.add_column("instance")
    table.add_column("status")
    table.add_column("age", justify="right")
    with_errors = any(t.error for t in tasks)
    if with_errors:
        table.add_column("error", overflow="fold")
    for row in tasks:
        cells: list[str | Text] = [
            row.task_id,
            row.kind,
            row.model,
            row.instance_id or "-",
            Text(row.status, style=TASK_STYLE.get(row.status, "")),
            format_age(row.age),
        ]
        if with_errors:
            cells.append(row.error or "")
        table.add_row(*cells)
    return table
