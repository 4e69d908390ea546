"""The child process that runs rank 0 of a master-placed sharded instance (a `ShardedEngine`).

    python -m exo_worker.distributed.rank0_process [--log-format F] [--log-level L]

The worker (exo_worker.process_engine) starts it and speaks frames (distributed/frames.py) over its
stdin and stdout; logs go to stderr, the worker's. Why a process: a collective on a lost peer may
never return and a thread stuck in MLX cannot be stopped, so the worker keeps its instances apart
from MLX distributed and, when a rank is lost, this process leaves with `os._exit` (see
follower.py), freeing its CPU and memory, while the worker lives on (exo #1823).

It leaves:
- after `Close` (the worker unloads the instance): exit 0;
- when the instance lost a rank: `Lost(reason)` is sent, then exit EXIT_RANK_LOST;
- when its load failed: `LoadFailed(error)`, then exit EXIT_RANK_FAILED;
- when stdin closes or breaks (the worker is gone): exit EXIT_RANK_LOST at once.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
from pathlib import Path
from typing import BinaryIO, NoReturn

import structlog

from exo_worker.distributed.engine import ShardedEngine
from exo_worker.distributed.follower import EXIT_OK, EXIT_RANK_FAILED, EXIT_RANK_LOST
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
    read_body,
    to_child,
)
from exo_worker.distributed.lifeline import die_with_parent
from exo_worker.engine import EngineError, ModelLoadError
from protocol.logs import LogFormat, configure_logging

log = structlog.get_logger("exo_worker.rank0")

SNAPSHOT_INTERVAL = 0.25  # seconds between the engine counters sent to the worker


def _leave(code: int) -> NoReturn:
    sys.stderr.flush()
    os._exit(code)


class _Child:
    def __init__(self, out: BinaryIO, loop: asyncio.AbstractEventLoop) -> None:
        self.out = out
        self.loop = loop
        self.inbox: asyncio.Queue[ToChild] = asyncio.Queue()
        self.cancels: dict[int, threading.Event] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    def send(self, frame: FromChild) -> None:  # on the loop thread only
        try:
            self.out.write(encode(frame))
            self.out.flush()
        except OSError:  # the worker is gone
            _leave(EXIT_RANK_LOST)

    def read_commands(self) -> None:
        """The stdin thread: frames to the loop; the end of stdin ends the process."""
        try:
            while (body := read_body(sys.stdin.buffer)) is not None:
                frame = decode(to_child, body)
                self.loop.call_soon_threadsafe(self.inbox.put_nowait, frame)  # type: ignore[arg-type]
        except (FrameError, OSError) as exc:
            log.error("rank0.link_broken", error=str(exc))
        _leave(EXIT_RANK_LOST)

    async def serve(self) -> NoReturn:
        init = await self.inbox.get()
        if not isinstance(init, Init):
            log.error("rank0.bad_start", frame=type(init).__name__)
            _leave(EXIT_RANK_FAILED)
        engine = ShardedEngine(
            Path(init.model),
            init.spec,
            label=init.label,
            max_batch=init.max_batch,
            prompt_cache_bytes=init.prompt_cache_bytes,
            prefill_chunk=init.prefill_chunk,
        )
        try:
            await engine.load(lambda what, fraction: self.send(Progress(what=what, fraction=fraction)))
        except ModelLoadError as exc:
            self.send(LoadFailed(error=str(exc)))
            _leave(EXIT_RANK_FAILED)
        except Exception as exc:  # a bug in the loader: the worker still gets one line
            log.exception("rank0.load_crashed")
            self.send(LoadFailed(error=f"{type(exc).__name__}: {exc}"))
            _leave(EXIT_RANK_FAILED)
        self.send(self._snapshot(engine))  # the counters first: the worker reads them once loaded
        self.send(Loaded())
        watch = asyncio.create_task(self._watch(engine), name="lost")
        self.tasks.add(watch)
        while True:
            frame = await self.inbox.get()
            if isinstance(frame, Run):
                task = asyncio.create_task(self._run(engine, frame), name=f"run:{frame.run}")
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            elif isinstance(frame, Cancel):
                event = self.cancels.get(frame.run)
                if event is not None:
                    event.set()
            elif isinstance(frame, Close):
                log.info("rank0.closing")
                engine.close()  # bounded: the MLX thread ends its step, the followers are told
                _leave(EXIT_OK)

    async def _run(self, engine: ShardedEngine, frame: Run) -> None:
        cancel = self.cancels[frame.run] = threading.Event()
        try:
            outcome = await engine.run(
                frame.params, lambda text: self.send(Text(run=frame.run, text=text)), cancel
            )
        except EngineError as exc:
            self.send(RunFailed(run=frame.run, error=str(exc) or type(exc).__name__, code=exc.code))
        except Exception as exc:  # an engine bug fails this task, as in the worker's runner
            log.exception("rank0.run_crashed", run=frame.run)
            self.send(RunFailed(run=frame.run, error=f"engine error: {type(exc).__name__}: {exc}"))
        else:
            self.send(Done.of(frame.run, outcome))
        finally:
            del self.cancels[frame.run]

    @staticmethod
    def _snapshot(engine: ShardedEngine) -> Snapshot:
        return Snapshot(
            work=engine.work(), prompt_cache=engine.prompt_cache_stats(), context_length=engine.context_length
        )

    async def _watch(self, engine: ShardedEngine) -> None:
        lost = asyncio.ensure_future(engine.wait_lost())
        while not lost.done():
            self.send(self._snapshot(engine))
            await asyncio.wait({lost}, timeout=SNAPSHOT_INTERVAL)
        log.error("rank0.lost", reason=lost.result())
        self.send(Lost(reason=lost.result()))
        _leave(EXIT_RANK_LOST)


def main(argv: list[str] | None = None) -> NoReturn:
    die_with_parent()  # before anything: MLX may hold the GIL when the worker goes
    parser = argparse.ArgumentParser(prog="exo_worker.distributed.rank0_process")
    parser.add_argument("--log-format", type=LogFormat, default=LogFormat.JSON)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    # The frames keep the real stdout; whatever else writes to fd 1 (a library's print) goes to
    # stderr and cannot corrupt the link.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    configure_logging(args.log_format, args.log_level)
    structlog.contextvars.bind_contextvars(pid=os.getpid())
    loop = asyncio.new_event_loop()
    child = _Child(out, loop)
    threading.Thread(target=child.read_commands, name="rank0-stdin", daemon=True).start()
    loop.run_until_complete(child.serve())
    _leave(EXIT_RANK_FAILED)  # serve never returns


if __name__ == "__main__":
    main()
