"""The daemon supervises its loops: one that dies is logged with its cause and the exit code is 1."""

from __future__ import annotations

import asyncio

import pytest
import structlog

from exo_master.core import CoreConfig
from exo_master.devtools.ports import free_cluster_ports
from exo_master.runtime import MasterRuntime
from exo_master.serve import serve


def test_a_loop_that_dies_is_logged_with_its_cause_and_the_master_exits_1(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def broken_ticker(self: MasterRuntime, period: float) -> None:
        raise RuntimeError("the ticker broke")

    monkeypatch.setattr(MasterRuntime, "run_ticker", broken_ticker)
    with structlog.testing.capture_logs() as logs:
        code = asyncio.run(serve(CoreConfig(session="test"), "127.0.0.1", *free_cluster_ports()))
    assert code == 1
    (crash,) = [line for line in logs if line["event"] == "master.task_crashed"]
    assert crash["task"] == "ticker" and "the ticker broke" in crash["error"]
    assert logs[-1]["event"] == "master.stopped"
