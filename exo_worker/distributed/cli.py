"""exo-worker's sharding flags: the ring ports of a worker the master may place ranks on, and the
manual (master-less placement) ranks.

    exo-worker --engine mlx --ring-host 10.0.0.5 --ring-ports 52600-52699        # ranks placed by the master
    exo-worker --engine mlx --model smollm2 --shard-rank 1 --shard-hosts h0:p0,h1:p1,h2:p2   # a follower
    exo-worker --engine mlx --model smollm2 --master M:52416 --shard-rank 0 --shard-hosts ...  # rank 0

A worker started without --model reports its ring ports (`RingPorts`) in its heartbeats, and runs
each rank the master places in a child process (exo_worker.shard_ranks). By hand instead, rank 0 is
an ordinary worker with one instance whose engine is a `ShardedEngine`: it registers the instance
with the master and serves its requests, and the process ends when a rank is lost. Ranks > 0 only
follow rank 0 (no master link). Every rank gets the same --shard-hosts (index = rank), --sharding
and --shard-layers.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import signal
import socket
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import msgspec
import structlog
import typer

from exo_worker.distributed.topology import ShardSpec, parse_hosts
from exo_worker.engine import Engine, ModelLoadError
from exo_worker.worker import EXIT_MODEL_LOAD, WorkerDaemon
from protocol.ids import InstanceId
from protocol.logs import LogFormat, configure_logging
from protocol.sharding import RingPorts, Sharding

if TYPE_CHECKING:
    from exo_worker.distributed.engine import ShardedEngine

log = structlog.get_logger("exo_worker.daemon")

EXIT_SHARD_LOST = 3  # rank 0 ended because its instance lost a rank (same code as a follower's)
DEFAULT_RING_PORTS = "52600-52699"


def _positive(value: float) -> float:
    if not value > 0:
        raise typer.BadParameter(f"must be > 0, got {value}")
    return value


# ---- the flags (exo_worker.daemon's signature uses these) -----------------------------------------

RingHostFlag = Annotated[
    str | None,
    typer.Option(
        "--ring-host",
        envvar="EXO_RING_HOST",
        show_default=False,
        help="The address other ranks reach this node's MLX ring at. Default: this node's address "
        "toward the master (127.0.0.1 for a master on loopback).",
    ),
]
RingPortsFlag = Annotated[
    str,
    typer.Option(
        "--ring-ports",
        envvar="EXO_RING_PORTS",
        help="FIRST-LAST: the ports the master may hand out for ranks of sharded instances here.",
    ),
]
ShardRankFlag = Annotated[
    int | None,
    typer.Option(
        "--shard-rank",
        envvar="EXO_SHARD_RANK",
        min=0,
        help="By hand: this worker is rank R of a sharded instance (0 talks to the master).",
    ),
]
ShardHostsFlag = Annotated[
    str | None,
    typer.Option(
        "--shard-hosts", envvar="EXO_SHARD_HOSTS", help="MLX ring addresses h0:p0,h1:p1,... (index = rank)."
    ),
]
ShardingFlag = Annotated[Sharding, typer.Option("--sharding", envvar="EXO_SHARDING")]
ShardLayersFlag = Annotated[
    str | None,
    typer.Option("--shard-layers", envvar="EXO_SHARD_LAYERS", help="Pipeline: layers per rank, e.g. 20,10."),
]
ShardControlFlag = Annotated[
    str | None,
    typer.Option(
        "--shard-control",
        envvar="EXO_SHARD_CONTROL",
        help="HOST:PORT of rank 0's control socket. Default: rank 0's ring port + 1.",
    ),
]
ShardTimeoutFlag = Annotated[
    float,
    typer.Option(
        "--shard-timeout",
        envvar="EXO_SHARD_TIMEOUT",
        callback=_positive,
        help="Seconds of silence after which a rank counts as lost.",
    ),
]


def parse_ring_ports(host: str, ports: str) -> RingPorts:
    """The RingPorts from --ring-host/--ring-ports. typer.BadParameter on bad flags."""
    first, sep, last = ports.partition("-")
    try:
        if not sep or not first.strip().isdigit() or not last.strip().isdigit():
            raise ValueError(f"expected FIRST-LAST, got {ports!r}")
        return msgspec.convert({"host": host, "first": int(first), "last": int(last)}, RingPorts)
    except ValueError as exc:  # msgspec's ValidationError is one
        raise typer.BadParameter(str(exc), param_hint="--ring-ports/--ring-host") from exc


def default_ring_host(master_host: str) -> str:
    """This node's address toward the master: 127.0.0.1 for a master on loopback, else the local
    address a packet to the master leaves from (no packet is sent); the host name if neither works."""
    try:
        address = socket.getaddrinfo(master_host, None, socket.AF_INET)[0][4][0]
        if ipaddress.ip_address(address).is_loopback:
            return "127.0.0.1"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((address, 9))
            return str(probe.getsockname()[0])
    except (OSError, IndexError, ValueError):
        return socket.gethostname()


def shard_spec(
    rank: int | None,
    hosts: str | None,
    sharding: Sharding,
    layers: str | None,
    control: str | None,
    loss_timeout: float,
) -> ShardSpec | None:
    """The spec from the flags; None when this worker is not a rank. typer.BadParameter on bad flags."""
    if rank is None and not hosts:
        return None
    if rank is None or not hosts:
        raise typer.BadParameter("--shard-rank and --shard-hosts go together", param_hint="--shard-rank")
    try:
        split = tuple(int(n) for n in layers.split(",")) if layers else ()
        return ShardSpec(
            rank=rank,
            hosts=parse_hosts(hosts),
            sharding=sharding,
            control=control or "",
            split=split,
            loss_timeout=loss_timeout,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--shard-hosts") from exc


def manual_rank(
    spec: ShardSpec, model: str | None, mlx: bool, instances: int, log_format: LogFormat, log_level: str
) -> None:
    """--shard-rank: a follower runs here and never returns; rank 0 must be one MLX instance."""
    if spec.rank > 0:
        configure_logging(log_format, log_level)
        follow(model or "smollm2", spec)
    if not mlx or instances != 1:
        raise typer.BadParameter(
            "a sharded worker runs --engine mlx with one instance", param_hint="--engine"
        )


class ShardedFactory:
    """The engine factory of rank 0: one ShardedEngine, kept so the daemon can watch and close it."""

    @classmethod
    def for_model(
        cls, model: str, spec: ShardSpec, max_batch: int, prompt_cache_bytes: int | None
    ) -> ShardedFactory:
        """ModelLoadError when the model cannot be found."""
        from exo_worker.models import resolve_model

        return cls(resolve_model(model), spec, max_batch=max_batch, prompt_cache_bytes=prompt_cache_bytes)

    def __init__(
        self, model: str | Path, spec: ShardSpec, *, max_batch: int, prompt_cache_bytes: int | None
    ) -> None:
        self._model = model
        self._spec = spec
        self._max_batch = max_batch
        self._prompt_cache_bytes = prompt_cache_bytes
        self.engine: ShardedEngine | None = None

    def __call__(self, instance_id: InstanceId) -> Engine:
        from exo_worker.distributed.engine import ShardedEngine

        if self.engine is not None:
            raise typer.BadParameter("a sharded worker serves one instance", param_hint="--instances")
        self.engine = ShardedEngine(
            self._model,
            self._spec,
            label=str(self._model),
            max_batch=self._max_batch,
            prompt_cache_bytes=self._prompt_cache_bytes,
        )
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


# ---- the process ----------------------------------------------------------------------------------


async def serve(daemon: WorkerDaemon, lost: Callable[[], Coroutine[Any, Any, str]] | None = None) -> int:
    """Serve until SIGINT/SIGTERM, or until `lost` returns (a sharded instance lost a rank)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    watch: asyncio.Task[str] | None = None
    if lost is not None:
        watch = asyncio.create_task(lost(), name="shard-lost")
        watch.add_done_callback(lambda _: stop.set())
    try:
        code = await daemon.run(stop)
        if watch is not None and watch.done() and not watch.cancelled():
            log.error("worker.shard_lost", reason=watch.result())
            return EXIT_SHARD_LOST
        return code
    finally:
        if watch is not None:
            watch.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def follow(model: str, spec: ShardSpec) -> NoReturn:
    """A rank > 0 started by hand: follow rank 0 until the instance ends (see follower.py)."""
    from exo_worker.distributed.follower import follower_main
    from exo_worker.models import resolve_model

    try:
        path = resolve_model(model)
    except ModelLoadError as exc:
        log.error("worker.model_load_failed", model=model, error=str(exc))
        raise typer.Exit(EXIT_MODEL_LOAD) from None
    follower_main(path, spec)


def lead(daemon: WorkerDaemon, sharded: ShardedFactory) -> NoReturn:
    """Rank 0 started by hand: serve, then end the process the hard way when a rank was lost."""
    engine = sharded.engine
    assert engine is not None
    code = asyncio.run(serve(daemon, engine.wait_lost))
    if code != EXIT_SHARD_LOST:
        sharded.close()  # tells the followers to close
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
