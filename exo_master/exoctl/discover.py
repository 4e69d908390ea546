"""`exoctl discover`: the exo masters that answer on the LAN (DNS-SD over mDNS)."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import typer
from rich.table import Table

from exo_master.exoctl.watch import console, print_json
from protocol.discovery import Advert
from protocol.mdns import browse

SETTLE = 1.5  # after the first master answers, the time the others get to answer too


def discover_table(adverts: list[Advert]) -> Table:
    table = Table(title=f"masters on the LAN · {len(adverts)} found")
    table.add_column("cluster", no_wrap=True)
    table.add_column("master", overflow="fold")
    table.add_column("bus (--master)", no_wrap=True)
    table.add_column("api", overflow="fold")
    table.add_column("master key", no_wrap=True)
    for advert in sorted(adverts, key=lambda a: (a.cluster, a.name)):
        table.add_row(advert.cluster, advert.name, advert.bus, advert.api, advert.key or "plaintext")
    return table


def discover(
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout", min=0.1, help="Seconds to wait for a first answer (then 1.5 s more for the others)."
        ),
    ] = 3.0,
    interface: Annotated[
        list[str],
        typer.Option("--interface", metavar="ADDRESS", help="Ask from this local address only (repeatable)."),
    ] = [],  # noqa: B006 (typer reads the default, never mutates it)
    as_json: Annotated[bool, typer.Option("--json", help='Print JSON: {"masters": [...]}.')] = False,
) -> None:
    """List the exo masters announcing themselves on the LAN (mDNS): cluster, address, key."""
    try:
        adverts = browse(timeout, interface or None, settle=SETTLE)
    except OSError as exc:
        typer.echo(f"exoctl: cannot listen for mDNS answers: {exc}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        print_json({"masters": [dataclasses.asdict(a) | {"bus": a.bus, "api": a.api} for a in adverts]})
        return
    if not adverts:
        typer.echo("no exo master answered (a master on loopback only needs --advertise)", err=True)
    console().print(discover_table(adverts))
