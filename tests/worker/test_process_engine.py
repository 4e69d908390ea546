"""The worker's rank processes with stand-ins for the real ones. The ProcessEngine against a fake
rank-0 child (tests/support/fake_rank0.py): text and counters through the frames, cancels reaching
the child, and every way the child can break (a lost rank, kill -9, a failed load, a broken frame,
a child that ignores Close) ending as a clean INSTANCE_LOST failure or a load error, with the child
reaped. A FollowerRank reports loading, ready, then failed with the follower's own reason."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from exo_worker.distributed.frames import MAX_FRAME, FrameError, Loaded, Text, encode, from_child, read_body
from exo_worker.distributed.frames import decode as decode_frame
from exo_worker.distributed.topology import ShardSpec
from exo_worker.engine import EngineError, InstanceLost, ModelLoadError
from exo_worker.process_engine import ProcessEngine
from exo_worker.runner import Runner
from exo_worker.shard_ranks import FollowerRank, ShardLauncher
from protocol.ids import InstanceId, ModelId, NodeId
from protocol.messages import (
    INSTANCE_LOST,
    ChatMessage,
    FinishReason,
    InstanceStatus,
    LoadInstance,
    TextGenerationParams,
)
from protocol.sharding import ShardAssignment, Sharding
from tests.worker.runner_harness import arun

FAKE = [sys.executable, str(Path(__file__).parent.parent / "support" / "fake_rank0.py")]
SPEC = ShardSpec(rank=0, hosts=("127.0.0.1:1", "127.0.0.1:2"), sharding=Sharding.PIPELINE)


def engine(model: str = "fake", close_grace: float = 3.0) -> ProcessEngine:
    return ProcessEngine(model, SPEC, command=FAKE, close_grace=close_grace)


def params(text: str) -> TextGenerationParams:
    return TextGenerationParams(model=ModelId("m"), messages=(ChatMessage(role="user", content=text),))


async def until(condition: object, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)  # wait-ok: polling a condition with a deadline


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def reaped(e: ProcessEngine) -> None:
    assert await asyncio.to_thread(e.exited.wait, 10), "the child was not reaped"
    assert e.pid is not None and not alive(e.pid)


@arun
async def test_a_run_streams_its_text_and_the_counters_reach_the_runner() -> None:
    e = engine()
    runner = Runner(
        node_id=NodeId("n"), instance_id=InstanceId("g"), model=ModelId("m"), engine=e, send=print
    )
    await runner.load()
    report = runner.report()
    assert (report.status, report.progress, report.context_length) == (InstanceStatus.READY, 1.0, 123)
    assert report.work is not None and report.work.decoding == 1
    assert report.prompt_cache is not None and report.prompt_cache.budget_bytes == 1000
    pieces: list[str] = []
    outcome = await e.run(params("echo the capital is Paris"), pieces.append, threading.Event())
    assert pieces == ["the", "capital", "is", "Paris"]
    assert (outcome.finish_reason, outcome.usage.completion_tokens) == (FinishReason.STOP, 4)
    e.close()
    await reaped(e)
    assert e.failure is None  # closed on purpose: not a failure
    with pytest.raises(EngineError):
        await e.run(params("echo late"), pieces.append, threading.Event())


@arun
async def test_a_cancel_reaches_the_child() -> None:
    e = engine()
    await e.load()
    cancel = threading.Event()
    asyncio.get_running_loop().call_later(0.1, cancel.set)
    outcome = await e.run(params("hang"), print, cancel)
    assert outcome.finish_reason is FinishReason.CANCELLED
    e.close()
    await reaped(e)


@arun
async def test_a_lost_rank_fails_every_run_in_flight_and_later_and_the_instance() -> None:
    e = engine()
    runner = Runner(
        node_id=NodeId("n"),
        instance_id=InstanceId("g"),
        model=ModelId("m"),
        engine=e,
        send=print,
        memory_bytes=1000,
    )
    await runner.load()
    assert runner.report().memory_bytes == 1000
    in_flight = asyncio.ensure_future(e.run(params("hang"), print, threading.Event()))
    await asyncio.sleep(0)  # wait-ok: one loop turn, so the first run is sent before the loss
    with pytest.raises(InstanceLost) as lost:
        await e.run(params("lose"), print, threading.Event())
    assert lost.value.code == INSTANCE_LOST and "rank 1 silent for 3.0 s" in str(lost.value)
    with pytest.raises(InstanceLost):
        await in_flight
    with pytest.raises(InstanceLost):
        await e.run(params("echo again"), print, threading.Event())
    report = runner.report()
    assert report.status is InstanceStatus.FAILED
    assert report.error == "sharded instance lost a rank: rank 1 silent for 3.0 s"
    assert report.memory_bytes == 0
    await reaped(e)


@arun
async def test_a_killed_child_is_a_lost_instance() -> None:
    e = engine()
    await e.load()
    in_flight = asyncio.ensure_future(e.run(params("hang"), print, threading.Event()))
    assert e.pid is not None
    os.kill(e.pid, signal.SIGKILL)
    with pytest.raises(InstanceLost) as lost:
        await in_flight
    assert lost.value.code == INSTANCE_LOST
    assert str(lost.value) == "the rank-0 process was killed by signal 9"
    assert e.failure == str(lost.value)
    await reaped(e)


@arun
async def test_a_failed_load_is_a_model_load_error_and_the_child_is_gone() -> None:
    e = engine("fail-load")
    with pytest.raises(ModelLoadError, match="no weights"):
        await e.load()
    await reaped(e)


@arun
async def test_a_broken_frame_ends_the_link_and_the_child() -> None:
    e = engine()
    await e.load()
    with pytest.raises(InstanceLost, match="not ours"):
        await e.run(params("garbage"), print, threading.Event())
    await reaped(e)


@arun
async def test_a_child_that_ignores_close_is_killed_by_pid() -> None:
    e = engine("stubborn", close_grace=0.3)
    await e.load()
    e.close()
    await reaped(e)


@arun
async def test_an_unload_while_loading_kills_the_child() -> None:
    e = engine("silent", close_grace=0.3)
    loading = asyncio.ensure_future(e.load())
    await until(lambda: e.pid is not None)
    loading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await loading
    await reaped(e)


def test_frames_round_trip_and_oversized_or_cut_frames_are_refused() -> None:
    stream = io.BytesIO(encode(Text(run=1, text="hé")) + encode(Loaded()))
    assert decode_frame(from_child, read_body(stream) or b"") == Text(run=1, text="hé")
    assert decode_frame(from_child, read_body(stream) or b"") == Loaded()
    assert read_body(stream) is None  # a clean end
    with pytest.raises(FrameError, match="exceeds"):
        read_body(io.BytesIO((MAX_FRAME + 1).to_bytes(4, "big")))
    with pytest.raises(FrameError, match="inside a frame"):
        read_body(io.BytesIO(encode(Loaded())[:-1]))
    with pytest.raises(FrameError, match="not ours"):
        decode_frame(from_child, b"\x93abc")


def follower(script: str) -> tuple[FollowerRank, ShardLauncher]:
    shard = ShardAssignment(
        group="g",
        rank=1,
        hosts=("127.0.0.1:1", "127.0.0.1:2"),
        sharding=Sharding.TENSOR,
        control="127.0.0.1:3",
    )
    cmd = LoadInstance(
        node_id=NodeId("n"), instance_id=InstanceId("g.1"), model=ModelId("m"), placement="p", shard=shard
    )
    launcher = ShardLauncher(follower_command=(sys.executable, "-c", script), stop_grace=0.5)
    return FollowerRank(NodeId("n"), cmd, launcher.stop_grace), launcher


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (3, "rank lost: rank 0 silent for 3.0 s"),
        (4, "rank failed: rank 0 silent for 3.0 s"),
        (0, "rank ended: rank 0 silent for 3.0 s"),
        (7, "the rank process exited with code 7: rank 0 silent for 3.0 s"),
    ],
)
def test_a_follower_reports_ready_then_failed_with_its_reason(code: int, error: str) -> None:
    script = (
        "import sys; print('loaded', flush=True); sys.stdin.readline(); "
        f"print('rank 0 silent for 3.0 s'); sys.exit({code})"
    )
    rank, launcher = follower(script)
    rank.start(launcher.follower_argv("/models/m", rank.shard))
    assert rank.report().status in (InstanceStatus.LOADING, InstanceStatus.READY)
    deadline = time.monotonic() + 10
    while rank.report().status is not InstanceStatus.READY:
        assert time.monotonic() < deadline, "never ready"
        time.sleep(0.01)  # wait-ok: polling a condition with a deadline
    assert rank._proc is not None and rank._proc.stdin is not None
    rank._proc.stdin.write(b"go\n")
    rank._proc.stdin.flush()
    assert rank.exited.wait(10)
    report = rank.report()
    assert (report.status, report.error, report.memory_bytes) == (InstanceStatus.FAILED, error, 0)
    assert report.shard == rank.shard and not report.takes_tasks


@arun
async def test_a_follower_that_ignores_sigterm_is_killed() -> None:
    rank, launcher = follower(
        "import signal, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('loaded', flush=True); sys.stdin.read()"
    )
    rank.start(launcher.follower_argv("/models/m", rank.shard))
    await until(lambda: rank.status is InstanceStatus.READY)
    await rank.stop()
    assert rank.exited.is_set() and rank.exit_code == -signal.SIGKILL
    assert rank.status is InstanceStatus.READY  # stopped on purpose: not a failure
