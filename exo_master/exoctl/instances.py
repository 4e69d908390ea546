"""`exoctl instances`: where models live, through /v1/instances.

    exoctl instances place MODEL [--replicas N] [--node NODE]... [--exclude NODE]... [--wait]
                                 [--shards K --sharding tensor|pipeline]   one replica over K nodes
    exoctl instances list [--wide]           a compact layout when the terminal is narrow
    exoctl instances show ID                 the replicas and the placement's recent steps
    exoctl instances delete ID               drain (requests in flight finish), then unload
    exoctl instances preview MODEL [--replicas N]   where it would go, and why not elsewhere

Every command takes --json (the API's documents, `protocol.instance_view` field names). `place`
exits 1 with the reason per node when the model fits nowhere (HTTP 409); `--wait` follows the
load (state and percent per replica) until every replica is ready, and exits 1 if the placement
fails or `--wait-timeout` passes.
"""

from __future__ import annotations

import time
from typing import Annotated, Any
from urllib.parse import quote

import msgspec
import typer
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from exo_master.exoctl import compact
from exo_master.exoctl.client import ApiFailure, MasterClient, connected
from exo_master.exoctl.watch import console, print_json, sized_by_terminal
from protocol.instance_view import PlacementRow, PlanView
from protocol.sharding import Sharding

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Place, list and delete model instances.")

_STYLE = {
    "ready": "green",
    "loading": "yellow",
    "placing": "yellow",
    "degraded": "yellow",
    "draining": "magenta",
}
_STYLE |= {"failed": "bold red", "dead": "bold red", "unloading": "magenta"}

ApiUrl = Annotated[
    str | None, typer.Option("--api", show_default=False, help="Base URL of the master's API.")
]
ApiKey = Annotated[
    str | None,
    typer.Option("--api-key", envvar="EXO_API_KEY", show_default=False, help="Bearer key for the API."),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print the API's JSON document.")]
Wide = Annotated[
    bool, typer.Option("--wide", help="Every column, however wide (default: a compact layout when narrow).")
]
Timeout = Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds to wait for each API call.")]
Replicas = Annotated[int, typer.Option("--replicas", "-r", min=1, max=64, help="How many replicas.")]
Nodes = Annotated[list[str] | None, typer.Option("--node", help="Use only this node (repeatable).")]
Exclude = Annotated[list[str] | None, typer.Option("--exclude", help="Never this node (repeatable).")]
Shards = Annotated[
    int,
    typer.Option(
        "--shards", min=1, max=16, help="Split each replica over this many nodes (MLX distributed)."
    ),
]
ShardingKind = Annotated[
    Sharding,
    typer.Option(
        "--sharding", help="tensor: a slice of every layer per node; pipeline: a range of layers per node."
    ),
]


def _client(ctx: typer.Context, api: str | None, timeout: float, api_key: str | None) -> Any:
    root = ctx.find_root().obj
    return connected(api or (root if isinstance(root, str) else "http://127.0.0.1:52415"), timeout, api_key)


def _row(document: Any) -> PlacementRow:
    return msgspec.convert(document, PlacementRow)


def _gib(count: int) -> str:
    return f"{count / 2**30:.2f} GiB" if count else "-"


def placements_table(rows: list[PlacementRow]) -> Table:
    table = Table(title=f"instances · {len(rows)}")
    for column in ("id", "model", "status", "ready", "nodes", "memory each", "reason"):
        table.add_column(column, justify="right" if column in ("ready", "memory each") else "left")
    for row in rows:
        name = row.id if row.managed else f"{row.id} (unmanaged)"
        table.add_row(
            name,
            row.model,
            Text(row.status, style=_STYLE.get(row.status, "")),
            f"{row.ready}/{row.replicas}",
            ", ".join(row.nodes),
            _gib(row.need_bytes),
            row.reason,
        )
    return table


def placements_compact(rows: list[PlacementRow]) -> RenderableType:
    """For 80 columns: id (never shortened), status, ready, memory; model, nodes and reason below."""
    table = compact.narrow_table(f"instances · {len(rows)}")
    ids = [row.id if row.managed else f"{row.id}*" for row in rows]
    table.add_column("id", no_wrap=True, min_width=max([2, *map(len, ids)]))
    table.add_column("status")
    table.add_column("ready", justify="right")
    table.add_column("memory each", justify="right")
    for name, row in zip(ids, rows, strict=True):
        table.add_row(
            name,
            Text(row.status, style=_STYLE.get(row.status, "")),
            f"{row.ready}/{row.replicas}",
            _gib(row.need_bytes),
        )
    details = [
        Text.assemble(
            (row.id, "bold"),
            f": {row.model} on {', '.join(row.nodes) or '-'}",
            (f" · {row.reason}" if row.reason else "", "red"),
        )
        for row in rows
    ]
    note = Text("*: unmanaged (declared by its worker) · --wide: every column", style="dim")
    return Group(table, *details, note)


def replicas_table(row: PlacementRow) -> Table:
    sharded = f" · {row.shards} {row.sharding} shards each" if row.shards > 1 else ""
    table = Table(title=f"{row.id} · {row.model} · {row.status} · {row.ready}/{row.replicas} ready{sharded}")
    columns = ["instance", "node", "state", "progress", "memory", "reason"]
    if row.shards > 1:
        columns[1:1] = ["rank", "ring"]
    for column in columns:
        table.add_column(column)
    for r in sorted(row.instances, key=lambda r: (r.group or r.instance_id, r.rank or 0)):
        cells: list[str | Text] = [r.instance_id, r.node_id, Text(r.state, style=_STYLE.get(r.state, ""))]
        cells += [f"{r.progress:.0%}", _gib(r.memory_bytes), r.reason]
        if row.shards > 1:
            cells[1:1] = [f"{r.rank}/{row.shards}" if r.rank is not None else "-", r.address]
        table.add_row(*cells)
    return table


def events_table(row: PlacementRow) -> Table:
    table = Table(title="recent steps")
    for column in ("ago", "step", "instance", "node", "detail"):
        table.add_column(column)
    for e in row.events:
        table.add_row(f"{e.age:.1f} s", e.what, e.instance_id, e.node_id, e.detail)
    return table


def plan_table(plan: PlanView) -> RenderableType:
    verdict = "fits" if plan.fits else "does not fit"
    if plan.shards > 1:
        return _sharded_plan(plan, verdict)
    table = Table(title=f"{plan.replicas} x {plan.model} ({_gib(plan.need_bytes)} each): {verdict}")
    table.add_column("node")
    table.add_column("replicas", justify="right")
    table.add_column("why not (more)")
    for node in sorted(set(plan.nodes) | set(plan.reasons)):
        table.add_row(node, str(plan.nodes.count(node)), plan.reasons.get(node, ""))
    return table


def _sharded_plan(plan: PlanView, verdict: str) -> RenderableType:
    title = f"{plan.replicas} x {plan.model} in {plan.shards} {plan.sharding} shards: {verdict}"
    table = Table(title=title)
    for column in ("replica", "rank", "node", "ring", "layers", "memory"):
        table.add_column(column, justify="right" if column in ("replica", "rank", "memory") else "left")
    for index, group in enumerate(plan.ranks):
        for r in group:
            layers = f"{r.layers[0]}-{r.layers[1] - 1}" if len(r.layers) == 2 else "-"
            table.add_row(str(index), str(r.rank), r.node_id, r.address, layers, _gib(r.need_bytes))
    why = [Text(f"why not: {p}", style="red") for p in plan.problems]
    why += [Text(f"{node}: {reason}", style="dim") for node, reason in plan.reasons.items()]
    return Group(table, *why)


def progress_line(row: PlacementRow) -> str:
    parts = [
        f"{r.node_id} {r.state}" + (f" {r.progress:.0%}" if r.state == "loading" else "")
        for r in row.instances
        if r.state != "failed" or r.reason
    ]
    return f"{row.id}: {row.status} {row.ready}/{row.replicas} ready | " + ", ".join(parts)


@app.command()
def place(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="The model, as the workers name it (e.g. smollm2).")],
    replicas: Replicas = 1,
    node: Nodes = None,
    exclude: Exclude = None,
    max_concurrency: Annotated[int, typer.Option("--max-concurrency", min=1, help="Slots per replica.")] = 4,
    shards: Shards = 1,
    sharding: ShardingKind = Sharding.TENSOR,
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the load until every replica is ready.")
    ] = False,
    wait_timeout: Annotated[float, typer.Option("--wait-timeout", min=1, help="Seconds --wait waits.")] = 600,
    api: ApiUrl = None,
    as_json: AsJson = False,
    timeout: Timeout = 10.0,
    api_key: ApiKey = None,
) -> None:
    """Place MODEL's replicas on the nodes with room (POST /v1/instances)."""
    body = {
        "model": model,
        "replicas": replicas,
        "nodes": node or [],
        "exclude": exclude or [],
        "max_concurrency": max_concurrency,
        "shards": shards,
        "sharding": sharding.value,
    }
    with _client(ctx, api, timeout, api_key) as client:
        row = _row(client.request_json("POST", "/v1/instances", json=body))
        if wait:
            row = _follow(client, row, wait_timeout, as_json)
        if as_json:
            print_json(msgspec.to_builtins(row))
        else:
            console().print(replicas_table(row))


def _follow(client: MasterClient, row: PlacementRow, limit: float, quiet: bool) -> PlacementRow:
    deadline = time.monotonic() + limit
    last = ""
    while True:
        line = progress_line(row)
        if line != last and not quiet:
            typer.echo(line)
            last = line
        if row.status == "ready":
            return row
        if row.status in ("failed", "draining"):
            raise ApiFailure(
                f"{row.id} is {row.status}: {row.reason or 'see exoctl instances show ' + row.id}"
            )
        if time.monotonic() > deadline:
            raise ApiFailure(
                f"{row.id} not ready after {limit:g} s ({row.status}, {row.ready}/{row.replicas})"
            )
        time.sleep(0.5)  # wait-ok: the refresh period of the progress display
        row = _row(client.request_json("GET", f"/v1/instances/{quote(row.id)}"))


@app.command("list")
def list_command(
    ctx: typer.Context,
    api: ApiUrl = None,
    as_json: AsJson = False,
    wide: Wide = False,
    timeout: Timeout = 5.0,
    api_key: ApiKey = None,
) -> None:
    """Placements (and instances workers declared themselves): status, ready replicas, nodes."""
    with _client(ctx, api, timeout, api_key) as client:
        document = client.request_json("GET", "/v1/instances")
        if as_json:
            print_json(document)
            return
        rows = [_row(d) for d in document["data"]]
        out = console(wide)
        table = placements_table(rows)
        narrow = not wide and sized_by_terminal() and not compact.fits(table, out.width)
        out.print(placements_compact(rows) if narrow else table)


@app.command()
def show(
    ctx: typer.Context,
    instance_id: Annotated[str, typer.Argument(help="The placement id (exoctl instances list).")],
    api: ApiUrl = None,
    as_json: AsJson = False,
    timeout: Timeout = 5.0,
    api_key: ApiKey = None,
) -> None:
    """One placement: its replicas (state, progress, memory) and its recent steps."""
    with _client(ctx, api, timeout, api_key) as client:
        document = client.request_json("GET", f"/v1/instances/{quote(instance_id)}")
        if as_json:
            print_json(document)
            return
        row = _row(document)
        console().print(replicas_table(row))
        console().print(events_table(row))


@app.command()
def delete(
    ctx: typer.Context,
    instance_id: Annotated[str, typer.Argument(help="The placement id (exoctl instances list).")],
    api: ApiUrl = None,
    as_json: AsJson = False,
    timeout: Timeout = 5.0,
    api_key: ApiKey = None,
) -> None:
    """Drain the placement (no new requests; those in flight finish), then unload it."""
    with _client(ctx, api, timeout, api_key) as client:
        document = client.request_json("DELETE", f"/v1/instances/{quote(instance_id)}")
        if as_json:
            print_json(document)
        else:
            typer.echo(f"{instance_id}: {document['status']} (unloads once its requests in flight finish)")


@app.command()
def preview(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="The model, as the workers name it.")],
    replicas: Replicas = 1,
    node: Nodes = None,
    exclude: Exclude = None,
    shards: Shards = 1,
    sharding: ShardingKind = Sharding.TENSOR,
    api: ApiUrl = None,
    as_json: AsJson = False,
    timeout: Timeout = 5.0,
    api_key: ApiKey = None,
) -> None:
    """Where MODEL's replicas would go, and why not on the other nodes, without placing anything."""
    params: dict[str, Any] = {
        "model": model,
        "replicas": replicas,
        "node": node or [],
        "exclude": exclude or [],
        "shards": shards,
        "sharding": sharding.value,
    }
    with _client(ctx, api, timeout, api_key) as client:
        document = client.request_json("GET", "/v1/instances/preview", params=params)
        if as_json:
            print_json(document)
            return
        console().print(plan_table(msgspec.convert(document, PlanView)))
