"""How exoctl prints a cluster view: once, or refreshed with `--watch` until Ctrl-C or `--count`.

A live screen needs a terminal: into a pipe or a file, a watch prints one line per refresh (a JSON
document with `--json`), each flushed at once. The first fetch's failure ends the command; later
ones are reported and retried, so a watch survives a master restart.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import typer
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.text import Text

from exo_master.exoctl.client import ApiFailure, Unreachable
from protocol.cluster_view import ClusterView

PIPED = 200  # columns of piped output
WIDE = 1000  # `--wide`: a table never needs more, and rich pads no line past the table's own width


def sized_by_terminal() -> bool:
    """A terminal (or $COLUMNS) sets the width; piped output keeps the full layout for scripts."""
    return sys.stdout.isatty() or bool(os.environ.get("COLUMNS"))


def console(wide: bool = False) -> Console:
    # Piped output (scripts, logs, CI) gets room for every column instead of rich's 80, unless
    # $COLUMNS says how wide to be (rich reads it). `--wide` never shrinks a column: the terminal
    # wraps the long lines instead.
    if wide:
        return Console(width=WIDE)
    return Console() if sized_by_terminal() else Console(width=PIPED)


def print_json(document: Any) -> None:
    typer.echo(json.dumps(document, indent=2))


def show(
    fetch: Callable[[], ClusterView],
    table: Callable[[ClusterView], RenderableType],
    document: Callable[[ClusterView], dict[str, Any]],
    line: Callable[[ClusterView, str], str],
    as_json: bool,
    watch: bool,
    interval: float,
    count: int,
    wide: bool = False,
) -> None:
    """Fetch once and print; with `watch`, keep refreshing until Ctrl-C or `count` refreshes.

    The first fetch's failure ends the command (exit 1 or 2); later ones are reported and retried,
    so a watch survives a master restart. A live screen needs a terminal: into a pipe or a file,
    a watch prints one line per refresh, each flushed at once.
    """
    view = fetch()
    if not watch:
        if as_json:
            print_json(document(view))
        else:
            console(wide).print(table(view))
        return
    try:
        if as_json:
            _watch_lines(
                view, fetch, lambda v: json.dumps(document(v), separators=(",", ":")), interval, count
            )
        elif sys.stdout.isatty():
            _watch_live(view, fetch, table, interval, count, wide)
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
    wide: bool,
) -> None:
    last = first
    with Live(console=console(wide), auto_refresh=False) as live:
        for item in _refreshes(first, fetch, interval, count):
            header = Text(f"every {interval:g}s · {time.strftime('%H:%M:%S')} · Ctrl-C to stop", style="dim")
            if isinstance(item, Exception):
                problem = Text(f"{item} (retrying)", style="bold red")
                live.update(Group(header, table(last), problem), refresh=True)
            else:
                last = item
                live.update(Group(header, table(item)), refresh=True)
