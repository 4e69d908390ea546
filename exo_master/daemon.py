"""`exo-master`: binds the bus, serves the HTTP API, and drives the core from one asyncio loop.

This module is the command line; `exo_master.serve` runs the master it configures.
"""

from __future__ import annotations

import asyncio
import random
import re
import uuid
from collections.abc import Callable
from pathlib import Path

import structlog
import typer

from exo_master.bus.advertise import AdvertiseSettings
from exo_master.bus.curve import load_master_curve
from exo_master.core import CoreConfig
from exo_master.core.placement import POLICY_NAMES
from exo_master.http.auth import ApiKeyError, read_keys
from exo_master.http.bounds import ApiLimits
from exo_master.http.connection_cap import raise_nofile_limit
from exo_master.http.server import event_loop_factory
from exo_master.serve import serve
from protocol.discovery import DEFAULT_CLUSTER, check_cluster
from protocol.keys import KeyFileError
from protocol.logs import LogFormat, configure_logging
from protocol.version import version_line

log = structlog.get_logger("exo_master")
# click's plain help: option names are never cut and flags show no "<bool>" (rich's panel did both).
app = typer.Typer(add_completion=True, help=__doc__, rich_markup_mode=None)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(version_line("exo-master"))
        raise typer.Exit()


def _check_session(value: str | None) -> str | None:
    # The session names this master run in heartbeats, logs and /v1/cluster/state; a launcher
    # passes its own to recognise the master it started.
    if value is not None and not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", value):
        raise typer.BadParameter("1 to 64 characters among letters, digits, '.', '_' and '-'")
    return value


def _usage(check: Callable[[str], str], value: str) -> str:
    try:
        return check(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _check_policy(value: str) -> str:
    if value not in POLICY_NAMES:
        raise typer.BadParameter(f"choose one of {', '.join(POLICY_NAMES)}")
    return value


@app.command()
def run(
    host: str = typer.Option("127.0.0.1", envvar="EXO_HOST", help="Address to bind the API and the bus."),
    api_port: int = typer.Option(52415, envvar="EXO_API_PORT", help="HTTP API port."),
    bus_port: int = typer.Option(
        52416, envvar="EXO_BUS_PORT", help="Bus port (master to workers); workers publish to port + 1."
    ),
    policy: str = typer.Option(
        "least-work",
        envvar="EXO_POLICY",
        callback=_check_policy,
        help="Placement policy: least-work (estimated time to first token), least-loaded (task count), ...",
    ),
    heartbeat_interval: float = typer.Option(1.0, envvar="EXO_HEARTBEAT_INTERVAL", min=0.05),
    heartbeat_liveness: int = typer.Option(3, envvar="EXO_HEARTBEAT_LIVENESS", min=1),
    ledger_ttl: float = typer.Option(5.0, envvar="EXO_LEDGER_TTL", min=0.1),
    queue_limit: int = typer.Option(256, envvar="EXO_QUEUE_LIMIT", min=0),
    forget_dead_after: float = typer.Option(
        300.0, envvar="EXO_FORGET_DEAD_AFTER", min=0.0, help="Seconds a dead node stays listed."
    ),
    queue_timeout: float = typer.Option(
        300.0, envvar="EXO_QUEUE_TIMEOUT", min=0.1, help="Seconds a request may wait for a free slot."
    ),
    max_nodes: int = typer.Option(1024, envvar="EXO_MAX_NODES", min=1, help="Nodes the master tracks."),
    max_connections: int | None = typer.Option(
        None,
        "--max-connections",
        envvar="EXO_MAX_CONNECTIONS",
        min=1,
        help="Open API connections at most (default: from the open-files limit, keeping room for the "
        "bus and logs). Past it, a new connection replaces the one idle or reading the longest.",
    ),
    prefix_affinity: bool = typer.Option(
        True,
        "--prefix-affinity/--no-prefix-affinity",
        envvar="EXO_PREFIX_AFFINITY",
        help="Among equally loaded instances, prefer the one holding the chat's prefix in its cache.",
    ),
    affinity_slack: float = typer.Option(
        0.0,
        envvar="EXO_AFFINITY_SLACK",
        min=0.0,
        help="Let prefix affinity win while the holder's load score is within this of the best.",
    ),
    seed: int | None = typer.Option(
        None,
        envvar="EXO_SEED",
        min=0,
        help="Seed for the random policies (default: drawn from the OS at start, and logged).",
    ),
    max_body_bytes: int = typer.Option(
        ApiLimits.max_body_bytes, envvar="EXO_MAX_BODY_BYTES", min=1, help="Largest HTTP body (else 413)."
    ),
    body_timeout: float = typer.Option(
        ApiLimits.body_timeout_s,
        envvar="EXO_BODY_TIMEOUT",
        min=0.1,
        help="Seconds a request body may take to arrive (else 408).",
    ),
    keep_alive_timeout: float = typer.Option(
        ApiLimits.keep_alive_s,
        envvar="EXO_KEEP_ALIVE_TIMEOUT",
        min=1.0,
        help="Seconds an idle HTTP keep-alive connection stays open.",
    ),
    max_prompt_chars: int = typer.Option(
        ApiLimits.max_prompt_chars,
        envvar="EXO_MAX_PROMPT_CHARS",
        min=1,
        help="Longest prompt in characters (else 413), checked before it goes to a worker.",
    ),
    log_format: LogFormat = typer.Option(LogFormat.AUTO, envvar="EXO_LOG_FORMAT"),
    log_level: str = typer.Option("info", envvar="EXO_LOG_LEVEL"),
    bus_host: str | None = typer.Option(
        None, envvar="EXO_BUS_HOST", help="Address to bind the bus (default: --host)."
    ),
    secret_key: Path | None = typer.Option(
        None, envvar="EXO_SECRET_KEY", help="The master's CURVE key file (NAME.key_secret)."
    ),
    authorized_keys: Path | None = typer.Option(
        None,
        envvar="EXO_AUTHORIZED_KEYS",
        help="Directory of the workers' public key files (NAME.key); re-read on change and on SIGHUP.",
    ),
    insecure: bool = typer.Option(
        False, "--insecure", envvar="EXO_INSECURE", help="Allow a plaintext bus on a non-loopback address."
    ),
    api_key: list[str] = typer.Option(
        [],
        "--api-key",
        envvar="EXO_API_KEY",
        metavar="KEY",
        help="Bearer key the HTTP API requires (repeatable).",
    ),
    api_keys_file: Path | None = typer.Option(
        None, envvar="EXO_API_KEYS_FILE", help="File of API keys, one per line."
    ),
    cors_origin: list[str] = typer.Option(
        [],
        "--cors-origin",
        envvar="EXO_CORS_ORIGIN",
        metavar="ORIGIN",
        help="Browser origin allowed by CORS (repeatable).",
    ),
    state_dir: Path | None = typer.Option(
        None,
        "--state-dir",
        envvar="EXO_STATE_DIR",
        help="Keep the instance placements here (instances.json) and restore them on restart.",
    ),
    drain_grace: float = typer.Option(
        60.0,
        "--drain-grace",
        envvar="EXO_DRAIN_GRACE",
        min=0.0,
        help="Seconds a deleted or surplus instance's requests in flight get to finish before it unloads.",
    ),
    session: str | None = typer.Option(
        None,
        envvar="EXO_SESSION",
        callback=_check_session,
        help="Session id of this run (default: random). Shown in /v1/cluster/state.",
    ),
    advertise: bool | None = typer.Option(
        None,
        "--advertise/--no-advertise",
        envvar="EXO_ADVERTISE",
        show_default=False,
        help="Announce the master on the LAN (mDNS) so workers find it without --master. "
        "Default: on unless the bus listens on loopback only.",
    ),
    cluster: str = typer.Option(
        DEFAULT_CLUSTER,
        envvar="EXO_CLUSTER",
        callback=lambda v: _usage(check_cluster, v),
        help="Cluster name in the announcement; workers pick a master with --cluster NAME.",
    ),
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Run the exo master."""
    configure_logging(log_format, log_level)
    raise_nofile_limit()  # where allowed: the default --max-connections follows the limit
    try:
        curve = load_master_curve(secret_key, authorized_keys)
        api_keys = read_keys(api_key, api_keys_file)
    except (KeyFileError, ApiKeyError) as exc:
        log.error("master.bad_security_config", error=str(exc))
        raise typer.Exit(2) from None
    if seed is None:
        seed = random.SystemRandom().randrange(2**63)  # logged in master.started
    limits = ApiLimits(
        max_body_bytes=max_body_bytes,
        body_timeout_s=body_timeout,
        keep_alive_s=keep_alive_timeout,
        max_prompt_chars=max_prompt_chars,
    )
    config = CoreConfig(
        policy=policy,
        seed=seed,
        session=session or uuid.uuid4().hex[:12],
        heartbeat_interval=heartbeat_interval,
        heartbeat_liveness=heartbeat_liveness,
        ledger_ttl=max(ledger_ttl, heartbeat_interval * heartbeat_liveness + heartbeat_interval),
        queue_limit=queue_limit,
        forget_dead_after=forget_dead_after,
        queue_timeout=queue_timeout,
        max_nodes=max_nodes,
        prefix_affinity=prefix_affinity,
        affinity_slack=affinity_slack,
    )
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        code = runner.run(
            serve(
                config,
                host,
                api_port,
                bus_port,
                limits,
                bus_host=bus_host,
                curve=curve,
                insecure=insecure,
                api_keys=api_keys,
                cors_origins=cors_origin,
                max_connections=max_connections,
                advertise=AdvertiseSettings(wanted=advertise, cluster=cluster),
                state_dir=state_dir,
                drain_grace=drain_grace,
            )
        )
    raise typer.Exit(code)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
