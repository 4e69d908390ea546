"""`exoctl`: inspect and steer a running exo master through its HTTP API.

`--api URL` chooses the master (default http://127.0.0.1:52415, or $EXO_API). It may come before
the command (`exoctl --api URL load`) or after it (`exoctl load --api URL`); after wins. Every
command takes `--json`. `exoctl --version` prints the version; `--install-completion` installs
shell completion.

    exoctl load  [--watch [--interval S] [--count N]]   per-instance load and a totals row
    exoctl nodes [--watch [--interval S] [--count N]]   worker nodes, liveness, sequence gaps
    exoctl tasks [--status S] [--limit N]               live tasks first, then recently ended ones
    exoctl cancel TASK_ID                               cancel a live task
    exoctl keys generate NAME [--dir DIR]               a CURVE keypair for the bus
    exoctl discover [--timeout S]                       the masters announcing themselves on the LAN
    exoctl service install|uninstall|status master|worker [--print] [DAEMON OPTIONS...]
                                                        run a daemon in the background (launchd,
                                                        systemd --user)
    exoctl instances place|list|show|delete|preview     where models live (see exoctl.instances)

With API keys on the master, pass `--api-key KEY` or set $EXO_API_KEY (sent as a bearer token).

Exit codes: 0 ok; 1 the API answered with an error (its message is printed on stderr); 2 the
master is down, unreachable or does not answer in time (one line on stderr, never a traceback).
`--watch` refreshes in place until Ctrl-C (exit 0) on a terminal. With `--json` it prints one JSON
document per line per refresh, and into a pipe or file one summary line per refresh.

JSON output (`--json`). Field names are those of the ClusterView served on GET /v1/cluster/state
(`protocol.cluster_view`) and are a stable contract:

    load    {"policy", "session", "instances": [InstanceRow], "models": [ModelRow], "totals",
             "affinity"}
            InstanceRow: instance_id, node_id, model, kinds, status (loading|ready|failed|dead),
                         in_flight (confirmed by the worker), pending (assigned, awaiting the
                         worker's confirmation: the ledger), queued (requests waiting at the master
                         for this instance's model, so shared by the model's instances), capacity,
                         max_concurrency, completed, failed, error, and the worker's prompt
                         cache: prompt_cache_hits, prompt_cache_misses, prompt_cache_bytes,
                         prompt_cache_reused_tokens, prompt_tokens; the engine's work:
                         prefill_tokens, decoding, engine_waiting, unowned (tasks it still runs
                         that no live task owns), prefill_rate, decode_rate, chars_per_token,
                         context_length, first_token_wait (the master's estimate, seconds)
            ModelRow:    model, instances, ready, queued
            totals:      instances, in_flight, pending, queued (summed per model, not per
                         instance), capacity, max_concurrency, completed, failed
            affinity:    enabled, lookups, hits (prefix-aware placement: chats with a known
                         prefix, and how many went to the instance holding it)
    nodes   {"nodes": [NodeRow]}
            NodeRow:     node_id, address, alive, subscribed, last_heartbeat_age (seconds),
                         instances (instance ids), sequence_gaps (bus messages missed from it)
    tasks   {"tasks": [TaskRow]}
            TaskRow:     task_id, kind, model, status (queued|pending|running|finished|failed|
                         cancelled), instance_id, node_id, age (seconds since submission, for
                         ended tasks too), attempts, error
    cancel  {"task_id", "cancelled": true}

The commands are here; the HTTP client and its exit codes are in `exoctl.client`, printing and
`--watch` in `exoctl.watch`, the tables and JSON documents in `exoctl.render`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.console import RenderableType

from exo_master.exoctl import compact, discover, instances, keys, render, service
from exo_master.exoctl.client import connected
from exo_master.exoctl.watch import console, print_json, show, sized_by_terminal
from protocol.cluster_view import ClusterView, TaskStatus
from protocol.version import version_line

DEFAULT_API = "http://127.0.0.1:52415"


app = typer.Typer(
    add_completion=True,
    no_args_is_help=True,
    # click's plain help: option names are never cut and flags show no "<bool>" (rich's panel did both).
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    help="Inspect and steer an exo master: load, nodes, tasks, cancel, discover, service.",
)


app.add_typer(keys.app, name="keys")
app.add_typer(service.app, name="service")
app.command("discover")(discover.discover)
app.add_typer(instances.app, name="instances")


# ---- options ------------------------------------------------------------------------------------

GlobalApiUrl = Annotated[
    str, typer.Option("--api", envvar="EXO_API", help="Base URL of the master's HTTP API, for every command.")
]
# No envvar here: $EXO_API is read once, by the global option, so that `exoctl --api URL load`
# is not overridden by the environment.
ApiUrl = Annotated[
    str | None,
    typer.Option(
        "--api", show_default=False, help="Base URL of the master's HTTP API (overrides the global --api)."
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON (ClusterView field names).")]
Timeout = Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds to wait for the master.")]
ApiKey = Annotated[
    str | None,
    typer.Option("--api-key", envvar="EXO_API_KEY", show_default=False, help="Bearer key for the API."),
]
Watch = Annotated[
    bool,
    typer.Option(
        "--watch", "-w", help="Refresh until Ctrl-C: in place on a terminal, else a line per refresh."
    ),
]
Interval = Annotated[float, typer.Option("--interval", "-n", min=0.05, help="Seconds between refreshes.")]
Wide = Annotated[
    bool, typer.Option("--wide", help="Every column, however wide (default: a compact layout when narrow).")
]
Count = Annotated[
    int, typer.Option("--count", min=0, help="With --watch: stop after N refreshes (0: until Ctrl-C).")
]


# ---- global options -----------------------------------------------------------------------------


def _print_version(value: bool) -> None:
    if value:
        typer.echo(version_line("exoctl"))
        raise typer.Exit()


@app.callback()
def global_options(
    ctx: typer.Context,
    api: GlobalApiUrl = DEFAULT_API,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Inspect and steer an exo master: load, nodes, tasks, cancel."""
    ctx.obj = api


def _api(ctx: typer.Context, api: str | None) -> str:
    """The command's own --api, else the global one (itself --api, $EXO_API or the default)."""
    if api is not None:
        return api
    return ctx.obj if isinstance(ctx.obj, str) else DEFAULT_API


def _layout(
    full: Callable[[ClusterView], RenderableType], narrow: Callable[[ClusterView], RenderableType], wide: bool
) -> Callable[[ClusterView], RenderableType]:
    if wide or not sized_by_terminal():
        return full
    return compact.fitted(full, narrow, console().width)


# ---- commands -----------------------------------------------------------------------------------


def _view_command(
    name: str,
    doc: str,
    table: Callable[[ClusterView], RenderableType],
    compact_table: Callable[[ClusterView], RenderableType],
    as_document: Callable[[ClusterView], dict[str, Any]],
    line: Callable[[ClusterView, str], str],
) -> None:
    """`exoctl NAME`: one view of /v1/cluster/state, as a table, --json or --watch."""

    def command(
        ctx: typer.Context,
        api: ApiUrl = None,
        as_json: AsJson = False,
        watch: Watch = False,
        interval: Interval = 1.0,
        count: Count = 0,
        timeout: Timeout = 5.0,
        api_key: ApiKey = None,
        wide: Wide = False,
    ) -> None:
        with connected(_api(ctx, api), timeout, api_key) as client:
            layout = _layout(table, compact_table, wide)
            show(client.state, layout, as_document, line, as_json, watch, interval, count, wide)

    command.__doc__ = doc
    app.command(name)(command)


_view_command(
    "load",
    "Per instance: in-flight (confirmed), pending (ledger), queued, capacity and totals.",
    render.load_table,
    compact.load_compact,
    render.load_json,
    render.load_line,
)
_view_command(
    "nodes",
    "Worker nodes: address, last heartbeat, alive/dead, subscription, instances, sequence gaps.",
    render.nodes_table,
    compact.nodes_compact,
    render.nodes_json,
    render.nodes_line,
)


@app.command()
def tasks(
    ctx: typer.Context,
    status: Annotated[
        TaskStatus | None, typer.Option("--status", "-s", help="Only tasks in this status.")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", "-l", min=0, help="At most this many tasks.")] = 50,
    api: ApiUrl = None,
    as_json: AsJson = False,
    timeout: Timeout = 5.0,
    api_key: ApiKey = None,
    wide: Wide = False,
) -> None:
    """Tasks (live ones first, then recently ended, newest first): id, kind, model, instance, status, age."""
    wanted = str(status) if status is not None else None
    with connected(_api(ctx, api), timeout, api_key) as client:
        view = client.state(tasks=limit, status=wanted)
        rows = render.filter_tasks(view.tasks, wanted, limit)
        if as_json:
            print_json(render.tasks_json(rows))
        else:
            out = console(wide)
            full = render.tasks_table(rows, wanted)
            fit = wide or not sized_by_terminal() or compact.fits(full, out.width)
            out.print(full if fit else compact.tasks_compact(rows, wanted))


@app.command()
def cancel(
    ctx: typer.Context,
    task_id: Annotated[str, typer.Argument(help="The task id (x-exo-task header, or `exoctl tasks`).")],
    api: ApiUrl = None,
    as_json: AsJson = False,
    timeout: Timeout = 5.0,
    api_key: ApiKey = None,
) -> None:
    """Cancel a live task wherever it is (queued, pending or running); its slot is freed."""
    with connected(_api(ctx, api), timeout, api_key) as client:
        result = client.cancel(task_id)
        if as_json:
            print_json(result)
        else:
            typer.echo(f"cancelled {result.get('task_id', task_id)}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
