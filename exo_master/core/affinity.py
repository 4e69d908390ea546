"""Prefix affinity: which instance probably still holds a conversation's prefix in its prompt cache.

Each chat request is summarised as a chain of hashes, one per message boundary (h1 covers message
1, h2 messages 1-2, ...). When a request is placed on an instance, its chain is remembered there;
when it completes, the chain extended by the assistant's reply is remembered too, since the next
turn of that conversation starts with exactly those messages. A new request then looks for the
instance holding the longest prefix of its own chain.

Only a conversation's own prefixes take part: those from the first reply on (`conversation_chain`),
and of those, lookups start at the first reply this master streamed (`conversation_start`). The
prefixes before it (a system prompt, few-shot examples, a template every chat shares) are in every
worker's cache after its first request; steering by them would only pull every new chat to the
first instance that saw one (with --affinity-slack, all of them: measured, the other instance
stayed idle).

Bounded like the worker's cache: at most `capacity` (hash, instance) pairs, least recently used
first out. Pure and deterministic (blake2b of the text; no process-seeded hash()).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

from protocol.ids import InstanceId
from protocol.messages import ChatMessage

PrefixChain = tuple[bytes, ...]


def extend(previous: bytes, role: str, content: str) -> bytes:
    digest = hashlib.blake2b(previous, digest_size=16)
    digest.update(role.encode())
    digest.update(b"\x00")
    digest.update(content.encode())
    return digest.digest()


def reply_hasher(previous: bytes) -> Any:
    """A running hash that ends as `extend(previous, "assistant", reply)` once fed the reply."""
    digest = hashlib.blake2b(previous, digest_size=16)
    digest.update(b"assistant\x00")
    return digest


def prefix_chain(messages: Sequence[ChatMessage]) -> PrefixChain:
    chain: list[bytes] = []
    previous = b""
    for message in messages:
        previous = extend(previous, message.role, message.content)
        chain.append(previous)
    return tuple(chain)


def conversation_chain(messages: Sequence[ChatMessage]) -> tuple[PrefixChain, bytes]:
    """The hashes of the prefixes of `messages` that end at or after the first assistant message
    (empty for a first turn), and the hash of all the messages (the base of the reply's hash)."""
    chain = prefix_chain(messages)
    first_reply = next((i for i, m in enumerate(messages) if m.role == "assistant"), len(messages))
    return chain[first_reply:], (chain[-1] if chain else b"")


class AffinityIndex:
    def __init__(self, capacity: int = 65_536) -> None:
        self.capacity = capacity
        self._holders: OrderedDict[tuple[bytes, InstanceId], None] = OrderedDict()
        self._by_hash: dict[bytes, list[InstanceId]] = {}
        self._replies: OrderedDict[bytes, None] = OrderedDict()  # hashes that end in a streamed reply

    def __len__(self) -> int:
        return len(self._holders)

    def remember(self, chain: Iterable[bytes], instance_id: InstanceId) -> None:
        for h in chain:
            key = (h, instance_id)
            if key in self._holders:
                self._holders.move_to_end(key)
                continue
            self._holders[key] = None
            self._by_hash.setdefault(h, []).append(instance_id)
        while len(self._holders) > self.capacity:
            (h, iid), _ = self._holders.popitem(last=False)
            holders = self._by_hash[h]
            holders.remove(iid)
            if not holders:
                del self._by_hash[h]

    def remember_reply(self, digest: bytes, instance_id: InstanceId) -> None:
        """A reply was streamed from `instance_id`: the conversation up to it is held there."""
        self.remember((digest,), instance_id)
        self._replies[digest] = None
        self._replies.move_to_end(digest)
        while len(self._replies) > self.capacity:
            self._replies.popitem(last=False)

    def conversation_start(self, chain: PrefixChain) -> int:
        """Where lookups start: the first prefix of `chain` ending in a reply this master streamed
        (len(chain) when none does: a first turn, or a conversation from elsewhere)."""
        return next((i for i, h in enumerate(chain) if h in self._replies), len(chain))

    def holders(self, chain: PrefixChain) -> tuple[int, list[InstanceId]]:
        """The longest prefix of `chain` anyone holds: (its length in messages, its holders)."""
        for length in range(len(chain), 0, -1):
            holders = self._by_hash.get(chain[length - 1])
            if holders:
                return length, holders
        return 0, []
