"""The API connection cap: who gives way to a newcomer, and the default from the open-files limit."""

from __future__ import annotations

from typing import Any, cast

from exo_master.http.connection_cap import ConnectionCap, default_max_connections


class FakeTransport:
    def __init__(self) -> None:
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


def admit(cap: ConnectionCap, name: str) -> tuple[bool, FakeTransport]:
    transport = FakeTransport()
    return cap.admit(name, cast(Any, transport)), transport


def test_a_newcomer_replaces_the_connection_that_waited_on_its_client_longest() -> None:
    cap = ConnectionCap(limit=3)
    transports = {name: admit(cap, name)[1] for name in ("slow1", "slow2", "busy")}
    cap.answering("busy")  # a whole request arrived: its response streams
    cap.waiting("slow1")  # slow1 sent more bytes of its body: now the most recently active
    ok, _ = admit(cap, "health")
    assert ok and transports["slow2"].aborted and not transports["slow1"].aborted
    assert not transports["busy"].aborted
    assert cap.open == 3 and cap.counts.evicted == 1


def test_when_every_connection_is_being_answered_the_newcomer_is_refused() -> None:
    cap = ConnectionCap(limit=2)
    for name in ("a", "b"):
        admit(cap, name)
        cap.answering(name)
    ok, _ = admit(cap, "c")
    assert not ok and cap.counts.refused == 1 and cap.open == 2
    cap.waiting("a")  # a's response ended: idle keep-alive, it may give way now
    ok, _ = admit(cap, "d")
    assert ok and cap.counts.evicted == 1


def test_closed_connections_free_their_place() -> None:
    cap = ConnectionCap(limit=1)
    admit(cap, "a")
    cap.closed("a")
    assert admit(cap, "b")[0] and cap.counts.evicted == 0


def test_the_default_cap_leaves_room_for_the_bus_and_logs() -> None:
    assert default_max_connections(1024) == 896
    assert default_max_connections(256) == 192
    assert default_max_connections(1_048_576) == 4096
    assert default_max_connections(16) == 8
