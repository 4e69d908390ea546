"""The core's settings and its counters (what /metrics exports about scheduling)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class CoreConfig:
    policy: str = "least-work"
    seed: int = 0
    session: str = "master"
    heartbeat_interval: float = 1.0
    heartbeat_liveness: int = 3  # missed heartbeats before a node is dead
    ledger_ttl: float = 5.0  # well above liveness x interval: a silent node is declared dead first
    assign_resend: float = 0.25  # AssignTask is re-sent this often until the worker confirms
    queue_limit: int = 256  # per (model, kind)
    max_attempts: int = 3  # placements per task before it fails
    # A dead node stays visible (exoctl shows it "dead") this long, then it is forgotten: workers
    # that restart under a new node id must not pile up as dead rows forever.
    forget_dead_after: float = 300.0
    # A request waiting this long for a free slot fails with a clear 503 instead of waiting forever.
    queue_timeout: float = 300.0
    max_nodes: int = 1024  # heartbeats from further nodes are ignored (and counted)
    # Output integrity (see output.py): chunks held out of order, how long a gap may last before the
    # worker is asked to send it again, how often to ask, and how many times.
    reorder_window: int = 1024
    fetch_after: float = 0.2
    fetch_every: float = 0.5
    # Per gap: rounds without progress before the task fails (30% loss fails a gap 0.3^12 = 5e-7).
    max_fetches: int = 12
    # Prefix-aware placement: among the instances the policy ranks equal (or within
    # `affinity_slack` of its choice's score), prefer the one that holds the longest prefix of the
    # conversation in its prompt cache. Slack 0 never costs balance. `affinity_entries` bounds it.
    prefix_affinity: bool = True
    affinity_slack: float = 0.0
    # About 500 bytes a conversation prefix (holder, reply digest): 16,384 cost at most ~8 MB of the
    # master's memory (the soak's distinct chats filled 65,536 for ~30 MB, still growing at 30 min).
    affinity_entries: int = 16_384

    @property
    def node_timeout(self) -> float:
        return self.heartbeat_interval * self.heartbeat_liveness


@dataclass(slots=True)
class CoreStats:
    placements: int = 0
    replacements: int = 0  # attempts lost and put back in line
    rejections: dict[str, int] = field(default_factory=dict)
    finals: dict[str, int] = field(default_factory=dict)
    orphan_cancels: int = 0
    late_events: int = 0
    duplicate_chunks: int = 0
    chunks_out_of_order: int = 0
    chunks_beyond_window: int = 0  # early chunks dropped (reorder window full), fetched later
    output_fetches: int = 0
    outputs_lost: int = 0
    queue_timeouts: int = 0
    refused_nodes: int = 0
    affinity_lookups: int = 0  # placements of a chat whose prefix some instance held
    affinity_hits: int = 0  # of those, placed on a holder
