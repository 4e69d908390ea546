"""A rank process dies with the worker that started it, even while it is blocked holding the GIL
(as MLX is while its ring comes up): `lifeline.die_with_parent`."""

from __future__ import annotations

import subprocess
import sys

import pytest

from exo_master.devtools.launcher import wait_for
from tests.e2e.test_sharded_by_master import alive

RANK = (
    "import ctypes\n"
    "from exo_worker.distributed.lifeline import die_with_parent\n"
    "die_with_parent()\n"
    "print('guarded', flush=True)\n"
    "ctypes.PyDLL(None).pause()  # blocks with the GIL held: no Python thread can run\n"
)
WORKER = (
    "import ctypes, subprocess, sys\n"
    f"rank = subprocess.Popen([sys.executable, '-c', {RANK!r}], stdout=subprocess.PIPE, text=True)\n"
    "print(rank.pid, rank.stdout.readline().strip(), flush=True)\n"
    "ctypes.PyDLL(None).pause()\n"
)


@pytest.mark.skipif(sys.platform not in ("linux", "darwin"), reason="Linux prctl or macOS kqueue")
def test_a_rank_holding_the_gil_dies_when_its_worker_is_killed() -> None:
    worker = subprocess.Popen([sys.executable, "-c", WORKER], stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout is not None
        pid, state = worker.stdout.readline().split()
        assert state == "guarded"
        assert alive(int(pid))
    finally:
        worker.kill()
        worker.wait()
    wait_for(lambda: not alive(int(pid)), 10, "the rank to die with its worker")
