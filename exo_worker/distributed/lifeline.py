"""A rank process dies with the worker that started it, even while MLX holds the GIL.

A rank notices its worker is gone when its stdin closes, but that takes a Python thread, and MLX
keeps the GIL while it waits in the ring's set-up (and may in a collective on a dead peer): a rank
stuck there would outlive its worker forever (exo #1823's spinning leftovers). So the kernel does
it, with nothing to run in this process:
- Linux: prctl(PR_SET_PDEATHSIG, SIGKILL): the kernel kills this process when its parent exits;
- macOS (no prctl): a small watcher process, forked before MLX is imported (no threads yet), waits
  with kqueue for the worker or the rank to exit, and kills the rank if the worker went first.
Call `die_with_parent()` first thing in a rank process's main.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    parent = os.getppid()
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    elif sys.platform == "darwin":
        _fork_watcher(parent)
    if os.getppid() != parent:  # the worker died before the guard was in place
        os._exit(3)


if sys.platform == "darwin":

    def _fork_watcher(worker: int) -> None:
        rank = os.getpid()
        if os.fork() != 0:
            return  # the rank goes on; the watcher below is its sibling-in-spirit, reaped by init
        try:
            queue = select.kqueue()
            events = [
                select.kevent(pid, select.KQ_FILTER_PROC, select.KQ_EV_ADD, select.KQ_NOTE_EXIT)
                for pid in (worker, rank)
            ]
            fired = queue.control(events, 1, None)  # blocks until one of them exits
            if fired and fired[0].ident == worker:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(rank, signal.SIGKILL)
        except OSError:  # one of them was already gone when the watch began: check by hand
            if not _alive(worker):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(rank, signal.SIGKILL)
        finally:
            os._exit(0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
