"""ProcessEngine: rank 0 of a master-placed sharded instance, run in a child process.

The worker must outlive its sharded instances. A collective on a dead peer may never return and a
thread stuck in MLX cannot be stopped (exo #1823: a lost rank left both Macs at 99% CPU), so the
`ShardedEngine` runs in `python -m exo_worker.distributed.rank0_process`, and this object is its
Engine for the runner: frames (distributed/frames.py) go over the child's stdin and stdout, two
threads here move them (a blocked pipe never blocks the event loop), and the child's counters
arrive every quarter second for the heartbeats.

When the instance loses a rank (the child says `Lost`, or it dies: kill -9, a crash), every run in
flight and every later one raises `InstanceLost` (code INSTANCE_LOST) and `failure` says why, so
the runner reports the instance FAILED; the child has left (or is killed), the worker lives on.
`close()` asks the child to close, and kills it by PID when it has not left within `close_grace`.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from exo_worker.distributed.frames import (
    Cancel,
    Close,
    Done,
    FrameError,
    FromChild,
    Init,
    Loaded,
    LoadFailed,
    Lost,
    Progress,
    Run,
    RunFailed,
    Snapshot,
    Text,
    ToChild,
    decode,
    encode,
    from_child,
    read_body,
)
from exo_worker.distributed.topology import ShardSpec
from exo_worker.engine import (
    EngineError,
    InstanceLost,
    ModelLoadError,
    ProgressSink,
    RunOutcome,
    TextSink,
)
from protocol.messages import INSTANCE_LOST, InstanceWork, PromptCacheStats, TaskKind, TaskParams

log = structlog.get_logger("exo_worker.process_engine")

# How often a run checks its cancel event: the runner's cancel is a threading.Event (shared with
# the thread-based engines), which has no hook to wake a coroutine; 50 ms is well under a token.
CANCEL_POLL = 0.05
RANK0_MODULE = "exo_worker.distributed.rank0_process"


@dataclass(slots=True)
class _Run:
    done: asyncio.Future[RunOutcome]
    on_text: TextSink


class ProcessEngine:
    def __init__(
        self,
        model: str | Path,
        spec: ShardSpec,
        *,
        label: str = "",
        max_batch: int = 4,
        prompt_cache_bytes: int | None = None,
        prefill_chunk: int = 0,
        command: Sequence[str] | None = None,
        close_grace: float = 3.0,
    ) -> None:
        self._init = Init(
            model=str(model),
            spec=spec,
            label=label or str(model),
            max_batch=max_batch,
            prompt_cache_bytes=prompt_cache_bytes,
            prefill_chunk=prefill_chunk,
        )
        self._command = list(command) if command is not None else [sys.executable, "-m", RANK0_MODULE]
        self._close_grace = close_grace
        self._log = log.bind(model=self._init.label, group=spec.control_endpoint)
        self._proc: subprocess.Popen[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outbox: queue.Queue[bytes | None] = queue.Queue()
        self._runs: dict[int, _Run] = {}
        self._next_run = 0
        self._loaded: asyncio.Future[None] | None = None
        self._progress: ProgressSink | None = None
        self._ready = False
        self._closing = False
        self._failure: str | None = None
        self._snapshot = Snapshot(
            work=InstanceWork(),
            prompt_cache=PromptCacheStats(budget_bytes=prompt_cache_bytes or 0),
            context_length=0,
        )
        self.exited = threading.Event()  # set once the child has been reaped

    # ---- what the runner reads -----------------------------------------------------------------

    @property
    def kinds(self) -> tuple[TaskKind, ...]:
        return (TaskKind.TEXT_GENERATION,)

    @property
    def context_length(self) -> int:
        return self._snapshot.context_length

    def work(self) -> InstanceWork:
        return self._snapshot.work

    def prompt_cache_stats(self) -> PromptCacheStats:
        return self._snapshot.prompt_cache

    @property
    def failure(self) -> str | None:
        return self._failure

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # ---- load, run, close ----------------------------------------------------------------------

    async def load(self, progress: ProgressSink | None = None) -> None:
        if self._ready:
            return
        if self._proc is not None or self._closing:
            raise ModelLoadError(self._failure or "this rank-0 process cannot load again")
        loop = self._loop = asyncio.get_running_loop()
        self._progress = progress
        self._loaded = loaded = loop.create_future()
        loaded.add_done_callback(lambda f: f.cancelled() or f.exception())  # a late failure is not news
        try:
            self._proc = subprocess.Popen(self._command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        except OSError as exc:
            raise ModelLoadError(f"cannot start the rank-0 process: {exc}") from exc
        self._log.info("rank0.started", pid=self._proc.pid)
        threading.Thread(target=self._write, name=f"rank0-in-{self._proc.pid}", daemon=True).start()
        threading.Thread(target=self._read, name=f"rank0-out-{self._proc.pid}", daemon=True).start()
        self._send(self._init)
        # The child bounds its own load (spec.load_timeout); this bound only catches a child that
        # stopped talking without leaving.
        timeout = self._init.spec.load_timeout + 30
        try:
            await asyncio.wait_for(asyncio.shield(loaded), timeout)
        except TimeoutError:
            self._fail(f"the rank-0 process did not load within {timeout:.0f} s")
            self.close()
            raise ModelLoadError(self._failure or "timed out") from None
        except BaseException:
            self.close()  # an unload while loading, or the load failed: the child must go
            raise
        self._ready = True

    async def run(self, params: TaskParams, on_text: TextSink, cancel: threading.Event) -> RunOutcome:
        if self._failure is not None:
            raise InstanceLost(self._failure)
        if not self._ready or self._closing:
            raise EngineError("the sharded instance is not loaded")
        assert self._loop is not None
        self._next_run += 1
        run_id = self._next_run
        done: asyncio.Future[RunOutcome] = self._loop.create_future()
        try:
            self._send(Run(run=run_id, params=params))
        except FrameError as exc:  # beyond the link's bound (the protocol's own bounds are far lower)
            raise EngineError(f"the request is too large for the rank-0 link: {exc}") from exc
        self._runs[run_id] = _Run(done, on_text)
        cancelled = False
        try:
            while not done.done():
                if cancel.is_set() and not cancelled:
                    self._send(Cancel(run=run_id))
                    cancelled = True
                await asyncio.wait({done}, timeout=CANCEL_POLL)
            return done.result()
        finally:
            if not done.done() and not cancelled:
                self._send(Cancel(run=run_id))  # hard-stopped (asyncio cancel): the child stops it too
            self._runs.pop(run_id, None)

    def close(self) -> None:
        """Ask the child to close; a thread kills it by PID if it has not left within close_grace."""
        if self._closing:
            return
        self._closing = True
        proc = self._proc
        if proc is None:
            return
        self._send(Close())
        threading.Thread(target=self._reap, args=(proc,), name=f"rank0-reap-{proc.pid}").start()

    def _reap(self, proc: subprocess.Popen[bytes]) -> None:
        try:
            proc.wait(timeout=self._close_grace)
        except subprocess.TimeoutExpired:
            self._log.warning("rank0.killed", pid=proc.pid, reason=f"not closed within {self._close_grace} s")
            proc.kill()
            proc.wait(timeout=10)  # SIGKILL cannot be ignored: the wait is short
        self._outbox.put(None)

    # ---- the link ------------------------------------------------------------------------------

    def _send(self, frame: ToChild) -> None:
        if not self.exited.is_set():
            self._outbox.put(encode(frame))

    def _write(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stdin is not None
        try:
            while (data := self._outbox.get()) is not None:
                proc.stdin.write(data)
                proc.stdin.flush()
        except OSError:
            pass  # the child is gone: the reader reports how it ended
        finally:
            with contextlib.suppress(OSError):
                proc.stdin.close()

    def _read(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        broken = ""
        try:
            while (body := read_body(proc.stdout)) is not None:
                self._to_loop(self._on_frame, decode(from_child, body))
        except (FrameError, OSError) as exc:
            broken = str(exc)
            proc.kill()  # a link that cannot be trusted any more: the child goes at once
        try:
            code = proc.wait(timeout=self._close_grace)
        except subprocess.TimeoutExpired:  # it closed its stdout yet lives on: end it
            proc.kill()
            code = proc.wait(timeout=10)
        self._outbox.put(None)
        self.exited.set()
        self._to_loop(self._on_exit, code, broken)

    def _to_loop(self, callback: object, *args: object) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            self._loop.call_soon_threadsafe(callback, *args)  # type: ignore[arg-type]

    # ---- on the event loop ---------------------------------------------------------------------

    def _on_frame(self, frame: FromChild) -> None:
        if isinstance(frame, Text):
            run = self._runs.get(frame.run)
            if run is not None and not run.done.done():
                run.on_text(frame.text)
        elif isinstance(frame, Done):
            self._settle(frame.run, frame.outcome())
        elif isinstance(frame, RunFailed):
            error = InstanceLost(frame.error) if frame.code == INSTANCE_LOST else EngineError(frame.error)
            error.code = frame.code
            self._settle(frame.run, error)
        elif isinstance(frame, Snapshot):
            self._snapshot = frame
        elif isinstance(frame, Progress):
            if self._progress is not None:
                self._progress(frame.what, frame.fraction)
        elif isinstance(frame, Loaded):
            if self._loaded is not None and not self._loaded.done():
                self._loaded.set_result(None)
        elif isinstance(frame, LoadFailed):
            self._fail(frame.error)
        elif isinstance(frame, Lost):
            self._fail(f"sharded instance lost a rank: {frame.reason}")

    def _on_exit(self, code: int, broken: str) -> None:
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        self._log.info("rank0.exited", pid=self._proc.pid if self._proc else None, code=code, link=broken)
        if self._closing:
            for run in self._runs.values():
                if not run.done.done():
                    run.done.set_exception(EngineError("the sharded instance was unloaded"))
            return
        self._fail(f"the rank-0 process {how}" + (f" ({broken})" if broken else ""))

    def _fail(self, reason: str) -> None:
        """The instance is broken: the load (if waiting) and every run in flight fail with `reason`."""
        if self._failure is None:
            self._failure = reason
            self._log.error("rank0.failed", reason=reason)
        if self._loaded is not None and not self._loaded.done():
            self._loaded.set_exception(ModelLoadError(self._failure))
        for run_id in list(self._runs):
            self._settle(run_id, InstanceLost(self._failure))

    def _settle(self, run_id: int, result: RunOutcome | BaseException) -> None:
        run = self._runs.get(run_id)
        if run is None or run.done.done():
            return
        if isinstance(result, BaseException):
            run.done.set_exception(result)
        else:
            run.done.set_result(result)
