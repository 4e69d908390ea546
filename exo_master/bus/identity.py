"""Who may speak for which node: identity checks at the bus shell, before anything reaches the core.

Pure (the time is passed in). For every worker message:
- the envelope's origin must be the message's node id (a worker stamps its envelopes with it);
- every instance id it names must be in its node's namespace, `NODE/...` (as the worker builds
  them), so a node reports and answers only for its own instances;
- with CURVE, the authenticated key (the ZAP User-Id) must own that node id: `authorized/NAME.key`
  admits its key as node NAME only (`owners`, from the authorized-keys directory), so no
  authorized peer can take another's id, before or after it first connects. Without an owners map
  (tests), a node id is bound to the first key that speaks for it; a binding idle for
  `release_after` seconds is released. A key may hold several node ids (several workers on one
  machine may share one key, under several file names), but a node id has one key.
Subscriptions on the master's XPUB go through `check_key` too (a node's topic is read only with its
key). Mismatches are dropped, logged and counted by reason.

The core separately accepts a message about a task only from the node the task is bound to; with
these checks, "from the node" is proven, not claimed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from protocol.ids import NodeId
from protocol.messages import WorkerHeartbeat, WorkerMessage

MAX_NODES = 4096


class DropReason:
    ORIGIN_MISMATCH = "origin_mismatch"  # envelope origin is not the message's node id
    FOREIGN_INSTANCE = "foreign_instance"  # an instance id outside the node's namespace
    KEY_MISMATCH = "key_mismatch"  # the node id is bound to another key
    NOT_OWNER = "node_id_not_owned"  # the key is not authorized under this node id's name
    TOO_MANY_NODES = "too_many_nodes"  # the binding table is full of live nodes
    FOREIGN_TOPIC = "foreign_topic"  # a subscription to neither a node topic nor the broadcast one


@dataclass(slots=True)
class _Binding:
    key: str
    last_seen: float


@dataclass(slots=True)
class IdentityGuard:
    release_after: float = 30.0
    max_nodes: int = MAX_NODES
    drops: dict[str, int] = field(default_factory=dict)
    owners: Callable[[str], frozenset[str]] | None = None  # key -> the node ids it may use
    _bindings: dict[NodeId, _Binding] = field(default_factory=dict)

    def check_message(self, origin: str, body: WorkerMessage, key: str | None, now: float) -> str | None:
        """None when the message may go on; else the reason to drop it (already counted)."""
        node_id = body.node_id
        if origin != node_id:
            return self._drop(DropReason.ORIGIN_MISMATCH)
        prefix = f"{node_id}/"
        if isinstance(body, WorkerHeartbeat):
            if any(not r.instance_id.startswith(prefix) for r in body.instances):
                return self._drop(DropReason.FOREIGN_INSTANCE)
        elif not body.instance_id.startswith(prefix):
            return self._drop(DropReason.FOREIGN_INSTANCE)
        return self.check_key(node_id, key, now)

    def check_key(self, node_id: NodeId, key: str | None, now: float) -> str | None:
        """Bind the node id to the key at first contact; refuse another key while the binding lives."""
        if key is None:  # plaintext bus (loopback, or --insecure): no key to bind
            return None
        if self.owners is not None:
            return None if node_id in self.owners(key) else self._drop(DropReason.NOT_OWNER)
        binding = self._bindings.get(node_id)
        if binding is not None and binding.key != key and now - binding.last_seen <= self.release_after:
            return self._drop(DropReason.KEY_MISMATCH)
        if binding is None and len(self._bindings) >= self.max_nodes and not self._evict(now):
            return self._drop(DropReason.TOO_MANY_NODES)
        if binding is None or binding.key != key:
            self._bindings[node_id] = _Binding(key=key, last_seen=now)
        else:
            binding.last_seen = now
        return None

    def bound_key(self, node_id: NodeId) -> str | None:
        binding = self._bindings.get(node_id)
        return binding.key if binding is not None else None

    def _evict(self, now: float) -> bool:
        idle = [n for n, b in self._bindings.items() if now - b.last_seen > self.release_after]
        for node_id in idle:
            del self._bindings[node_id]
        return bool(idle)

    def refuse(self, reason: str) -> str:
        """Count a refusal decided by the shell (e.g. a subscription to a foreign topic)."""
        return self._drop(reason)

    def _drop(self, reason: str) -> str:
        self.drops[reason] = self.drops.get(reason, 0) + 1
        return reason
