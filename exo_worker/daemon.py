"""exo-worker: the worker daemon (one per machine, or several for tests) and its command line.

    exo-worker --master 127.0.0.1:52416 --engine sim                       # serves what is placed
    exo-worker --master 127.0.0.1:52416 --engine sim --model sim-model --instances 2
    exo-worker --cluster home --secret-key w.key_secret --master-key master.key   (found by mDNS)

Without `--master` it looks for the master on the LAN (`exo_worker.discover`). It connects to the
master (binding nothing) and heartbeats what it is (memory, backend, the models it holds). Without
--model it loads only what the master places (LoadInstance); with --model it loads that model's
instances itself (unmanaged), logs "worker.ready" once every instance is ready, and serves
assignments until SIGINT/SIGTERM. An MLX worker without --model also reports its ring ports
(--ring-host, --ring-ports) and runs the ranks of sharded instances the master places on it; the
sharding flags are in `exo_worker.distributed.cli`.

This module is the process: flags and their checks, logging, keys, the engine, signals. The worker
it runs (`WorkerConfig`, `WorkerDaemon`, the exit codes) is in `exo_worker.worker`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import re
import secrets
import socket
from pathlib import Path
from typing import Annotated

import msgspec
import structlog
import typer

from exo_worker.bus import parse_master_address
from exo_worker.bus_auth import load_client_curve
from exo_worker.discover import find_master
from exo_worker.distributed import cli as shard_cli
from exo_worker.engine import ModelLoadError
from exo_worker.engine_choice import (
    DEFAULT_MODEL,
    EngineName,
    build_engine_factory,
    build_model_engines,
    served_model_id,
)
from exo_worker.local_models import (
    DEFAULT_SIM_MODELS,
    parse_sim_model,
    parse_size,
)
from exo_worker.shard_ranks import ShardLauncher
from exo_worker.worker import EXIT_BAD_KEYS, EXIT_MODEL_LOAD, WorkerConfig, WorkerDaemon, node_facts
from protocol.discovery import DiscoveryError, check_cluster
from protocol.ids import NodeId
from protocol.keys import KeyFileError
from protocol.logs import LogFormat, configure_logging
from protocol.sharding import Sharding
from protocol.version import version_line

log = structlog.get_logger("exo_worker.daemon")
EXIT_NO_MASTER = 2  # no --master and none found (or none to trust) on the LAN


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


app = typer.Typer(
    add_completion=True,
    rich_markup_mode=None,  # click's plain help: option names whole, flags without "<bool>"
    help="exo-worker: serve model instances to an exo-master over the bus.",
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(version_line("exo-worker"))
        raise typer.Exit()


@app.command()
def serve(
    master: Annotated[
        str | None,
        typer.Option(
            "--master",
            envvar="EXO_MASTER",
            show_default=False,
            help=(
                "Master bus address HOST:BUS_PORT. Default: find the master on the LAN (mDNS). "
                "Not for --shard-rank > 0."
            ),
        ),
    ] = None,
    cluster: Annotated[
        str | None,
        typer.Option(
            "--cluster",
            envvar="EXO_CLUSTER",
            show_default=False,
            help="Without --master: join the master of this cluster (needed when several answer).",
        ),
    ] = None,
    discover_timeout: Annotated[
        float,
        typer.Option(
            "--discover-timeout", envvar="EXO_DISCOVER_TIMEOUT", min=0.1, help="Seconds to look for a master."
        ),
    ] = 10.0,
    mdns_interface: Annotated[
        list[str],
        typer.Option(
            "--mdns-interface",
            envvar="EXO_MDNS_INTERFACE",
            metavar="ADDRESS",
            help="Look for the master from this local address only (repeatable; default: all).",
        ),
    ] = [],  # noqa: B006 (typer reads the default, never mutates it)
    node_id: Annotated[
        str | None,
        typer.Option("--node-id", envvar="EXO_NODE_ID", help="Default: hostname plus a short random suffix."),
    ] = None,
    engine: Annotated[EngineName, typer.Option("--engine", envvar="EXO_ENGINE")] = EngineName.SIM,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            envvar="EXO_MODEL",
            help='Declare this model\'s instances here (e.g. "sim-model", "smollm2", a directory); '
            "shown as unmanaged. Without it the worker loads only what the master places.",
        ),
    ] = None,
    sim_memory: Annotated[
        str,
        typer.Option("--sim-memory", envvar="EXO_SIM_MEMORY", help="Sim engine: the node memory it reports."),
    ] = "16GiB",
    sim_models: Annotated[
        list[str] | None,
        typer.Option(
            "--sim-model",
            envvar="EXO_SIM_MODELS",
            help="Sim engine: a model it holds, NAME=SIZE[:LOAD_SECONDS] (repeatable). "
            "Default: sim-model=1GiB:0.5.",
        ),
    ] = None,
    models_dir: Annotated[
        Path | None,
        typer.Option(
            "--models-dir",
            envvar="EXO_MODELS_DIR",
            help="MLX engine: model directories the master may place here (default: the exo cache).",
        ),
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
    ring_host: shard_cli.RingHostFlag = None,
    ring_ports: shard_cli.RingPortsFlag = shard_cli.DEFAULT_RING_PORTS,
    shard_rank: shard_cli.ShardRankFlag = None,
    shard_hosts: shard_cli.ShardHostsFlag = None,
    sharding: shard_cli.ShardingFlag = Sharding.TENSOR,
    shard_layers: shard_cli.ShardLayersFlag = None,
    shard_control: shard_cli.ShardControlFlag = None,
    shard_timeout: shard_cli.ShardTimeoutFlag = 10.0,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Connect to the master, load the instances, and serve assignments until SIGINT/SIGTERM."""
    # Usage errors first: they are typer's to report, before logging is set up.
    spec = shard_cli.shard_spec(shard_rank, shard_hosts, sharding, shard_layers, shard_control, shard_timeout)
    ring = shard_cli.parse_ring_ports(ring_host or "127.0.0.1", ring_ports)
    if spec is not None:  # a follower runs here and never returns; rank 0 goes on
        shard_cli.manual_rank(spec, model, engine is EngineName.MLX, instances, log_format, log_level)
    try:
        address = parse_master_address(master) if master is not None else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--master") from exc
    if cluster is not None:
        try:
            check_cluster(cluster)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--cluster") from exc
    node = NodeId(_check_node_id(node_id if node_id is not None else default_node_id()))
    try:
        sim_catalog = {m.name: m for m in map(parse_sim_model, sim_models or DEFAULT_SIM_MODELS)}
        sim_bytes = parse_size(sim_memory)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    configure_logging(log_format, log_level)
    # A sharded instance is declared by its rank 0 (the master does not place those yet).
    model_name = model if spec is None else (model or DEFAULT_MODEL[EngineName.MLX])
    structlog.contextvars.bind_contextvars(node_id=node)
    try:
        curve = load_client_curve(secret_key, master_key)
    except KeyFileError as exc:
        log.error("worker.bad_keys", error=str(exc))
        raise typer.Exit(EXIT_BAD_KEYS) from None
    if address is None:
        try:
            address, advert = find_master(cluster, discover_timeout, mdns_interface or None, curve)
        except DiscoveryError as exc:
            log.error("worker.no_master", error=str(exc))
            raise typer.Exit(EXIT_NO_MASTER) from None
        log.info(
            "worker.discovered",
            joined=advert.name,
            cluster=advert.cluster,
            master=str(address),
            master_key=advert.key,
            session=advert.session,
        )
    try:
        if prompt_cache_bytes is None and engine is EngineName.MLX:
            from exo_worker.prompt_cache import default_budget_bytes

            prompt_cache_bytes = default_budget_bytes(instances)
        factory = (
            build_engine_factory(
                engine,
                model_name,
                sim_tokens_per_s,
                max_concurrency=max_concurrency,
                prompt_cache_bytes=prompt_cache_bytes,
                prefill_chunk=prefill_chunk,
                sim_prefill_tokens_per_s=sim_prefill_tokens_per_s,
                sim_context_length=sim_context_length,
            )
            if model_name is not None
            else None
        )
        if spec is not None:
            assert model_name is not None  # a sharded worker always names its model (above)
            factory = sharded = shard_cli.ShardedFactory.for_model(
                model_name, spec, max_concurrency, prompt_cache_bytes
            )
    except ModelLoadError as exc:
        log.error("worker.model_load_failed", model=model_name, engine=engine.value, error=str(exc))
        raise typer.Exit(EXIT_MODEL_LOAD) from None
    facts = node_facts(engine, sim_catalog, sim_bytes, models_dir)
    shards: ShardLauncher | None = None
    if engine is EngineName.MLX and model_name is None:  # it can run the ranks the master places
        ring = (
            ring
            if ring_host
            else msgspec.structs.replace(ring, host=shard_cli.default_ring_host(address.host))
        )
        facts = dataclasses.replace(facts, ring=ring)
        shards = ShardLauncher(prompt_cache_bytes, prefill_chunk, shard_timeout, log_format.value, log_level)
    elif engine is EngineName.SIM:  # stand-in ranks (exo_worker.distributed.sim_rank): placement tests
        facts, shards = dataclasses.replace(facts, ring=ring), ShardLauncher.sim()
    model_engines = build_model_engines(
        engine,
        facts.catalog,
        sim_catalog,
        sim_tokens_per_s,
        prompt_cache_bytes=prompt_cache_bytes,
        prefill_chunk=prefill_chunk,
        sim_prefill_tokens_per_s=sim_prefill_tokens_per_s,
        sim_context_length=sim_context_length,
    )
    config = WorkerConfig(
        node_id=node,
        master=address,
        model=served_model_id(model_name) if model_name is not None else None,
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
        daemon = WorkerDaemon(config, factory, model_engines, facts, shards)
    except ModelLoadError as exc:  # an engine constructor may check its model path eagerly
        log.error("worker.model_load_failed", model=model_name, engine=engine.value, error=str(exc))
        raise typer.Exit(EXIT_MODEL_LOAD) from None
    if spec is None:
        raise typer.Exit(asyncio.run(shard_cli.serve(daemon)))
    shard_cli.lead(daemon, sharded)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
