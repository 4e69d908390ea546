"""A follower: the process of a rank > 0 of a sharded instance. It has no link to the master.

Two threads. The main thread owns the control socket: it says hello to rank 0, queues rank 0's
commands for the MLX thread, beats every tenth of the loss timeout and watches rank 0's beats.
The MLX thread joins the ring, loads this rank's shard and then applies the commands in order
(lockstep.Mirror). Only the main thread decides to end the process:
- `Close` from rank 0: the MLX thread finishes and the process exits 0;
- `Abort` from rank 0 (another rank was lost), or rank 0 silent past the loss timeout (or never
  heard from within the join timeout): exit EXIT_RANK_LOST at once;
- the MLX thread failed (a collective error, a lockstep mismatch): rank 0 is told, exit
  EXIT_RANK_FAILED.
Exits are `os._exit`: the MLX thread may be inside a collective that will never return, and
leaving the process is what frees its CPU and memory (no thread left spinning, exo #1823).
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import NoReturn

import structlog

from exo_worker.distributed.control import (
    Abort,
    Beat,
    Close,
    Failed,
    FollowerLink,
    Hello,
    Message,
    Start,
    beat_interval,
)
from exo_worker.distributed.lockstep import Mirror
from exo_worker.distributed.shard_load import load_shard
from exo_worker.distributed.topology import ShardSpec, init_group

log = structlog.get_logger(__name__)

EXIT_OK = 0
EXIT_RANK_LOST = 3  # another rank is gone (or rank 0 said so)
EXIT_RANK_FAILED = 4  # this rank could not load or step


class _MlxWork:
    """The follower's MLX thread: load, then apply rank 0's commands in order."""

    def __init__(self, model_path: str, spec: ShardSpec) -> None:
        self.commands: queue.Queue[Message] = queue.Queue()
        self.error: str | None = None
        self.loaded = threading.Event()
        # Set while the ring comes up: its set-up holds the GIL, so nobody beats meanwhile.
        self.joining = threading.Event()
        self._model_path = model_path
        self._spec = spec
        self.thread = threading.Thread(target=self._main, name=f"shard-rank-{spec.rank}", daemon=True)

    def _main(self) -> None:
        mirror: Mirror | None = None
        try:
            self.joining.set()
            group = init_group(self._spec)
            self.joining.clear()
            model, tokenizer, local_layers = load_shard(self._model_path, self._spec, group)
            self.loaded.set()
            log.info("shard.loaded", rank=self._spec.rank, layers=local_layers)
            while True:
                command = self.commands.get()
                if isinstance(command, Close):
                    break
                if isinstance(command, Start):
                    mirror = Mirror(model, tokenizer, command, local_layers)
                    continue
                assert mirror is not None, f"{type(command).__name__} before Start"
                mirror.apply(command)  # type: ignore[arg-type]
        except Exception as exc:  # the ring, the loader and lockstep checks raise many kinds
            self.error = (
                f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            )
            log.error("shard.rank_failed", rank=self._spec.rank, error=self.error)
        finally:
            if mirror is not None and self.error is None:
                mirror.close()
            if "mlx.core" in sys.modules:  # see mlx_thread.py: a thread that ran MLX clears its streams
                import mlx.core as mx

                mx.clear_streams()


def run_follower(model_path: str, spec: ShardSpec, notify: Callable[[str], None] | None = None) -> int:
    """Serve as rank `spec.rank` until closed or a rank is lost; return the exit code. `notify`
    hears "loaded" once the shard is loaded, and the reason just before the end."""
    assert spec.rank > 0, "rank 0 is the ShardedEngine in the worker"
    tell = notify or (lambda _: None)
    link = FollowerLink(spec.control_endpoint, spec.rank)
    link.send(Hello(rank=spec.rank, spec=spec.describe(), pid=os.getpid()))
    work = _MlxWork(model_path, spec)
    interval = beat_interval(spec.loss_timeout)
    started = time.monotonic()
    last_seen: float | None = None
    next_beat = started
    loaded = False
    log.info("shard.follower_started", rank=spec.rank, control=spec.control_endpoint)
    try:
        while True:
            message = link.receive(interval)
            now = time.monotonic()
            if message is not None and last_seen is None:
                # Join the ring once rank 0 is heard from: the ring's set-up blocks this whole
                # process while it waits for peers, so a rank 0 that never comes is noticed first.
                work.thread.start()
            if work.joining.is_set():
                last_seen = now  # nobody can beat while the ring comes up: not a silence
            if not loaded and work.loaded.is_set():
                loaded = True
                tell("loaded")
            if message is not None:
                last_seen = now
                if isinstance(message, Abort):
                    log.error("shard.aborted", rank=spec.rank, reason=message.reason)
                    tell(f"rank 0 aborted the instance: {message.reason}")
                    return EXIT_RANK_LOST
                if not isinstance(message, Beat):
                    work.commands.put(message)
                if isinstance(message, Close):
                    work.thread.join(spec.loss_timeout)  # started: rank 0 was heard from
                    log.info("shard.closed", rank=spec.rank)
                    tell("rank 0 closed the instance")
                    return EXIT_OK if not work.thread.is_alive() else EXIT_RANK_FAILED
            if work.error is not None:
                link.send(Failed(rank=spec.rank, error=work.error))
                tell(f"rank {spec.rank} failed: {work.error}")
                return EXIT_RANK_FAILED
            if now >= next_beat:
                link.send(Beat(rank=spec.rank))
                next_beat = now + interval
            if last_seen is None and now - started > spec.join_timeout:
                log.error("shard.rank_lost", rank=spec.rank, reason="rank 0 never answered")
                tell("rank 0 never answered")
                return EXIT_RANK_LOST
            if last_seen is not None and now - last_seen > spec.loss_timeout:
                reason = f"rank 0 silent for {now - last_seen:.1f} s"
                log.error("shard.rank_lost", rank=spec.rank, reason=reason)
                tell(reason)
                return EXIT_RANK_LOST
    finally:
        link.close()


def follower_main(model_path: str, spec: ShardSpec, notify: Callable[[str], None] | None = None) -> NoReturn:
    """The process of a rank > 0: run, then leave with `os._exit` (see the module docstring)."""
    code = run_follower(model_path, spec, notify)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> NoReturn:
    """`python -m exo_worker.distributed.follower --model PATH --spec JSON`: a rank the worker
    started for the master (exo_worker.rank_process). It prints "loaded" and then the reason it
    ends, one line each, on stdout, and leaves as soon as its stdin closes (the worker is gone),
    or is killed by the kernel if it cannot notice (lifeline.py)."""
    import argparse

    from exo_worker.distributed.lifeline import die_with_parent

    die_with_parent()

    import msgspec

    from protocol.logs import LogFormat, configure_logging

    parser = argparse.ArgumentParser(prog="exo_worker.distributed.follower")
    parser.add_argument("--model", required=True)
    parser.add_argument("--spec", required=True, help="the ShardSpec as JSON")
    parser.add_argument("--log-format", type=LogFormat, default=LogFormat.JSON)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    out = os.fdopen(os.dup(1), "w", buffering=1)  # the lines keep the real stdout; prints go to stderr
    os.dup2(2, 1)
    configure_logging(args.log_format, args.log_level)
    spec = msgspec.json.decode(args.spec, type=ShardSpec)

    def orphaned() -> None:
        sys.stdin.buffer.read()  # returns at EOF: the worker closed it, or died
        log.error("shard.rank_lost", rank=spec.rank, reason="the worker that started this rank is gone")
        sys.stderr.flush()
        os._exit(EXIT_RANK_LOST)

    def notify(line: str) -> None:
        with contextlib.suppress(OSError):
            out.write(line.replace("\n", " ") + "\n")

    threading.Thread(target=orphaned, name="parent-watch", daemon=True).start()
    follower_main(args.model, spec, notify)


if __name__ == "__main__":
    main()
