"""Prefix-aware placement: the next turn of a chat goes where its prefix is cached, among equals
only (slack 0), so bursts stay balanced; with slack, affinity may win a bounded imbalance."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from exo_master.core import CoreConfig, MasterCore
from exo_master.core.affinity import AffinityIndex, extend, prefix_chain, reply_hasher
from exo_master.core.events import NodeSubscribed, SubmitTask, TaskPlaced
from protocol.ids import InstanceId, TaskId
from protocol.messages import ChatMessage, FinishReason, TaskFinished, TextGenerationParams
from tests.master.cluster import MODEL, accept, chunk, heartbeat, node_of, placement_of, report

SYSTEM = ChatMessage(role="system", content="You are a helpful assistant.")


def core_with(k: int, **config: float) -> MasterCore:
    core = MasterCore(CoreConfig(heartbeat_liveness=1000, **config))  # type: ignore[arg-type]
    for i in range(k):
        core.handle(NodeSubscribed(node_id=node_of(i)), 0.0)
        core.handle(heartbeat(i, report(i)), 0.0)
    return core


def ask(core: MasterCore, task_id: str, *messages: ChatMessage) -> TaskPlaced:
    params = TextGenerationParams(model=MODEL, messages=(SYSTEM, *messages))
    placed = placement_of(core.handle(SubmitTask(task_id=TaskId(task_id), params=params), 0.0))
    assert placed is not None
    return placed


def complete(core: MasterCore, placed: TaskPlaced, reply: str) -> None:
    accept(core, placed)
    chunk(core, placed, 0, text=reply)
    core.handle(
        TaskFinished(
            node_id=placed.node_id,
            task_id=placed.task_id,
            instance_id=placed.instance_id,
            finish_reason=FinishReason.STOP,
            chunks=1,
        ),
        0.0,
    )


def test_the_reply_hash_is_the_next_turns_prefix() -> None:
    user, answer = ChatMessage(role="user", content="hi"), ChatMessage(role="assistant", content="hello!")
    running = reply_hasher(prefix_chain((SYSTEM, user))[-1])
    running.update(b"hel")
    running.update(b"lo!")
    assert running.digest() == prefix_chain((SYSTEM, user, answer))[-1]
    assert extend(b"", "user", "hi") != extend(b"", "user", "hi ")


def test_the_next_turn_goes_where_the_conversation_is() -> None:
    core = core_with(4)
    hi = ChatMessage(role="user", content="hi")
    first = ask(core, "t1", hi)
    complete(core, first, "hello!")
    # All four instances are idle again: every one is equally loaded, so affinity breaks the tie.
    second = ask(
        core,
        "t2",
        hi,
        ChatMessage(role="assistant", content="hello!"),
        ChatMessage(role="user", content="more"),
    )
    assert second.instance_id == first.instance_id
    assert core.counters().affinity_hits == 1
    view = core.view(0.0)
    assert (view.prefix_affinity, view.affinity_lookups, view.affinity_hits) == (True, 1, 1)


HI, HELLO = ChatMessage(role="user", content="hi"), ChatMessage(role="assistant", content="hello!")
MORE = ChatMessage(role="user", content="more")


def test_affinity_never_beats_a_lower_load_with_zero_slack() -> None:
    core = core_with(2)
    home = ask(core, "t0", HI)
    complete(core, home, "hello!")
    first = ask(core, "t1", HI, HELLO, MORE)  # still running: its instance has load 1, the other 0
    assert first.instance_id == home.instance_id
    second = ask(core, "t2", HI, HELLO, MORE)
    assert second.instance_id != first.instance_id


def test_slack_lets_affinity_win_a_bounded_imbalance() -> None:
    core = core_with(2, affinity_slack=1.0)
    home = ask(core, "t0", HI)
    complete(core, home, "hello!")
    first = ask(core, "t1", HI, HELLO, MORE)
    assert ask(core, "t2", HI, HELLO, MORE).instance_id == first.instance_id  # load 1 vs 0: within 1
    third = ask(core, "t3", HI, HELLO, MORE)
    assert third.instance_id != first.instance_id  # load 2 vs 0: beyond the slack


def test_first_turns_sharing_a_system_prompt_are_not_pulled_to_one_instance() -> None:
    # Every chat starts with the same system prompt; with slack, matching on it would send every
    # new chat to the first instance (all its workers cache that prompt after one request anyway).
    core = core_with(2, affinity_slack=1.0)
    placed = [ask(core, f"t{i}", ChatMessage(role="user", content=f"chat {i}")) for i in range(4)]
    assert sorted(p.instance_id for p in placed).count(placed[0].instance_id) == 2
    assert core.counters().affinity_lookups == 0


def test_few_shot_examples_in_every_chat_are_not_a_conversation_to_follow() -> None:
    # A template's example exchange is an assistant message too, but no reply this master streamed:
    # new chats spread; a chat's next turn, after a streamed reply, still goes home.
    core = core_with(2, affinity_slack=1.0)
    shots = (ChatMessage(role="user", content="2+2?"), ChatMessage(role="assistant", content="4"))
    firsts = [ask(core, f"t{i}", *shots, ChatMessage(role="user", content=f"chat {i}")) for i in range(4)]
    assert sorted(p.instance_id for p in firsts).count(firsts[0].instance_id) == 2
    assert core.counters().affinity_lookups == 0
    home = firsts[3].instance_id
    for placed in firsts:  # home keeps one chat running (load 1), the other instance is idle
        if placed is firsts[3] or placed.instance_id != home:
            complete(core, placed, "hello!")
    follow = ask(core, "f", *shots, ChatMessage(role="user", content="chat 3"), HELLO, MORE)
    assert follow.instance_id == home  # within the slack of the idle one
    assert (core.counters().affinity_lookups, core.counters().affinity_hits) == (1, 1)


def test_state_only_stays_the_plain_baseline() -> None:
    core = core_with(2, policy="state-only")  # type: ignore[arg-type]
    assert core.scheduler.affinity is None
    assert not core.view(0.0).prefix_affinity


@settings(max_examples=60)
@given(
    k=st.integers(1, 6),
    n=st.integers(1, 40),
    chats=st.integers(1, 5),
    history=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 5)), max_size=8),
)
def test_a_burst_with_prefix_affinity_stays_within_ceil_n_over_k(
    k: int, n: int, chats: int, history: list[tuple[int, int]]
) -> None:
    core = core_with(k)
    # Earlier, finished turns leave prefixes scattered over the instances.
    for j, (chat, reply) in enumerate(history):
        placed = ask(core, f"h{j}", ChatMessage(role="user", content=f"chat {chat}"))
        complete(core, placed, f"reply {reply}")
    counts: dict[InstanceId, int] = {}
    for i in range(n):  # next turns of those chats, many of them held by one instance or another
        opening = ChatMessage(role="user", content=f"chat {i % chats}")
        answer = ChatMessage(role="assistant", content=f"reply {i % 6}")
        placed = ask(core, f"b{i}", opening, answer, MORE)
        counts[placed.instance_id] = counts.get(placed.instance_id, 0) + 1
    assert max(counts.values()) <= math.ceil(n / k), counts
    core.check_invariants()


def test_the_index_is_bounded_and_forgets_the_oldest() -> None:
    index = AffinityIndex(capacity=3)
    for i in range(5):
        index.remember((bytes([i]),), InstanceId(f"n{i}/0"))
    assert len(index) == 3
    assert index.holders((bytes([0]),)) == (0, [])
    assert index.holders((bytes([4]),)) == (1, [InstanceId("n4/0")])
