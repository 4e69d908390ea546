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

With API keys on the master, pass `--api-key KEY` or set $EXO_API_KEY (sent as a bearer token).

Exit codes: 0 ok; 1 the API answered with an error (its message is printed on stderr); 2 the
master is down, unreachable or does not answer in time (one line on stderr, never a traceback).
`--watch` refreshes in place until Ctrl-C (exit 0) on a terminal. With `--json` it prints one JSON
document per line per refresh, and into a pipe or file one summary line per refresh.

JSON output (`--json`). Field names are those of the ClusterView served on GET /v1/cluster/state
(`exo_master.core.view_rows`) and are a stable contract:

    load    {"policy", "session", "instances": [InstanceRow], "models": [ModelRow], "totals"}
            InstanceRow: instance_id, node_id, model, kinds, status (loading|ready|failed|dead),
                         in_flight (confirmed by the worker), pending (assigned, awaiting the
                         worker's confirmation: the ledger), queued (requests waiting at the master
                         for this instance's model, so shared by the model's instances), capacity,
                         max_concurrency, completed, failed, error
            ModelRow:    model, instances, ready, queued
            totals:      instances, in_flight, pending, queued (summed per model, not per
                         instance), capacity, max_concurrency, completed, failed
    nodes   {"nodes": [NodeRow]}
            NodeRow:     node_id, address, alive, subscribed, last_heartbeat_age (seconds),
                         instances (instance ids), sequence_gaps (bus messages missed from it)
    tasks   {"tasks": [TaskRow]}
            TaskRow:     task_id, kind, model, status (queued|pending|running|finished|failed|
                         cancelled), instance_id, node_id, age (seconds since submission, for
                         ended tasks too), attempts, error
    cancel  {"task_id", "cancelled": true}
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any
from urllib.parse import quote

import httpx
import msgspec
import typer
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.text import Text

from exo_master.core.lifecycle import TaskStatus
from exo_master.core.view_rows import ClusterView
from exo_master.exoctl import keys, render
from protocol.version import version_line

DEFAULT_API = "http://127.0.0.1:52415"


def _console() -> Console:
    # Piped output (scripts, logs, CI) gets room for every column instead of rich's 80.
    return Console() if sys.stdout.isatty() else Console(width=200)


app = typer.Typer(
    add_completion=True,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Inspect and steer an exo master: load, nodes, tasks, cancel.",
)


app.add_typer(keys.app, name="keys")


class Unreachable(Exception):
    """The master did not answer (down, wrong address, timeout): exit code 2."""


class ApiFailure(Exception):
    """The master answered with an error, or with something that is not its API: exit code 1."""


class MasterClient:
    def __init__(self, api: str, timeout: float, api_key: str | None = None) -> None:
        self.base_url = (api if "://" in api else f"http://{api}").rstrip("/")
        self.timeout = timeout
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        try:
            self._http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers)
        except httpx.InvalidURL as exc:
            raise Unreachable(f"invalid --api URL {api!r}: {exc}") from None

    def close(self) -> None:
        self._http.close()

    def state(self, tasks: int = 0, status: str | None = None) -> ClusterView:
        params: dict[str, str | int] = {"tasks": tasks}
        if status is not None:
            params["status"] = status
        response = self._request("GET", "/v1/cluster/state", params=params)
        try:
            return msgspec.json.decode(response.content, type=ClusterView)
        except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
            raise ApiFailure(f"{self.base_url} did not answer with a cluster state: {exc}") from None

    def cancel(self, task_id: str) -> dict[str, Any]:
        response = self._request("POST", f"/v1/tasks/{quote(task_id, safe='')}/cancel")
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise ApiFailure(f"{self.base_url} answered the cancel with something that is not JSON")
        return body

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise Unreachable(
                f"the master at {self.base_url} did not answer within {self.timeout:g} s"
            ) from None
        except (httpx.TransportError, httpx.InvalidURL) as exc:
            reason = str(exc) or type(exc).__name__
            raise Unreachable(f"cannot reach the master at {self.base_url}: {reason}") from None
        except httpx.HTTPError as exc:  # an answer came, but not a usable one (decoding, redirects)
            raise ApiFailure(f"bad answer from {self.base_url}: {exc or type(exc).__name__}") from None
        if response.is_success:
            return response
        raise ApiFailure(error_message(response))


def error_message(response: httpx.Response) -> str:
    """The API's OpenAI-style error message, or a short description of what came back."""
    message = None
    try:
        error = response.json().get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            message = error["message"]
    except (ValueError, AttributeError):
        pass
    if message:
        return f"{message} (HTTP {response.status_code})"
    text = " ".join(response.text.split())[:200] or response.reason_phrase
    return f"HTTP {response.status_code} from the master: {text}"


@contextmanager
def _client(api: str, timeout: float, api_key: str | None = None) -> Iterator[MasterClient]:
    """A client whose failures become one stderr line and exit code 2 (unreachable) or 1 (error)."""
    client: MasterClient | None = None
    try:
        client = MasterClient(api, timeout, api_key)
        yield client
    except Unreachable as exc:
        typer.echo(f"exoctl: {exc}", err=True)
        raise typer.Exit(2) from None
    except ApiFailure as exc:
        typer.echo(f"exoctl: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        if client is not None:
            client.close()


def _print_json(document: Any) -> None:
    typer.echo(json.dumps(document, indent=2))


def _show(
    fetch: Callable[[], ClusterView],
    table: Callable[[ClusterView], RenderableType],
    document: Callable[[ClusterView], dict[str, Any]],
    line: Callable[[ClusterView, str], str],
    as_json: bool,
    watch: bool,
    interval: float,
    count: int,
) -> None:
    """Fetch once and print; with `watch`, keep refreshing until Ctrl-C or `count` refreshes.

    The first fetch's failure ends the command (exit 1 or 2); later ones are reported and retried,
    so a watch survives a master restart. A live screen needs a terminal: into a pipe or a file,
    a watch prints one line per refresh, each flushed at once.
    """
    view = fetch()
    if not watch:
        if as_json:
            _print_json(document(view))
        else:
            _console().print(table(view))
        return
    try:
        if as_json:
            _watch_lines(
                view, fetch, lambda v: json.dumps(document(v), separators=(",", ":")), interval, count
            )
        elif sys.stdout.isatty():
            _watch_live(view, fetch, table, interval, count)
        else:
            _watch_lines(view, fetch, lambda v: line(v, time.strftime("%H:%M:%S")), interval, count)
    except KeyboardInterrupt:
        return


def _refreshes(
    first: ClusterView, fetch: Callable[[], ClusterView], interval: float, count: int
) -> Iterator[ClusterView | Exception]:
    """The first view, then a view (or the failure to get one) every `interval` seconds."""
    yield first
    shown = 1
    while not count or shown < count:
        time.sleep(interval)
        try:
            yield fetch()
        except (Unreachable, ApiFailure) as exc:
            yield exc
        shown += 1


def _watch_lines(
    first: ClusterView,
    fetch: Callable[[], ClusterView],
    line: Callable[[ClusterView], str],
    interval: float,
    count: int,
) -> None:
    try:
        for item in _refreshes(first, fetch, interval, count):
            if isinstance(item, Exception):
                typer.echo(f"exoctl: {item} (retrying)", err=True)
            else:
                typer.echo(line(item))  # click's echo flushes: a reader of the pipe sees it now
    except BrokenPipeError:
        # The reader has had enough (`| head -n 3`): a normal end. Point stdout at /dev/null so
        # that the interpreter's final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _watch_live(
    first: ClusterView,
    fetch: Callable[[], ClusterView],
    table: Callable[[ClusterView], RenderableType],
    interval: float,
    count: int,
) -> None:
    last = first
    with Live(console=_console(), auto_refresh=False) as live:
        for item in _refreshes(first, fetch, interval, count):
            header = Text(f"every {interval:g}s · {time.strftime('%H:%M:%S')} · Ctrl-C to stop", style="dim")
            if isinstance(item, Exception):
                problem = Text(f"{item} (retrying)", style="bold red")
                live.update(Group(header, table(last), problem), refresh=True)
            else:
                last = item
                live.update(Group(header, table(item)), refresh=True)


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


# ---- commands -----------------------------------------------------------------------------------


@app.command()
def load(
    ctx: typer.Context,
    api: ApiUrl = None,
    as_json: AsJson = False,
    watch: Watch = False,
    interval: Interval = 1.0,
    count: Count = 0,
    timeout: Timeout = 5.0,
    api_key: ApiKey = None,
) -> None:
    """Per instance: in-flight (confirmed), pending (ledger), queued, capacity and totals."""
    with _client(_api(ctx, api), timeout, api_key) as client:
        _show(
            client.state,
            render.load_table,
            render.load_json,
            render.load_line,
            as_json,
            watch,
            interval,
            count,
        )


@app.command()
def nodes(
    ctx: typer.Context,
    api: ApiUrl = None,
    as_json: AsJson = False,
    watch: Watch = False,
    interval: Interval = 1.0,
    count: Count = 0,
    timeout: Timeout = 5.0,
    api_key: ApiKey = None,
) -> None:
    """Worker nodes: address, last heartbeat, alive/dead, subscription, instances, sequence gaps."""
    with _client(_api(ctx, api), timeout, api_key) as client:
        _show(
            client.state,
            render.nodes_table,
            render.nodes_json,
            render.nodes_line,
            as_json,
            watch,
            interval,
            count,
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
) -> None:
    """Tasks (live ones first, then recently ended, newest first): id, kind, model, instance, status, age."""
    wanted = str(status) if status is not None else None
    with _client(_api(ctx, api), timeout, api_key) as client:
        view = client.state(tasks=limit, status=wanted)
        rows = render.filter_tasks(view.tasks, wanted, limit)
        if as_json:
            _print_json(render.tasks_json(rows))
        else:
            _console().print(render.tasks_table(rows, wanted))


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
    with _client(_api(ctx, api), timeout, api_key) as client:
        result = client.cancel(task_id)
        if as_json:
            _print_json(result)
        else:
            typer.echo(f"cancelled {result.get('task_id', task_id)}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
