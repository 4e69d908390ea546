"""The ranks of master-placed sharded instances on this node: each one a child process.

- rank 0 is a Runner like any instance, whose engine is a `ProcessEngine` (its `ShardedEngine`
  runs in a child process, see process_engine.py): it takes the instance's tasks;
- a rank > 0 is a `FollowerRank`: `python -m exo_worker.distributed.follower` in a child process,
  reported beside the runners (loading until it says "loaded", ready after, failed with the reason
  when it ends unexpectedly) and never given a task.
`ShardLauncher` turns a LoadInstance's ShardAssignment into either, with the node's settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec
import structlog

from exo_worker.distributed.follower import EXIT_OK, EXIT_RANK_FAILED, EXIT_RANK_LOST
from exo_worker.distributed.topology import ShardSpec
from exo_worker.process_engine import RANK0_MODULE, ProcessEngine
from protocol.ids import NodeId
from protocol.messages import InstanceReport, InstanceStatus, LoadInstance, TaskKind
from protocol.sharding import ShardAssignment

log = structlog.get_logger("exo_worker.ranks")

FOLLOWER_MODULE = "exo_worker.distributed.follower"


@dataclass(frozen=True, slots=True)
class ShardLauncher:
    """How this node runs the ranks the master places (the worker's settings for them)."""

    prompt_cache_bytes: int | None = None
    prefill_chunk: int = 0
    loss_timeout: float = 10.0  # --shard-timeout
    log_format: str = "json"  # the rank processes log to the worker's stderr like the worker
    log_level: str = "info"
    join_timeout: float = 300.0
    load_timeout: float = 900.0
    stop_grace: float = 3.0  # seconds a rank process gets to leave before it is killed
    # Tests swap the child processes' commands (argv before the module's own flags).
    rank0_command: Sequence[str] | None = None
    follower_command: Sequence[str] = (sys.executable, "-m", FOLLOWER_MODULE)
    # A sim worker: rank 0 is its ordinary sim engine, a follower a stand-in process (sim_rank).
    simulated: bool = False

    @classmethod
    def sim(cls) -> ShardLauncher:
        return cls(simulated=True, follower_command=(sys.executable, "-m", "exo_worker.distributed.sim_rank"))

    def spec(self, shard: ShardAssignment) -> ShardSpec:
        return ShardSpec(
            rank=shard.rank,
            hosts=shard.hosts,
            sharding=shard.sharding,
            control=shard.control,
            split=shard.split,
            loss_timeout=self.loss_timeout,
            join_timeout=self.join_timeout,
            load_timeout=self.load_timeout,
        )

    def rank0(self, model_path: str, cmd: LoadInstance) -> ProcessEngine:
        assert cmd.shard is not None and cmd.shard.rank == 0
        flags = ["--log-format", self.log_format, "--log-level", self.log_level]
        return ProcessEngine(
            model_path,
            self.spec(cmd.shard),
            label=str(cmd.model),
            max_batch=cmd.max_concurrency,
            prompt_cache_bytes=self.prompt_cache_bytes,
            prefill_chunk=self.prefill_chunk,
            command=[*(self.rank0_command or (sys.executable, "-m", RANK0_MODULE)), *flags],
            close_grace=self.stop_grace,
        )

    def follower_argv(self, model_path: str, shard: ShardAssignment) -> list[str]:
        spec = msgspec.json.encode(self.spec(shard)).decode()
        flags = ["--log-format", self.log_format, "--log-level", self.log_level]
        return [*self.follower_command, "--model", model_path, "--spec", spec, *flags]


class FollowerRank:
    """A rank > 0 of a sharded instance: its process, and the instance report the node sends for it."""

    def __init__(self, node_id: NodeId, cmd: LoadInstance, stop_grace: float = 3.0) -> None:
        assert cmd.shard is not None and cmd.shard.rank > 0
        self.node_id = node_id
        self.cmd = cmd
        self.shard: ShardAssignment = cmd.shard
        self.instance_id = cmd.instance_id
        self.status = InstanceStatus.LOADING
        self.error: str | None = None
        self.exit_code: int | None = None
        self.exited = threading.Event()  # set once the process has been reaped
        self._stop_grace = stop_grace
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopping = False
        self._last_word = ""  # the follower's own reason for ending, if it gave one
        self._log = log.bind(instance_id=cmd.instance_id, rank=cmd.shard.rank, group=cmd.shard.group)

    @property
    def memory_bytes(self) -> int:
        return self.shard.memory_bytes if self.status is not InstanceStatus.FAILED else 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def fail(self, error: str) -> None:
        self.error, self.status = error, InstanceStatus.FAILED
        self._log.error("rank.failed", error=error)

    def start(self, argv: Sequence[str]) -> None:
        try:
            self._proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        except OSError as exc:
            self.fail(f"cannot start the rank process: {exc}")
            self.exited.set()
            return
        self._log.info("rank.started", pid=self._proc.pid)
        threading.Thread(target=self._watch, name=f"rank-{self._proc.pid}", daemon=True).start()

    def _watch(self) -> None:
        """Its stdout lines: "loaded", then maybe why it ends; then reap it and say how it ended."""
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        with contextlib.suppress(OSError, ValueError):
            for raw in proc.stdout:
                line = raw.decode(errors="replace").strip()[:500]
                if line == "loaded":
                    if self.status is InstanceStatus.LOADING:
                        self.status = InstanceStatus.READY
                        self._log.info("rank.ready")
                elif line:
                    self._last_word = line
        try:
            code = proc.wait(timeout=self._stop_grace)
        except subprocess.TimeoutExpired:  # closed its stdout yet lives on: end it
            proc.kill()
            code = proc.wait(timeout=10)
        self.exit_code = code
        if not self._stopping:
            self.fail(self._describe(code))
        self.exited.set()

    def _describe(self, code: int) -> str:
        why = f": {self._last_word}" if self._last_word else ""
        if code == EXIT_RANK_LOST:
            return f"rank lost{why}"
        if code == EXIT_RANK_FAILED:
            return f"rank failed{why}"
        if code == EXIT_OK:
            return f"rank ended{why or ': rank 0 closed the instance'}"
        if code < 0:
            return f"the rank process was killed by signal {-code}{why}"
        return f"the rank process exited with code {code}{why}"

    async def stop(self) -> None:
        """SIGTERM, a bounded wait, then SIGKILL; always reaped."""
        self._stopping = True
        proc = self._proc
        if proc is None or self.exited.is_set():
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        if not await asyncio.to_thread(self.exited.wait, self._stop_grace):
            self._log.warning("rank.killed", pid=proc.pid, reason=f"not ended within {self._stop_grace} s")
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.to_thread(self.exited.wait, 10)
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        self._log.info("rank.stopped", code=self.exit_code)

    def report(self) -> InstanceReport:
        return InstanceReport(
            instance_id=self.instance_id,
            model=self.cmd.model,
            kinds=(TaskKind.TEXT_GENERATION,),
            status=self.status,
            max_concurrency=self.cmd.max_concurrency,
            capacity=self.cmd.capacity,
            error=self.error,
            memory_bytes=self.memory_bytes,
            progress=1.0 if self.status is InstanceStatus.READY else 0.0,
            placement=self.cmd.placement,
            shard=self.shard,
        )
