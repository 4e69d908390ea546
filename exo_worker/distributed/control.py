"""The control channel between the ranks of a sharded instance: ZeroMQ, with heartbeats.

Why ZeroMQ and not a broadcast over the MLX group:
- an MLX collective has no timeout. A follower waiting in a broadcast for rank 0's next decision
  would sit inside a collective whenever the instance is idle, and could neither notice that rank
  0 died nor be told to stop: exactly the state of exo #1823 (both Macs spinning, no inference).
  With ZeroMQ a follower enters a collective only when rank 0 has told it to take a step, so every
  collective it runs is one rank 0 is running too;
- a ZeroMQ poll has a deadline, so heartbeats both ways tell every rank within `loss_timeout` that
  another rank is gone, even when a collective is stuck (then the process is left by `os._exit`;
  the thread in the collective is abandoned with it);
- commands are variable-sized (prompts of any length); a broadcast over the group would need fixed
  shapes, or a size exchange first, for every decision.

Layout: rank 0 binds a ROUTER socket on the control endpoint; each follower connects a DEALER, says
`Hello` (its rank and what it was told: sharding, hosts, split), gets `Start` (the batch settings
every rank must share) and from then on receives commands in order. Beats go both ways every
tenth of the loss timeout; any message counts as a sign of life. rank 0's socket belongs to the
`Leader` thread; other threads hand it messages over an inproc PUSH/PULL pair.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

import msgspec
import structlog
import zmq

log = structlog.get_logger(__name__)


# ---- messages (tagged msgpack structs) ----------------------------------------------------------


class Hello(msgspec.Struct, frozen=True, tag="hello"):
    rank: int
    spec: dict[str, Any]  # ShardSpec.describe()
    pid: int = 0


class Start(msgspec.Struct, frozen=True, tag="start"):
    """The batch settings every rank must share: its BatchGenerator's, and the prompt-cache budget."""

    max_batch: int
    cache_bytes_per_layer: int
    # rank 0's BatchGenerator settings (0 / None: the library's default), so a follower's generator
    # prefills in the same chunks and batches as rank 0's whatever rank 0's scheduler chose.
    completion_batch_size: int = 0
    prefill_batch_size: int = 0
    prefill_step_size: int = 0
    max_kv_size: int | None = None


class Beat(msgspec.Struct, frozen=True, tag="beat"):
    rank: int


class Insert(msgspec.Struct, frozen=True, tag="insert"):
    uid: int
    prompt: list[int]  # the whole prompt; the first `reused` tokens come from the prompt cache
    reused: int
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None


class Step(msgspec.Struct, frozen=True, tag="step"):
    # Prompt tokens per prefill chunk in this step (rank 0 sizes chunks step by step: every rank
    # must cut the prompts alike to enter the same collectives); 0 keeps the follower's setting.
    prefill_step_size: int = 0


class Remove(msgspec.Struct, frozen=True, tag="remove"):
    uids: list[int]
    keep_cache: bool


class CacheInsert(msgspec.Struct, frozen=True, tag="cache_insert"):
    tokens: list[int]


class Reset(msgspec.Struct, frozen=True, tag="reset"):
    pass


class Warmup(msgspec.Struct, frozen=True, tag="warmup"):
    pass


class Close(msgspec.Struct, frozen=True, tag="close"):
    pass


class Abort(msgspec.Struct, frozen=True, tag="abort"):
    reason: str


class Failed(msgspec.Struct, frozen=True, tag="failed"):
    rank: int
    error: str


Command = Insert | Step | Remove | CacheInsert | Reset | Warmup
Message = (
    Hello | Start | Beat | Insert | Step | Remove | CacheInsert | Reset | Warmup | Close | Abort | Failed
)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


def decode(frame: bytes) -> Message:
    """A control message; msgspec.DecodeError (a ValidationError is one) when the frame is not one."""
    return _decoder.decode(frame)


def beat_interval(loss_timeout: float) -> float:
    return max(0.05, loss_timeout / 10)


# ---- rank 0 ------------------------------------------------------------------------------------


class Leader:
    """rank 0's end: one thread owns the ROUTER socket, sends commands in order, watches followers.

    `on_lost(reason)` is called once, on the leader thread, when a follower stops beating, reports a
    failure, or cannot be sent to; every other follower is then told to abort.
    """

    def __init__(
        self, endpoint: str, ranks: int, loss_timeout: float, on_lost: Callable[[str], None]
    ) -> None:
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unknown or gone peer raises, never drops
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.bind(endpoint)
        self._inbox_address = f"inproc://exo-shard-leader-{id(self)}"
        self._inbox = self._ctx.socket(zmq.PULL)
        self._inbox.bind(self._inbox_address)
        self._outbox = self._ctx.socket(zmq.PUSH)
        self._outbox.connect(self._inbox_address)
        self._outbox_lock = threading.Lock()
        self._ranks = ranks
        self._timeout = loss_timeout
        self._on_lost = on_lost
        self._peers: dict[int, bytes] = {}  # rank -> ROUTER identity
        self._hellos: dict[int, Hello] = {}
        self._last_seen: dict[int, float] = {}
        self._joined = threading.Condition()
        self._started = False
        self._lost: str | None = None
        self._stop = threading.Event()
        self._flushed = threading.Event()
        self._joining = False  # between flush() and refresh(): the ring comes up, nobody beats
        self._thread = threading.Thread(target=self._main, name="shard-leader", daemon=True)
        self._thread.start()

    @property
    def lost(self) -> str | None:
        return self._lost

    def wait_for_followers(self, timeout: float) -> dict[int, Hello]:
        """Every follower's Hello; TimeoutError naming the missing ranks when they are not all in."""
        deadline = time.monotonic() + timeout
        with self._joined:
            while len(self._hellos) < self._ranks - 1 and self._lost is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(set(range(1, self._ranks)) - set(self._hellos))
                    raise TimeoutError(f"ranks {missing} did not join within {timeout:.0f} s")
                self._joined.wait(left)
            if self._lost is not None:
                raise RuntimeError(self._lost)
            return dict(self._hellos)

    def send(self, message: Message) -> None:
        """Broadcast to every follower, in order with every earlier send (any thread)."""
        with self._outbox_lock:
            if not self._outbox.closed:
                self._outbox.send(encode(message))

    def flush(self, timeout: float) -> bool:
        """A beat to every follower, returning once the leader thread has handed it to ZeroMQ (whose
        I/O thread sends it whatever Python does next): call it before joining the ring. MLX's ring
        set-up holds the GIL until the ring is up, so this process sends nothing meanwhile, and a
        follower joins the ring only once it has heard from rank 0. False: not within `timeout`."""
        self._joining = True
        self._flushed.clear()
        self.send(Beat(rank=0))
        return self._flushed.wait(timeout)

    def refresh(self) -> None:
        """Count every follower as heard from now: after the ring's set-up, during which no process
        could beat (it holds the GIL), a long set-up is not a silent rank."""
        now = time.monotonic()
        for rank in list(self._last_seen):
            self._last_seen[rank] = now
        self._joining = False

    def lose(self, reason: str) -> None:
        """Declare the instance lost from outside (a failed step): same as a silent follower."""
        self.send(Abort(reason=f"lost: {reason}"))

    def close(self, timeout: float = 2.0) -> None:
        """Tell the followers to close, then stop the thread."""
        self.send(Close())
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        with self._outbox_lock:
            self._outbox.close(linger=0)

    # ---- the leader thread ---------------------------------------------------------------------

    def _main(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._inbox, zmq.POLLIN)
        interval = beat_interval(self._timeout)
        next_beat = time.monotonic()
        try:
            while True:
                events = dict(poller.poll(timeout=int(interval * 1000)))
                if self._router in events:
                    self._receive()
                if self._inbox in events or self._stop.is_set():  # at the stop: what was sent before it
                    self._drain_inbox()
                if self._stop.is_set():
                    break
                now = time.monotonic()
                if now >= next_beat:
                    self._forward(encode(Beat(rank=0)))
                    next_beat = now + interval
                self._check_liveness(now)
        finally:
            self._router.close(linger=500)  # a last Close / Abort gets its chance to leave
            self._inbox.close(linger=0)

    def _drain_inbox(self) -> None:
        while True:
            try:
                frame = self._inbox.recv(zmq.NOBLOCK)
            except zmq.Again:
                self._flushed.set()
                return
            self._forward(frame)

    def _receive(self) -> None:
        while True:
            try:
                identity, frame = self._router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:  # not two frames: not one of ours
                continue
            try:
                message = decode(frame)
            except msgspec.DecodeError:
                log.warning("shard.bad_control_frame", size=len(frame))
                continue
            if isinstance(message, Hello):
                self._hello(identity, message)
            elif isinstance(message, Beat) and self._peers.get(message.rank) == identity:
                self._last_seen[message.rank] = time.monotonic()
            elif isinstance(message, Failed):
                self._declare_lost(f"rank {message.rank} failed: {message.error}")

    def _hello(self, identity: bytes, hello: Hello) -> None:
        if not 0 < hello.rank < self._ranks or self._started:
            log.warning("shard.unexpected_hello", rank=hello.rank, started=self._started)
            with contextlib.suppress(zmq.ZMQError):
                self._router.send_multipart([identity, encode(Abort(reason="unexpected rank"))])
            return
        self._peers[hello.rank] = identity
        self._last_seen[hello.rank] = time.monotonic()
        with self._joined:
            self._hellos[hello.rank] = hello
            self._joined.notify_all()

    def _forward(self, frame: bytes) -> None:
        message = decode(frame)
        if isinstance(message, Start):
            self._started = True
        for rank, identity in self._peers.items():
            try:
                self._router.send_multipart([identity, frame], zmq.NOBLOCK)
            except zmq.ZMQError as exc:  # EHOSTUNREACH (gone) or EAGAIN (not reading): lost either way
                self._declare_lost(f"rank {rank} unreachable: {exc}")
                return
        if isinstance(message, Abort):
            self._declare_lost(message.reason)

    def _check_liveness(self, now: float) -> None:
        if self._joining:
            return
        # From its Hello on: a follower that dies while the ranks load must not leave rank 0
        # waiting in the ring's set-up or its first collective.
        for rank, seen in self._last_seen.items():
            if now - seen > self._timeout:
                self._declare_lost(f"rank {rank} silent for {now - seen:.1f} s")
                return

    def _declare_lost(self, reason: str) -> None:
        if self._lost is not None:
            return
        self._lost = reason
        log.error("shard.rank_lost", reason=reason)
        for identity in self._peers.values():
            with contextlib.suppress(zmq.ZMQError):
                self._router.send_multipart([identity, encode(Abort(reason=reason))], zmq.NOBLOCK)
        with self._joined:
            self._joined.notify_all()
        self._on_lost(reason)


# ---- a follower --------------------------------------------------------------------------------


class FollowerLink:
    """A follower's end of the control channel; used by the follower's main thread only."""

    def __init__(self, endpoint: str, rank: int) -> None:
        self.rank = rank
        self._socket: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 500)
        self._socket.connect(endpoint)

    def send(self, message: Message) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self._socket.send(encode(message), zmq.NOBLOCK)

    def receive(self, timeout: float) -> Message | None:
        """The next message within `timeout` seconds, else None."""
        if not self._socket.poll(int(timeout * 1000)):
            return None
        try:
            return decode(self._socket.recv())
        except msgspec.DecodeError:
            log.warning("shard.bad_control_frame", rank=self.rank)
            return None

    def close(self) -> None:
        self._socket.close()
