"""exo-worker: the worker daemon (one per machine, or several for tests) and its command line.

    exo-worker --master 127.0.0.1:52416 --engine sim --instances 2

It connects to the master (binding nothing), loads its instances while heartbeating their status,
logs "worker.ready" once every instance is ready, and serves assignments until SIGINT/SIGTERM.

This module is the process: flags and their checks, logging, keys, the engine, signals. The worker
it runs (`WorkerConfig`, `WorkerDaemon`, the exit codes) is in `exo_worker.worker`.
"""

from __future__ import annotations

import asyncio
import math
import re
import secrets
import signal
import socket
from pathlib import Path
from typing import Annotated

import structlog
import typer

from exo_worker.bus import parse_master_address
from exo_worker.bus_auth import load_client_curve
from exo_worker.engine import ModelLoadError
from exo_worker.engine_choice import (
    DEFAULT_MODEL,
    EngineName,
    build_engine_factory,
    served_model_id,
)
from exo_worker.worker import EXIT_BAD_KEYS, EXIT_MODEL_LOAD, WorkerConfig, WorkerDaemon
from protocol.ids import NodeId
from protocol.keys import KeyFileError
from protocol.logs import LogFormat, configure_logging
from protocol.version import version_line

log = structlog.get_logger("exo_worker.daemon")


def default_node_id() -> str:
    """Hostname-derived, plus a short random suffix so several workers on one host never collide."""
    host = re.sub(r"[^a-z0-9-]+", "-", socket.gethostname().split(".")[0].lower()).strip("-") or "worker"
    return f"{host}-{secrets.token_hex(2)}"


def _check_node_id(node_id: str) -> str:
    # "/" separates node from instance index in instance ids; NUL terminates bus topics.
    if not node_id or "/" in node_id or "\x00" in node_id:
        raise typer.BadParameter(f"node id must be non-empty without '/' or NUL, got {node_id!r}")
    return node_id


def _positive(value: float) -> float:
    if not value > 0:
        raise typer.BadParameter(f"must be > 0, got {value}")
    return value


async def _serve(daemon: WorkerDaemon) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        return await daemon.run(stop)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


app = typer.Typer(
    add_completion=True, help="exo-worker: serve model instances to an exo-master over the bus."
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(version_line("exo-worker"))
        raise typer.Exit()


@app.command()
def serve(
    master: Annotated[
        str, typer.Option("--master", envvar="EXO_MASTER", help="Master bus address HOST:BUS_PORT.")
    ],
    node_id: Annotated[
        str | None,
        typer.Option("--node-id", envvar="EXO_NODE_ID", help="Default: hostname plus a short random suffix."),
    ] = None,
    engine: Annotated[EngineName, typer.Option("--engine", envvar="EXO_ENGINE")] = EngineName.SIM,
    model: Annotated[
        str | None,
        typer.Option("--model", envvar="EXO_MODEL", help='Default: "sim-model" (sim) or "smollm2" (mlx).'),
    ] = None,
    instances: Annotated[int, typer.Option("--instances", envvar="EXO_INSTANCES", min=1)] = 1,
    max_concurrency: Annotated[
        int, typer.Option("--max-concurrency", envvar="EXO_MAX_CONCURRENCY", min=1)
    ] = 4,
    capacity: Annotated[
        float,
        typer.Option(
            "--capacity",
            envvar="EXO_CAPACITY",
            min=0.01,
            help="Relative speed of each instance; a capacity-2 instance takes twice the load.",
        ),
    ] = 1.0,
    sim_tokens_per_s: Annotated[
        float, typer.Option("--sim-tokens-per-s", envvar="EXO_SIM_TOKENS_PER_S", callback=_positive)
    ] = 50.0,
    prefill_chunk: Annotated[
        int,
        typer.Option(
            "--prefill-chunk",
            envvar="EXO_PREFILL_CHUNK",
            min=0,
            help="Prompt tokens processed per batch step, between decode steps; a cancel waits at most "
            "one chunk. 0 (default): sized from the measured prefill rate to about 0.5 s per step "
            "(4 tokens on a 2-core CPU, up to 2048 on a fast GPU). Sim engine: 0 means 256.",
        ),
    ] = 0,
    sim_prefill_tokens_per_s: Annotated[
        float,
        typer.Option(
            "--sim-prefill-tokens-per-s",
            envvar="EXO_SIM_PREFILL_TOKENS_PER_S",
            callback=_positive,
            help="Sim engine: prompt tokens (words) processed per second; inf: prompts cost nothing.",
        ),
    ] = math.inf,
    sim_context_length: Annotated[
        int,
        typer.Option(
            "--sim-context-length",
            envvar="EXO_SIM_CONTEXT_LENGTH",
            min=0,
            help="Sim engine: the context length in tokens (words) it enforces; 0: unlimited.",
        ),
    ] = 0,
    heartbeat_interval: Annotated[
        float, typer.Option("--heartbeat-interval", envvar="EXO_HEARTBEAT_INTERVAL", callback=_positive)
    ] = 1.0,
    sim_accept_delay: Annotated[
        float,
        typer.Option(
            "--sim-accept-delay",
            envvar="EXO_SIM_ACCEPT_DELAY",
            min=0.0,
            help="Seconds to hold each assignment/cancel before handling it (simulates slow confirmation).",
        ),
    ] = 0.0,
    heartbeat_liveness: Annotated[
        int, typer.Option("--heartbeat-liveness", envvar="EXO_HEARTBEAT_LIVENESS", min=1)
    ] = 3,
    prompt_cache_bytes: Annotated[
        int | None,
        typer.Option(
            "--prompt-cache-bytes",
            envvar="EXO_PROMPT_CACHE_BYTES",
            min=0,
            help="Byte budget of each MLX instance's prompt (KV) cache; 0 turns it off. "
            "Default: an eighth of the memory available at start, shared by the instances.",
        ),
    ] = None,
    log_format: Annotated[LogFormat, typer.Option("--log-format", envvar="EXO_LOG_FORMAT")] = LogFormat.AUTO,
    log_level: Annotated[str, typer.Option("--log-level", envvar="EXO_LOG_LEVEL")] = "info",
    secret_key: Annotated[
        Path | None,
        typer.Option(
            "--secret-key", envvar="EXO_SECRET_KEY", help="This worker's CURVE key file (NAME.key_secret)."
        ),
    ] = None,
    master_key: Annotated[
        Path | None,
        typer.Option("--master-key", envvar="EXO_MASTER_KEY", help="The master's public key (NAME.key)."),
    ] = None,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Connect to the master, load the instances, and serve assignments until SIGINT/SIGTERM."""
    # Usage errors first: they are typer's to report, before logging is set up.
    try:
        address = parse_master_address(master)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--master") from exc
    node = NodeId(_check_node_id(node_id if node_id is not None else default_node_id()))
    configure_logging(log_format, log_level)
    model_name = model or DEFAULT_MODEL[engine]
    structlog.contextvars.bind_contextvars(node_id=node)
    try:
        curve = load_client_curve(secret_key, master_key)
    except KeyFileError as exc:
        log.error("worker.bad_keys", error=str(exc))
        raise typer.Exit(EXIT_BAD_KEYS) from None
    try:
        if prompt_cache_bytes is None and engine is EngineName.MLX:
            from exo_worker.prompt_cache import default_budget_bytes

            prompt_cache_bytes = default_budget_bytes(instances)
        factory = build_engine_factory(
            engine,
            model_name,
            sim_tokens_per_s,
            max_concurrency=max_concurrency,
            prompt_cache_bytes=prompt_cache_bytes,
            prefill_chunk=prefill_chunk,
            sim_prefill_tokens_per_s=sim_prefill_tokens_per_s,
            sim_context_length=sim_context_length,
        )
    except ModelLoadError as exc:
        log.error("worker.model_load_failed", model=model_name, engine=engine.value, error=str(exc))
        raise typer.Exit(EXIT_MODEL_LOAD) from None
    config = WorkerConfig(
        node_id=node,
        master=address,
        model=served_model_id(model_name),
        instances=instances,
        max_concurrency=max_concurrency,
        capacity=capacity,
        heartbeat_interval=heartbeat_interval,
        heartbeat_liveness=heartbeat_liveness,
        accept_delay=sim_accept_delay,
        curve=curve,
    )
    log.info(
        "worker.starting",
        engine=engine.value,
        model=model_name,
        instances=instances,
        master=str(address),
        max_concurrency=max_concurrency,
        prompt_cache_bytes=prompt_cache_bytes,
        curve=curve is not None,
        key=curve.keypair.fingerprint if curve is not None else None,
    )
    try:
        daemon = WorkerDaemon(config, factory)
    except ModelLoadError as exc:  # an engine constructor may check its model path eagerly
        log.error("worker.model_load_failed", model=model_name, engine=engine.value, error=str(exc))
        raise typer.Exit(EXIT_MODEL_LOAD) from None
    raise typer.Exit(asyncio.run(_serve(daemon)))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
