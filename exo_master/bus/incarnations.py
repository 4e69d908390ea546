"""One live process per node id: telling a restarted worker from a second one with the same id.

Every worker process stamps a fresh incarnation id on its envelopes. The first incarnation heard
for a node is current. A different one (a newcomer) is held, its messages dropped, until either
- the current one stays silent for `grace` seconds: it was a restart, so the newcomer becomes
  current (the core then heals from its first snapshot: the old process's tasks are lost), or
- the current one is heard again while the newcomer waits: two processes are live, and the
  newcomer is refused (the bus shell tells it with NodeRefused, and it exits with code 2).
Pure: time is passed in. Bounded, since node ids and incarnations are chosen by peers: at most
`max_nodes` nodes are followed (the one heard least recently is forgotten first) and at most
`max_refused` refused incarnations remembered (the oldest first; a forgotten one that speaks again
is held, then refused again while the current process lives).
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass


class Verdict(enum.Enum):
    ADMIT = "admit"
    HOLD = "hold"  # a newcomer whose predecessor may still be alive: drop its message for now
    REFUSE = "refuse"  # a second live process with this node id


@dataclass(slots=True)
class _Node:
    current: str
    heard: float
    newcomer: str | None = None
    newcomer_since: float = 0.0


class IncarnationGuard:
    def __init__(self, grace: float, max_nodes: int = 4096, max_refused: int = 4096) -> None:
        self.grace = grace
        self.max_nodes = max_nodes
        self.max_refused = max_refused
        self._nodes: OrderedDict[str, _Node] = OrderedDict()  # least recently heard first
        # (node id, incarnation) told to stop, oldest first
        self.refused: OrderedDict[tuple[str, str], None] = OrderedDict()

    def observe(self, node_id: str, incarnation: str, now: float) -> Verdict:
        node = self._nodes.get(node_id)
        if node is None:
            self._nodes[node_id] = _Node(current=incarnation, heard=now)
            while len(self._nodes) > self.max_nodes:
                self._nodes.popitem(last=False)
            return Verdict.ADMIT
        if (node_id, incarnation) in self.refused:
            return Verdict.REFUSE
        if incarnation == node.current:
            self._nodes.move_to_end(node_id)
            if node.newcomer is not None and now >= node.newcomer_since:
                # The current process is alive while a newcomer waits: the newcomer is a duplicate.
                self.refused[(node_id, node.newcomer)] = None
                while len(self.refused) > self.max_refused:
                    self.refused.popitem(last=False)
                node.newcomer = None
            node.heard = now
            return Verdict.ADMIT
        if now - node.heard > self.grace:
            # The current process has been silent long enough: this is its restart.
            self._nodes[node_id] = _Node(current=incarnation, heard=now)
            return Verdict.ADMIT
        if node.newcomer != incarnation:
            node.newcomer, node.newcomer_since = incarnation, now
        return Verdict.HOLD

    def forget(self, node_id: str) -> None:
        self._nodes.pop(node_id, None)

    def __len__(self) -> int:
        return len(self._nodes)
