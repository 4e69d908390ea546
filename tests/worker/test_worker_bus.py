"""The worker over real ZeroMQ on 127.0.0.1, driven by a fake master bound in the test.

Synchronisation is always on a condition with a deadline: XPUB subscription messages prove the
worker's SUB is connected, a received heartbeat proves its PUB is, and everything else is awaited
as a message (or an asyncio.Event on the bus), never a sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import structlog
import zmq
import zmq.asyncio

from exo_worker.bus import MasterAddress
from exo_worker.sim_engine import SimEngine, sim_prompt, sim_word
from exo_worker.worker import WorkerConfig, WorkerDaemon
from protocol import codec
from protocol.envelope import Envelope, Stamper
from protocol.ids import InstanceId, ModelId, NodeId, TaskId
from protocol.messages import (
    AssignTask,
    CancelTask,
    ChatMessage,
    FinishReason,
    InstanceStatus,
    MasterHeartbeat,
    Message,
    TaskAccepted,
    TaskChunk,
    TaskFailed,
    TaskFinished,
    TextGenerationParams,
    WorkerHeartbeat,
    WorkerMessage,
)

NODE = NodeId("bus-node")
INSTANCE = InstanceId(f"{NODE}/0")
MODEL = ModelId("sim-model")
INTERVAL = 0.1
TIMEOUT = 10.0
REPO = Path(__file__).resolve().parents[2]


class FakeMaster:
    """XPUB + SUB bound like the real master; sends heartbeats; records what workers publish."""

    def __init__(self, port: int | None = None, interval: float = INTERVAL) -> None:
        self.ctx = zmq.asyncio.Context()
        self.session = uuid.uuid4().hex[:8]
        self.stamper = Stamper(origin="master")
        self.interval = interval
        self.received: list[WorkerMessage] = []
        self.xpub, self.sub, self.port = self._bind(port)
        self._subscriptions: set[bytes] = set()
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat())

    def _bind(self, port: int | None) -> tuple[zmq.asyncio.Socket, zmq.asyncio.Socket, int]:
        for _ in range(50):
            xpub, sub = self.ctx.socket(zmq.XPUB), self.ctx.socket(zmq.SUB)
            for sock in (xpub, sub):
                sock.setsockopt(zmq.LINGER, 0)
            try:
                if port is None:
                    chosen = xpub.bind_to_random_port("tcp://127.0.0.1", min_port=20000, max_port=60000)
                else:
                    chosen = port
                    xpub.bind(f"tcp://127.0.0.1:{chosen}")
                sub.bind(f"tcp://127.0.0.1:{chosen + 1}")
            except zmq.ZMQError:
                xpub.close()
                sub.close()
                if port is not None:
                    raise
                continue
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            return xpub, sub, chosen
        raise RuntimeError("no free pair of ports")

    @property
    def address(self) -> MasterAddress:
        return MasterAddress(host="127.0.0.1", port=self.port)

    async def _beat(self) -> None:
        while True:
            self.send(codec.BROADCAST_TOPIC, MasterHeartbeat(session=self.session, interval=self.interval))
            await asyncio.sleep(self.interval)  # wait-ok: the fake master's heartbeat period

    def send(self, topic: bytes, body: Message) -> None:
        self.send_envelope(topic, self.stamper.stamp(body, 0.0))

    def send_envelope(self, topic: bytes, envelope: Envelope) -> None:
        self.xpub.send_multipart(codec.encode_frames(topic, envelope))

    def assign(self, task: AssignTask) -> None:
        self.send(codec.node_topic(task.node_id), task)

    async def subscribed(self, topic: bytes, timeout: float = TIMEOUT) -> None:
        """Wait until a worker's SUB subscribed to `topic` (XPUB reports it): no slow-joiner loss."""
        async with asyncio.timeout(timeout):
            while topic not in self._subscriptions:
                frame = await self.xpub.recv()
                if frame[:1] == b"\x01":
                    self._subscriptions.add(bytes(frame[1:]))

    async def expect(
        self, predicate: Callable[[WorkerMessage], bool], timeout: float = TIMEOUT, start: int = 0
    ) -> WorkerMessage:
        """Return the first message (at index >= start) matching; receive more until the deadline."""
        for body in self.received[start:]:
            if predicate(body):
                return body
        async with asyncio.timeout(timeout):
            while True:
                _, envelope = codec.decode_frames(await self.sub.recv_multipart())
                message = envelope.body
                assert isinstance(
                    message, WorkerHeartbeat | TaskAccepted | TaskChunk | TaskFinished | TaskFailed
                )
                self.received.append(message)
                if predicate(message):
                    return message

    async def heartbeat(
        self, predicate: Callable[[WorkerHeartbeat], bool] = lambda hb: True
    ) -> WorkerHeartbeat:
        start = len(self.received)  # a fresh one, not an old snapshot
        body = await self.expect(lambda b: isinstance(b, WorkerHeartbeat) and predicate(b), start=start)
        assert isinstance(body, WorkerHeartbeat)
        return body

    async def connected(self, node: NodeId = NODE) -> WorkerHeartbeat:
        """Both directions live: subscription seen and a heartbeat echoing this session received."""
        await self.subscribed(codec.node_topic(node))
        return await self.heartbeat(lambda hb: hb.node_id == node and hb.master_session == self.session)

    def of(self, task_id: str, kind: type) -> list[Any]:
        return [b for b in self.received if isinstance(b, kind) and getattr(b, "task_id", None) == task_id]

    def close(self) -> None:
        if self.ctx.closed:
            return
        self._heartbeat.cancel()
        self.xpub.close(linger=0)
        self.sub.close(linger=0)
        self.ctx.term()  # releases the ports before a "restarted" master binds them again


def assign(task_id: str, max_tokens: int = 5, instance: str = INSTANCE, seed: int = 1) -> AssignTask:
    params = TextGenerationParams(
        model=MODEL,
        messages=(ChatMessage(role="user", content=f"prompt {task_id}"),),
        max_tokens=max_tokens,
        seed=seed,
    )
    return AssignTask(task_id=TaskId(task_id), node_id=NODE, instance_id=InstanceId(instance), params=params)


@contextlib.asynccontextmanager
async def running_worker(
    master: FakeMaster, tokens_per_s: float = math.inf, instances: int = 1, accept_delay: float = 0.0
) -> AsyncIterator[WorkerDaemon]:
    config = WorkerConfig(
        node_id=NODE,
        master=master.address,
        model=MODEL,
        instances=instances,
        max_concurrency=4,
        heartbeat_interval=INTERVAL,
        heartbeat_liveness=3,
        backoff_initial=0.05,
        backoff_max=0.2,
        accept_delay=accept_delay,
    )
    daemon = WorkerDaemon(config, lambda _instance: SimEngine(tokens_per_s))
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        await asyncio.wait_for(daemon.ready.wait(), TIMEOUT)
        yield daemon
    finally:
        stop.set()
        assert await asyncio.wait_for(task, TIMEOUT) == 0


def arun(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    def wrapper() -> None:
        asyncio.run(asyncio.wait_for(test(), timeout=60))

    wrapper.__name__ = test.__name__
    return wrapper


def is_final(task_id: str) -> Callable[[WorkerMessage], bool]:
    return lambda b: isinstance(b, TaskFinished | TaskFailed) and b.task_id == task_id


def is_chunk(task_id: str, min_index: int = 0) -> Callable[[WorkerMessage], bool]:
    return lambda b: isinstance(b, TaskChunk) and b.task_id == task_id and b.index >= min_index


# ---- in-process worker -----------------------------------------------------------------------


@arun
async def test_heartbeat_carries_full_snapshot_and_session() -> None:
    master = FakeMaster()
    try:
        async with running_worker(master, instances=2):
            hb = await master.connected()
            assert [i.instance_id for i in hb.instances] == [f"{NODE}/0", f"{NODE}/1"]
            for report in hb.instances:
                assert report.status is InstanceStatus.READY
                assert report.model == MODEL
                assert report.max_concurrency == 4
                assert report.active_tasks == ()
    finally:
        master.close()


@arun
async def test_assignment_accepted_streams_contiguous_chunks_and_finishes() -> None:
    master = FakeMaster()
    try:
        async with running_worker(master):
            await master.connected()
            task = assign("t1", max_tokens=8)
            master.assign(task)
            final = await master.expect(is_final("t1"))
            assert isinstance(final, TaskFinished)
            assert final.finish_reason is FinishReason.LENGTH
            assert final.usage.completion_tokens == 8
            accepted = master.of("t1", TaskAccepted)
            assert accepted and accepted[0].instance_id == INSTANCE
            chunks = master.of("t1", TaskChunk)
            assert [c.index for c in chunks] == list(range(8))
            words = [sim_word("", sim_prompt(task.params), 1, i) for i in range(8)]  # type: ignore[arg-type]
            assert "".join(c.text for c in chunks) == " ".join(words)
            # Ordering on one PUB connection: accepted before the first chunk, final after the last.
            order = [b for b in master.received if getattr(b, "task_id", None) == "t1"]
            assert isinstance(order[0], TaskAccepted) and isinstance(order[-1], TaskFinished)
    finally:
        master.close()


@arun
async def test_cancel_ends_a_running_task_cancelled() -> None:
    master = FakeMaster()
    try:
        async with running_worker(master, tokens_per_s=200.0):
            await master.connected()
            master.assign(assign("long", max_tokens=100_000))
            await master.expect(is_chunk("long"))
            hb = await master.heartbeat()
            assert hb.instances[0].active_tasks == ("long",)
            master.send(
                codec.node_topic(NODE), CancelTask(task_id=TaskId("long"), node_id=NODE, instance_id=INSTANCE)
            )
            final = await master.expect(is_final("long"))
            assert isinstance(final, TaskFinished) and final.finish_reason is FinishReason.CANCELLED
            hb = await master.heartbeat()
            assert hb.instances[0].active_tasks == ()
    finally:
        master.close()


@arun
async def test_duplicate_assign_is_idempotent() -> None:
    master = FakeMaster()
    try:
        async with running_worker(master, tokens_per_s=200.0):
            await master.connected()
            task = assign("dup", max_tokens=20)
            master.assign(task)
            await master.expect(is_chunk("dup"))
            master.assign(task)  # while running: accepted again, not run twice
            await master.expect(lambda b: len(master.of("dup", TaskAccepted)) == 2)
            first = await master.expect(is_final("dup"))
            master.assign(task)  # after the end: the same final again
            await master.expect(lambda b: len(master.of("dup", TaskFinished)) == 2)
            assert master.of("dup", TaskFinished) == [first, first]
            assert [c.index for c in master.of("dup", TaskChunk)] == list(range(20))
    finally:
        master.close()


@arun
async def test_unknown_instance_fails_clearly() -> None:
    master = FakeMaster()
    try:
        async with running_worker(master):
            await master.connected()
            master.assign(assign("lost", instance=f"{NODE}/7"))
            final = await master.expect(is_final("lost"))
            assert isinstance(final, TaskFailed) and "unknown instance" in final.reason
    finally:
        master.close()


@arun
async def test_master_loss_then_reconnect_on_same_ports_keeps_tasks_running() -> None:
    master = FakeMaster()
    port = master.port
    replacement: FakeMaster | None = None
    try:
        async with running_worker(master, tokens_per_s=100.0) as daemon:
            await master.connected()
            master.assign(assign("survivor", max_tokens=100_000))
            await master.expect(is_chunk("survivor"))
            master.close()
            await asyncio.wait_for(daemon.bus.master_lost.wait(), TIMEOUT)
            assert not daemon.bus.master_alive.is_set()

            replacement = FakeMaster(port=port)  # a restarted master: same ports, new session
            hb = await replacement.connected()
            assert hb.master_session == replacement.session != master.session
            assert hb.instances[0].active_tasks == ("survivor",)  # the task kept running
            last_index = max(c.index for c in master.of("survivor", TaskChunk))
            chunk = await replacement.expect(is_chunk("survivor", min_index=last_index + 1))
            assert isinstance(chunk, TaskChunk)
            assert daemon.bus.stats.master_losses >= 1 and daemon.bus.stats.reconnects >= 1
            assert daemon.bus.master_alive.is_set()

            replacement.send(
                codec.node_topic(NODE),
                CancelTask(task_id=TaskId("survivor"), node_id=NODE, instance_id=INSTANCE),
            )
            final = await replacement.expect(is_final("survivor"))
            assert isinstance(final, TaskFinished) and final.finish_reason is FinishReason.CANCELLED
    finally:
        master.close()
        if replacement is not None:
            replacement.close()


@arun
async def test_malformed_frames_are_counted_and_dropped() -> None:
    master = FakeMaster()
    try:
        async with running_worker(master) as daemon:
            await master.connected()
            topic = codec.node_topic(NODE)
            bogus = Stamper("master-imposter").stamp(
                TaskAccepted(node_id=NODE, task_id=TaskId("x"), instance_id=INSTANCE), 0.0
            )
            master.xpub.send_multipart([topic, b"\xc1 not msgpack"])
            master.xpub.send_multipart([topic])
            master.xpub.send_multipart([codec.BROADCAST_TOPIC, b"a", b"b"])
            master.xpub.send_multipart([topic, b"\x81\xa4type\xa7Nothing"])
            master.send_envelope(topic, bogus)  # decodable, but a worker -> master message
            master.assign(assign("after", max_tokens=2))
            final = await master.expect(is_final("after"))
            assert isinstance(final, TaskFinished)
            # One PUB -> SUB connection keeps order: everything bad was handled before the assign.
            assert daemon.bus.stats.malformed == 5
            await master.heartbeat()  # and the worker is still heartbeating
    finally:
        master.close()


@arun
async def test_sequence_gaps_are_counted() -> None:
    master = FakeMaster()
    try:
        async with running_worker(master) as daemon:
            await master.connected()
            for _ in range(4):
                master.stamper.stamp(MasterHeartbeat(session=master.session), 0.0)  # "lost" messages
            master.assign(assign("gap", max_tokens=1))
            await master.expect(is_final("gap"))
            assert daemon.bus.stats.gaps >= 4
            assert daemon.bus.tracker.gaps.get("master", 0) >= 4
    finally:
        master.close()


@arun
async def test_accept_delay_holds_commands_in_order() -> None:
    master = FakeMaster()
    try:
        async with running_worker(master, tokens_per_s=100.0, accept_delay=0.3):
            await master.connected()
            loop = asyncio.get_running_loop()
            sent_at = loop.time()
            master.assign(assign("slow", max_tokens=1_000))
            master.send(
                codec.node_topic(NODE), CancelTask(task_id=TaskId("slow"), node_id=NODE, instance_id=INSTANCE)
            )
            await master.expect(lambda b: isinstance(b, TaskAccepted) and b.task_id == "slow")
            assert loop.time() - sent_at >= 0.3  # confirmation came late, as configured
            final = await master.expect(is_final("slow"))  # and the cancel still followed its assignment
            assert isinstance(final, TaskFinished) and final.finish_reason is FinishReason.CANCELLED
    finally:
        master.close()


@arun
async def test_model_load_error_reports_failed_instance_and_exits_2() -> None:
    master = FakeMaster()
    try:
        config = WorkerConfig(node_id=NODE, master=master.address, model=MODEL, heartbeat_interval=INTERVAL)
        daemon = WorkerDaemon(
            config, lambda _instance: SimEngine(math.inf, load_delay_s=1.0, load_error="bad weights")
        )
        run = asyncio.create_task(daemon.run(asyncio.Event()))
        try:
            await master.subscribed(codec.node_topic(NODE))
            # Heartbeats flow while the instance loads, then one reports the failure.
            await master.heartbeat(lambda hb: hb.instances[0].status is InstanceStatus.LOADING)
            failed = await master.heartbeat(lambda hb: hb.instances[0].status is InstanceStatus.FAILED)
            assert failed.instances[0].error == "bad weights"
            assert await asyncio.wait_for(run, TIMEOUT) == 2
            assert not daemon.ready.is_set()
        finally:
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
    finally:
        master.close()


# ---- the real command line, as a subprocess --------------------------------------------------


async def _read_json_line(stream: asyncio.StreamReader, event: str, timeout: float) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            line = await stream.readline()
            if not line:
                raise AssertionError(f"stream ended before {event!r}")
            with contextlib.suppress(json.JSONDecodeError):
                record = json.loads(line)
                if record.get("event") == event:
                    return dict(record)


async def _spawn(*args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "exo_worker.daemon",
        *args,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)


@arun
async def test_subprocess_worker_serves_and_exits_cleanly_on_sigterm() -> None:
    master = FakeMaster()
    proc = await _spawn(
        "--log-format",
        "json",
        env={
            "EXO_MASTER": f"127.0.0.1:{master.port}",  # options also come from the environment
            "EXO_NODE_ID": NODE,
            "EXO_MODEL": "sim-model",  # without a model a worker loads only what the master places
            "EXO_INSTANCES": "2",
            "EXO_HEARTBEAT_INTERVAL": str(INTERVAL),
            "EXO_SIM_TOKENS_PER_S": "1000",
        },
    )
    try:
        assert proc.stderr is not None
        ready = await _read_json_line(proc.stderr, "worker.ready", TIMEOUT)
        assert ready["node_id"] == NODE
        assert ready["instances"] == [f"{NODE}/0", f"{NODE}/1"]
        assert ready["master"] == f"127.0.0.1:{master.port}"
        hb = await master.connected()
        assert len(hb.instances) == 2
        master.assign(assign("sub", max_tokens=3, instance=f"{NODE}/1"))
        final = await master.expect(is_final("sub"))
        assert isinstance(final, TaskFinished) and final.instance_id == f"{NODE}/1"
        master.assign(assign("busy", max_tokens=1_000_000))
        await master.expect(is_chunk("busy"))

        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), TIMEOUT) == 0
        # Shutdown cancels running tasks and (linger permitting) tells the master.
        cancelled = await master.expect(is_final("busy"))
        assert isinstance(cancelled, TaskFinished) and cancelled.finish_reason is FinishReason.CANCELLED
    finally:
        _kill(proc)
        await proc.wait()
        master.close()


@arun
async def test_subprocess_sigint_before_master_exists_exits_zero() -> None:
    proc = await _spawn("--master", "127.0.0.1:1", "--log-format", "json", "--node-id", "lonely")
    try:
        assert proc.stderr is not None
        await _read_json_line(proc.stderr, "worker.ready", TIMEOUT)
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), TIMEOUT) == 0
    finally:
        _kill(proc)
        await proc.wait()


@arun
async def test_subprocess_model_load_error_is_one_line_and_exit_2() -> None:
    proc = await _spawn(
        "--master",
        "127.0.0.1:1",
        "--engine",
        "mlx",
        "--model",
        "/nonexistent/model-dir",
        "--log-format",
        "json",
    )
    try:
        assert proc.stderr is not None
        stderr = await asyncio.wait_for(proc.stderr.read(), 120)
        assert await asyncio.wait_for(proc.wait(), TIMEOUT) == 2
        text = stderr.decode()
        assert "Traceback" not in text
        errors = [json.loads(line) for line in text.splitlines() if '"level": "error"' in line]
        assert len(errors) == 1 and errors[0]["event"] == "worker.model_load_failed"
    finally:
        _kill(proc)
        await proc.wait()


@pytest.mark.parametrize(
    "args",
    [
        ["--master", "nohost"],
        ["--master", "host:0"],
        ["--master", "host:65535"],
        ["--master", ":123"],
        ["--master", "host:port"],
        ["--master", "host:5000", "--node-id", "a/b"],
        ["--master", "host:5000", "--heartbeat-interval", "0"],
        ["--master", "host:5000", "--prompt-cache-bytes", "-1"],
        ["--master", "host:5000", "--prompt-cache-bytes", "lots"],
        ["--master", "host:5000", "--ring-ports", "52699-52600"],
        ["--master", "host:5000", "--ring-ports", "52600"],
        ["--master", "host:5000", "--ring-host", "a b"],
    ],
)
def test_bad_arguments_are_usage_errors(args: list[str]) -> None:
    from typer.testing import CliRunner

    from exo_worker.daemon import app

    saved = structlog.get_config()
    try:
        result = CliRunner().invoke(app, args)
    finally:
        # Never leave structlog printing to CliRunner's (closed) capture stream for later tests.
        structlog.configure(**saved)
    assert result.exit_code == 2, result.output
