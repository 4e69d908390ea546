"""What the master tells a worker process it will not serve, and how often (pure: time passed in).

A refused process keeps sending (heartbeats, output): each of its messages could be answered, so a
refusal lost on the bus is repeated, but at most once a second per node id, so a flood of refused
messages (100,000 cycled incarnations, say) is not echoed 100,000 times. Bounded: the node ids told
recently are kept least recently told first, `max_nodes` at most.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from protocol import codec
from protocol.ids import NodeId
from protocol.keys import fingerprint
from protocol.messages import NodeRefused

Refusal = tuple[bytes, NodeRefused]  # (topic, message)


class Refusals:
    def __init__(self, max_nodes: int, every: float = 1.0) -> None:
        self.max_nodes = max_nodes
        self.every = every
        self._told: OrderedDict[NodeId, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._told)

    def told_before(self, node_id: NodeId) -> bool:
        return node_id in self._told

    def may_tell(self, node_id: NodeId, now: float) -> bool:
        last = self._told.get(node_id)
        if last is not None and now - last < self.every:
            return False
        self._told[node_id] = now
        self._told.move_to_end(node_id)
        while len(self._told) > self.max_nodes:
            self._told.popitem(last=False)
        return True

    def duplicate(self, node_id: NodeId, incarnation: str, now: float) -> Refusal | None:
        """A second live process with this node id: on its node topic, to its incarnation."""
        if not self.may_tell(node_id, now):
            return None
        reason = (
            f"node id {node_id!r} is already served by another running worker; stop that one, or give "
            "this one its own --node-id"
        )
        return codec.node_topic(node_id), NodeRefused(node_id=node_id, incarnation=incarnation, reason=reason)

    def not_owner(
        self, node_id: NodeId, incarnation: str, key: str | None, authorized: Path | None, now: float
    ) -> Refusal | None:
        """A key that does not own this node id. On the broadcast topic: its own topic is closed to
        it (the same check refuses that subscription); the incarnation names the process."""
        if not incarnation or not self.may_tell(node_id, now):
            return None  # never an empty incarnation: on the broadcast topic it would name everyone
        owner = f"{authorized}/{node_id}.key" if authorized is not None else f"{node_id}.key"
        reason = (
            f"this worker's key {fingerprint(key) if key else None} is not authorized for node id "
            f"{node_id!r}: under CURVE a node id belongs to the key in {owner}; use the node id your "
            "key is authorized as, or authorize this key under that name"
        )
        return codec.BROADCAST_TOPIC, NodeRefused(node_id=node_id, incarnation=incarnation, reason=reason)
