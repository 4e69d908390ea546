"""The sharded instance's spec and control channel, without MLX: fake followers on loopback."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator

import msgspec
import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st

from exo_master.devtools.ports import free_port
from exo_worker.distributed.control import (
    Abort,
    Beat,
    Close,
    Failed,
    Hello,
    Insert,
    Leader,
    Message,
    Start,
    Step,
    decode,
    encode,
)
from exo_worker.distributed.topology import ShardSpec, even_split, parse_hosts
from protocol.sharding import Sharding

HOSTS = ("127.0.0.1:5000", "127.0.0.1:5002", "127.0.0.1:5004")


def test_hosts_parse_in_rank_order_and_bad_ones_say_why() -> None:
    assert parse_hosts(" 10.0.0.1:5000, 10.0.0.2:5000 ") == ("10.0.0.1:5000", "10.0.0.2:5000")
    for bad, why in [
        ("10.0.0.1:5000", "at least 2"),
        ("a:1,b", "expected HOST:PORT"),
        ("a:1,b:70000", "expected HOST:PORT"),
        ("a:1,a:1", "distinct"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_hosts(bad)


def test_the_control_endpoint_defaults_to_the_port_after_rank_0s() -> None:
    spec = ShardSpec(rank=1, hosts=HOSTS, sharding=Sharding.TENSOR)
    assert spec.control_endpoint == "tcp://127.0.0.1:5001"
    assert (
        ShardSpec(rank=1, hosts=HOSTS, sharding=Sharding.TENSOR, control="h:9").control_endpoint
        == "tcp://h:9"
    )
    with pytest.raises(ValueError, match="outside"):
        ShardSpec(rank=3, hosts=HOSTS, sharding=Sharding.TENSOR)
    with pytest.raises(ValueError, match="split"):
        ShardSpec(rank=0, hosts=HOSTS, sharding=Sharding.PIPELINE, split=(2, 2))


@given(st.integers(1, 80), st.integers(1, 8))
def test_layer_ranges_tile_the_model(layers: int, ranks: int) -> None:
    if ranks > layers:
        return
    hosts = tuple(f"127.0.0.1:{5000 + 2 * r}" for r in range(ranks)) if ranks > 1 else ()
    if not hosts:
        assert even_split(layers, 1) == (layers,)
        return
    ranges = [ShardSpec(r, hosts, Sharding.PIPELINE).layer_range(layers) for r in range(ranks)]
    assert ranges[0][0] == 0 and ranges[-1][1] == layers
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in itertools.pairwise(ranges))
    assert max(e - s for s, e in ranges) - min(e - s for s, e in ranges) <= 1


def test_control_messages_round_trip_and_garbage_is_refused() -> None:
    messages: list[Message] = [
        Hello(rank=1, spec={"hosts": list(HOSTS)}, pid=7),
        Start(max_batch=4, cache_bytes_per_layer=1024),
        Insert(uid=3, prompt=[1, 2, 3], reused=1, max_tokens=9, temperature=0.5, top_p=0.9, seed=42),
        Step(),
        Abort(reason="rank 2 silent"),
    ]
    for message in messages:
        assert decode(encode(message)) == message
    with pytest.raises(msgspec.DecodeError):
        decode(b"\x81\xa4type\xa4nope")


class FakeFollower:
    """A DEALER that speaks the follower's side of the protocol, driven by the test."""

    def __init__(self, endpoint: str, rank: int) -> None:
        self.rank = rank
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)
        self.socket.send(encode(Hello(rank=rank, spec={}, pid=0)))

    def beat(self) -> None:
        self.socket.send(encode(Beat(rank=self.rank)))

    def receive(self, timeout: float) -> list[Message]:
        out: list[Message] = []
        deadline = time.monotonic() + timeout
        while self.socket.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            out.append(decode(self.socket.recv()))
        return out


@pytest.fixture
def leader() -> Iterator[tuple[Leader, str, list[str], threading.Event]]:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    reasons: list[str] = []
    lost = threading.Event()

    def on_lost(reason: str) -> None:
        reasons.append(reason)
        lost.set()

    lead = Leader(endpoint, ranks=3, loss_timeout=0.5, on_lost=on_lost)
    yield lead, endpoint, reasons, lost
    lead.close()


def test_commands_reach_every_follower_in_order() -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    lost = threading.Event()
    lead = Leader(endpoint, ranks=3, loss_timeout=30, on_lost=lambda reason: lost.set())
    followers = [FakeFollower(endpoint, r) for r in (1, 2)]
    assert sorted(lead.wait_for_followers(timeout=5)) == [1, 2]
    sent: list[Message] = [Start(max_batch=2, cache_bytes_per_layer=0), Step(), Step(), Close()]
    for message in sent:
        lead.send(message)
    for follower in followers:
        got = [m for m in follower.receive(0.3) if not isinstance(m, Beat)]
        assert got == sent
    assert not lost.is_set()
    lead.close()


def test_a_silent_follower_is_lost_and_the_others_are_told_to_abort(
    leader: tuple[Leader, str, list[str], threading.Event],
) -> None:
    lead, endpoint, reasons, lost = leader
    alive, silent = FakeFollower(endpoint, 1), FakeFollower(endpoint, 2)
    lead.wait_for_followers(timeout=5)
    lead.send(Start(max_batch=2, cache_bytes_per_layer=0))
    deadline = time.monotonic() + 5
    aborted: list[Message] = []
    while not aborted and time.monotonic() < deadline:
        alive.beat()  # rank 1 keeps beating, rank 2 never does
        aborted = [m for m in alive.receive(0.05) if isinstance(m, Abort)]
    assert lost.wait(1) and "rank 2 silent" in reasons[0]
    assert aborted and "rank 2" in aborted[0].reason  # type: ignore[attr-defined]
    assert lead.lost == reasons[0] and len(reasons) == 1
    silent.socket.close()


def test_a_failed_follower_ends_the_instance_and_a_missing_one_times_out() -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    lost = threading.Event()
    lead = Leader(endpoint, ranks=3, loss_timeout=5, on_lost=lambda reason: lost.set())
    try:
        follower = FakeFollower(endpoint, 1)
        with pytest.raises(TimeoutError, match=r"ranks \[2\] did not join"):
            lead.wait_for_followers(timeout=0.5)
        follower.socket.send(encode(Failed(rank=1, error="RuntimeError: [ring] connection lost")))
        assert lost.wait(5) and "rank 1 failed" in (lead.lost or "")
    finally:
        lead.close()


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["--shard-rank", "1"], "--shard-rank and --shard-hosts go together"),
        (["--shard-rank", "1", "--shard-hosts", "a:1"], "at least 2"),
        (["--shard-rank", "5", "--shard-hosts", "a:1,b:2"], "outside"),
        (["--master", "h:1", "--shard-rank", "0", "--shard-hosts", "a:1,b:2"], "--engine mlx"),
    ],
)
def test_bad_shard_flags_are_usage_errors(args: list[str], why: str) -> None:
    import structlog
    from typer.testing import CliRunner

    from exo_worker.daemon import app

    saved = structlog.get_config()
    try:
        result = CliRunner().invoke(app, args)
    finally:
        structlog.configure(**saved)
    assert result.exit_code == 2, result.output
    assert why in " ".join(result.output.replace("│", " ").split())  # unwrap typer's error panel
