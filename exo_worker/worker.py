"""The worker itself: wires the bus shell to the runners, heartbeats, and runs until stopped.

`WorkerDaemon.run()` connects to the master, loads every instance while heartbeating their status,
logs "worker.ready", and serves assignments until its stop event is set or the master refuses this
process; it returns the process exit code. The command line that builds it is `exo_worker.daemon`.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from exo_worker.bus import MasterAddress, WorkerBus
from exo_worker.bus_auth import ClientCurve
from exo_worker.engine import ModelLoadError
from exo_worker.engine_choice import EngineFactory, EngineName, ModelEngineFactory
from exo_worker.instance_host import InstanceHost
from exo_worker.local_models import SimModel, machine_memory, mlx_backend, mlx_catalog
from exo_worker.runner import Runner
from exo_worker.runner_group import RunnerGroup
from exo_worker.shard_ranks import ShardLauncher
from protocol.ids import InstanceId, ModelId, NodeId
from protocol.messages import (
    AssignTask,
    CancelTask,
    FetchOutput,
    LoadInstance,
    LocalModel,
    MasterHeartbeat,
    MasterMessage,
    NodeRefused,
    TaskAck,
    UnloadInstance,
    WorkerHeartbeat,
)
from protocol.sharding import RingPorts

log = structlog.get_logger("exo_worker.daemon")

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_MODEL_LOAD = 2
EXIT_USAGE = 2  # refused by the master: another live process serves this node id
EXIT_BAD_KEYS = 2


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    node_id: NodeId
    master: MasterAddress
    # The model this worker declares itself (--model: unmanaged instances); None: it loads only
    # what the master places (LoadInstance).
    model: ModelId | None
    instances: int = 1
    max_concurrency: int = 4
    capacity: float = 1.0
    heartbeat_interval: float = 1.0
    heartbeat_liveness: int = 3
    backoff_initial: float = 0.5
    backoff_max: float = 10.0
    # How long running tasks get to notice their cancel event at shutdown before a hard stop.
    shutdown_grace: float = 2.0
    # Simulated lag before the worker handles each AssignTask/CancelTask (so confirmation is late,
    # as with the original master's busy event loop); benchmarks use it to expose baseline policies.
    accept_delay: float = 0.0
    # CURVE keys for the bus (None: plaintext, for a master on loopback or one run with --insecure).
    curve: ClientCurve | None = None

    def instance_id(self, index: int) -> InstanceId:
        return InstanceId(f"{self.node_id}/{index}")


@dataclass(frozen=True, slots=True)
class NodeFacts:
    """What the node reports about itself besides its instances."""

    backend: str = ""
    catalog: dict[ModelId, LocalModel] = field(default_factory=dict)
    memory_total: int | None = None  # None: the machine's memory; else simulated (--sim-memory)
    ring: RingPorts | None = None  # where MLX distributed may listen; None: no ranks of sharded instances


def node_facts(
    engine: EngineName, sim_catalog: dict[ModelId, SimModel], sim_bytes: int, models_dir: Path | None
) -> NodeFacts:
    if engine is EngineName.SIM:
        catalog = {name: m.local() for name, m in sim_catalog.items()}
        return NodeFacts(backend="sim", catalog=catalog, memory_total=sim_bytes)
    try:  # the built-in model is converted once, here, so a placement never waits on it
        from exo_worker.models import prepare_smollm2

        prepare_smollm2()
    except (ImportError, ModelLoadError) as exc:
        log.warning("worker.builtin_model_unavailable", error=str(exc))
    return NodeFacts(backend=mlx_backend(), catalog=mlx_catalog(models_dir))


class WorkerDaemon:
    """Wires the bus shell to the runners and publishes heartbeat snapshots. `run()` is the daemon."""

    def __init__(
        self,
        config: WorkerConfig,
        engine_factory: EngineFactory | None,
        model_engines: ModelEngineFactory | None = None,
        facts: NodeFacts | None = None,
        shards: ShardLauncher | None = None,
    ) -> None:
        self.config = config
        self.bus = WorkerBus(
            node_id=config.node_id,
            master=config.master,
            on_message=self._on_message,
            heartbeat_interval=config.heartbeat_interval,
            heartbeat_liveness=config.heartbeat_liveness,
            backoff_initial=config.backoff_initial,
            backoff_max=config.backoff_max,
            curve=config.curve,
        )
        declared = config.model
        runners = (
            [
                Runner(
                    node_id=config.node_id,
                    instance_id=(instance_id := config.instance_id(i)),
                    model=declared,
                    engine=engine_factory(instance_id),
                    send=self.bus.send,
                    max_concurrency=config.max_concurrency,
                    capacity=config.capacity,
                )
                for i in range(config.instances)
            ]
            if declared is not None and engine_factory is not None
            else []
        )
        self.runners = RunnerGroup(config.node_id, runners, self.bus.send)
        self.facts = facts or NodeFacts()
        self.host = (
            InstanceHost(
                config.node_id, self.runners, self.bus.send, self.facts.catalog, model_engines, shards=shards
            )
            if model_engines is not None
            else None
        )
        self.ready = asyncio.Event()
        self._address = socket.gethostname()
        self._last_session_snapshot = ""
        self._delayed: set[asyncio.TimerHandle] = set()
        # Set when the master refuses this process (another live process serves our node id).
        self.refused = asyncio.Event()
        self.refusal = ""

    def snapshot(self) -> WorkerHeartbeat:
        if self.facts.memory_total is not None:  # simulated: what the placed instances hold is used
            used = sum(r.memory_bytes for r in self.runners.runners.values())
            used += sum(f.memory_bytes for f in self.host.followers.values()) if self.host else 0
            total, available = self.facts.memory_total, max(0, self.facts.memory_total - used)
        else:
            total, available = machine_memory()
        return WorkerHeartbeat(
            node_id=self.config.node_id,
            instances=self.runners.reports() + (self.host.rank_reports() if self.host is not None else ()),
            address=self._address,
            master_session=self.bus.master_session,
            memory_total=total,
            memory_available=available,
            backend=self.facts.backend,
            host=self._address,
            models=tuple(self.facts.catalog.values())[:256],
            ring=self.facts.ring,
        )

    def _on_message(self, message: MasterMessage) -> None:
        if self.config.accept_delay > 0 and isinstance(message, AssignTask | CancelTask):
            # Commands are all delayed alike, so a cancel still lands after its assignment.
            self._delay(message)
            return
        self._dispatch(message)

    def _delay(self, message: AssignTask | CancelTask) -> None:
        def fire() -> None:
            self._delayed.discard(handle)
            self._dispatch(message)

        handle = asyncio.get_running_loop().call_later(self.config.accept_delay, fire)
        self._delayed.add(handle)

    def _dispatch(self, message: MasterMessage) -> None:
        if isinstance(message, AssignTask):
            if self.host is None or not self.host.refuse_rank_task(message):
                self.runners.handle_assign(message)
        elif isinstance(message, CancelTask):
            self.runners.handle_cancel(message)
        elif isinstance(message, FetchOutput):
            self.runners.handle_fetch(message)
        elif isinstance(message, TaskAck):
            self.runners.handle_ack(message)
        elif isinstance(message, LoadInstance | UnloadInstance):
            self._instance_command(message)
        elif isinstance(message, NodeRefused) and message.incarnation in ("", self.bus.incarnation):
            self.refusal = message.reason
            self.refused.set()
        elif isinstance(message, MasterHeartbeat) and message.session != self._last_session_snapshot:
            # A new (or restarted) master: give it our full state now rather than up to 1 s later.
            self._last_session_snapshot = message.session
            self.bus.send(self.snapshot())

    def _instance_command(self, message: LoadInstance | UnloadInstance) -> None:
        if self.host is None:
            log.warning(
                "instance.command_ignored",
                command=type(message).__name__,
                reason="no engine for placed models",
            )
            return
        had = self.host.holds(message.instance_id)
        if isinstance(message, LoadInstance):
            self.host.load(message)
        else:
            self.host.unload(message)
        if self.host.holds(message.instance_id) != had:
            self.bus.send(self.snapshot())  # the master sees the change now, not at the next beat

    async def _heartbeat_loop(self) -> None:
        while True:
            self.bus.send(self.snapshot())
            await asyncio.sleep(self.config.heartbeat_interval)  # the heartbeat period itself

    async def run(self, stop: asyncio.Event) -> int:
        """Serve until `stop` is set; return the process exit code."""
        self.bus.connect()
        background = [
            asyncio.create_task(self.bus.run(), name="bus"),
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
        ]
        stopper = asyncio.create_task(stop.wait(), name="stop")
        refused = asyncio.create_task(self.refused.wait(), name="refused")
        loader = asyncio.create_task(self.runners.load_all(), name="load")
        try:
            await asyncio.wait([loader, stopper, refused, *background], return_when=asyncio.FIRST_COMPLETED)
            if loader.done() and not refused.done():
                code = self._loaded(loader)
                if code != EXIT_OK:
                    return code
                await asyncio.wait([stopper, refused, *background], return_when=asyncio.FIRST_COMPLETED)
            for task in background:
                if task.done():
                    task.result()  # a crashed bus or heartbeat loop is a bug: surface it
            if refused.done():
                log.error("worker.refused", node_id=self.config.node_id, reason=self.refusal)
                print(f"exo-worker: {self.refusal}", file=sys.stderr, flush=True)
                return EXIT_USAGE
            return EXIT_OK
        finally:
            loader.cancel()
            stopper.cancel()
            refused.cancel()
            for handle in self._delayed:
                handle.cancel()
            if self.host is not None:
                await self.host.shutdown()
            await self.runners.shutdown(self.config.shutdown_grace)
            for task in background:
                task.cancel()
            await asyncio.gather(loader, stopper, refused, *background, return_exceptions=True)
            self.bus.close()
            log.info("worker.stopped", node_id=self.config.node_id, bus=_stats(self))

    def _loaded(self, loader: asyncio.Task[None]) -> int:
        exc = loader.exception()
        if exc is None:
            self.bus.send(self.snapshot())  # the master learns "ready" now, not at the next beat
            self.ready.set()
            log.info(
                "worker.ready",
                node_id=self.config.node_id,
                instances=list(self.runners.runners),
                model=self.config.model,
                master=str(self.config.master),
            )
            return EXIT_OK
        self.bus.send(self.snapshot())  # best effort: let the master see the failed instance
        if isinstance(exc, ModelLoadError):
            log.error("worker.model_load_failed", model=self.config.model, error=str(exc))
            return EXIT_MODEL_LOAD
        log.error("worker.load_crashed", model=self.config.model, exc_info=exc)
        return EXIT_CRASH


def _stats(daemon: WorkerDaemon) -> dict[str, int]:
    s = daemon.bus.stats
    return {
        "sent": s.sent,
        "dropped": s.dropped,
        "malformed": s.malformed,
        "gaps": s.gaps,
        "reconnects": s.reconnects,
    }
