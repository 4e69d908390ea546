"""GET /metrics: the master's Prometheus metrics, read from the core, the ledger and the bus.

Counts live in one place (CoreStats, LedgerStats, BusCounters, SequenceTracker, the state): a
custom collector reads them at scrape time, so nothing is counted twice. Only the latencies, which
nothing else keeps, are prometheus-client histograms, fed by the runtime's observers. Each runtime
gets its own CollectorRegistry, so several masters can live in one process (tests).

The scrape runs on the event loop, between two core steps, so it reads a consistent state; it is
O(nodes + instances + models), never O(tasks).

Metrics (all prefixed exo_):
    master_info{policy,session}                          gauge     always 1
    instance_in_flight{instance,node,model}              gauge     tasks confirmed by the worker
    instance_pending{instance,node,model}                gauge     assigned, awaiting confirmation
    instance_unowned{instance,node,model}                gauge     engine work no task owns (a
                                                                   cancelled prompt being stopped)
    instance_prefill_tokens / instance_decoding          gauge     the engine's work: prompt tokens
                                                                   to prefill, sequences decoding
    instance_prefill_rate / instance_decode_rate         gauge     measured, tokens/s, steps/s
    instance_first_token_wait_seconds                    gauge     the master's estimate for a short
                                                                   request placed there now
    instance_max_concurrency{instance,node,model}        gauge     slots of the instance
    instance_ready{instance,node,model}                  gauge     1 when ready and its node alive
    instance_completed_total / instance_failed_total     counter   tasks ended there, per instance
    queue_depth{model}                                   gauge     requests waiting at the master
    live_tasks{status}                                   gauge     queued | pending | running
    tasks_ended_total{status}                            counter   finished | failed | cancelled
    placements_total / replacements_total                counter   placement decisions that bound
                                                                   a task / re-placements after loss
    rejections_total{reason}                             counter   unknown_model, queue_full, ...
    orphan_cancels_total, late_events_total, chunks_out_of_order_total, chunks_beyond_window_total,
    duplicate_chunks_total, output_fetches_total, outputs_lost_total, queue_timeouts_total,
    refused_nodes_total   counter
    ledger_entries                                       gauge     current reservations
    ledger_reservations_total, ledger_confirmations_total,
    ledger_releases_total, ledger_expiries_total         counter   ledger entry lifecycle
    node_up{node}                                        gauge     1 alive, 0 dead
    node_subscribed{node}                                gauge     1 when its bus subscription is live
    node_heartbeat_age_seconds{node}                     gauge     since its last heartbeat
    bus_messages_received_total{type}                    counter   worker messages, by type
    bus_messages_sent_total{type}                        counter   master messages, by type
    bus_sequence_gaps_total                              counter   messages missed, all publishers
    bus_sequence_gaps_by_origin_total{origin}            counter   messages missed, per publisher
    bus_unsubscriptions_ignored_total                    counter   keyless unsubscriptions sent by a
                                                                   peer (plaintext: not counted)
    bus_malformed_frames_total                           counter   frames that failed to decode
    bus_refusals_total{reason}                           counter   peers refused at the handshake
                                                                   (unknown_key, no_curve, ...)
    bus_identity_drops_total{reason}                     counter   messages dropped by the identity
                                                                   checks (origin_mismatch, ...)
    http_connections_open, http_max_connections          gauge     API connections, and their cap
    http_connections_evicted_total                       counter   closed at the cap for a newcomer
    http_connections_refused_total                       counter   newcomers closed at the cap
    placement_decision_seconds                           histogram core time per submission
    queue_wait_seconds                                   histogram submission to placement
    Inference latencies and token counts (time to first token, time per output token, request
    duration, prompt and generated tokens, per model): see exo_master/inference_metrics.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from exo_master.core.events import Effect, RejectReason, TaskPlaced
from exo_master.http.inference_metrics import InferenceMetrics
from exo_master.runtime import MasterRuntime
from protocol.cluster_view import ClusterView, TaskStatus
from protocol.messages import InstanceStatus

# A decision is microseconds of pure Python; milliseconds mean something is wrong.
DECISION_BUCKETS = (
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2,
)  # fmt: skip
QUEUE_WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_FINAL = tuple(s for s in TaskStatus if s.is_final)
_INSTANCE_LABELS = ["instance", "node", "model"]


# CoreCounters fields exported as plain counters, named exo_<field>_total.
_PLAIN_COUNTERS = (
    ("orphan_cancels", "Cancels sent for tasks a worker ran that nobody wanted."),
    ("late_events", "Worker events about tasks already ended or moved."),
    ("chunks_out_of_order", "Output chunks that arrived early and were held in order."),
    ("chunks_beyond_window", "Early output chunks dropped (reorder window full), fetched again later."),
    ("duplicate_chunks", "Output chunks received twice (dropped)."),
    ("output_fetches", "Requests to a worker to send missing output again."),
    ("outputs_lost", "Tasks failed because their output could not be recovered."),
    ("queue_timeouts", "Requests failed after waiting --queue-timeout for a slot."),
    ("refused_nodes", "Heartbeats ignored because --max-nodes was reached."),
    ("affinity_lookups", "Chat placements for which some instance held a prefix of the chat."),
    ("affinity_hits", "Of those, placements on an instance holding the prefix."),
)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _labelled_counter(
    name: str, doc: str, label: str, values: Iterable[tuple[str, float]]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=[label])
    for key, value in sorted(values):
        family.add_metric([key], value)
    return family


def _instance_gauge(name: str, doc: str) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=_INSTANCE_LABELS)


class MasterCollector(Collector):
    """Reads the master's own counters at scrape time."""

    def __init__(self, runtime: MasterRuntime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Metric]:
        view = self.runtime.view()
        yield from self._scheduling(view)
        yield from self._instances(view)
        yield from self._nodes(view)
        yield from self._bus()
        yield from self._connections()

    def _connections(self) -> Iterator[Metric]:
        cap = self.runtime.connection_cap
        if cap is None:
            return
        yield GaugeMetricFamily("exo_http_connections_open", "Open API connections.", value=cap.open)
        yield GaugeMetricFamily(
            "exo_http_max_connections", "The API's connection cap (--max-connections).", value=cap.limit
        )
        yield _counter(
            "exo_http_connections_evicted",
            "Connections waiting on their client closed to admit a newcomer at the cap.",
            cap.counts.evicted,
        )
        yield _counter(
            "exo_http_connections_refused",
            "New connections closed at once: at the cap, every connection was being answered.",
            cap.counts.refused,
        )

    def _scheduling(self, view: ClusterView) -> Iterator[Metric]:
        counts = self.runtime.core.counters()
        info = GaugeMetricFamily(
            "exo_master_info", "The master's policy and session.", labels=["policy", "session"]
        )
        info.add_metric([view.policy, view.session], 1)
        yield info

        queued = GaugeMetricFamily(
            "exo_queue_depth", "Requests waiting at the master, per model.", labels=["model"]
        )
        for row in view.models:
            queued.add_metric([row.model], row.queued)
        yield queued

        live = GaugeMetricFamily("exo_live_tasks", "Tasks not yet ended, by status.", labels=["status"])
        live.add_metric([str(TaskStatus.QUEUED)], counts.queued)
        live.add_metric([str(TaskStatus.PENDING)], counts.pending)
        live.add_metric([str(TaskStatus.RUNNING)], counts.running)
        yield live

        finals = {str(s): counts.finals.get(s, 0) for s in _FINAL}
        yield _labelled_counter("exo_tasks_ended", "Tasks ended, by final status.", "status", finals.items())
        yield _counter(
            "exo_placements",
            "Tasks bound to an instance (first placements and re-placements).",
            counts.placements,
        )
        yield _counter(
            "exo_replacements",
            "Tasks re-placed after their instance was lost or silent.",
            counts.replacements,
        )
        rejections = {str(r): counts.rejections.get(r, 0) for r in RejectReason}
        yield _labelled_counter(
            "exo_rejections", "Submissions refused, by reason.", "reason", rejections.items()
        )
        for name, doc in _PLAIN_COUNTERS:
            yield _counter(f"exo_{name}", doc, getattr(counts, name))

        ledger = counts.ledger
        yield GaugeMetricFamily(
            "exo_ledger_entries", "Assignments awaiting their worker's confirmation.", value=counts.pending
        )
        yield _counter(
            "exo_ledger_reservations", "Ledger entries made (one per placement).", ledger["reserved"]
        )
        yield _counter(
            "exo_ledger_confirmations", "Ledger entries confirmed by the worker.", ledger["confirmed"]
        )
        yield _counter(
            "exo_ledger_releases",
            "Ledger entries dropped unconfirmed (cancel, end, loss).",
            ledger["released"],
        )
        yield _counter(
            "exo_ledger_expiries", "Ledger entries whose TTL ran out (then re-placed).", ledger["expired"]
        )

    def _instances(self, view: ClusterView) -> Iterator[Metric]:
        families = {
            "in_flight": _instance_gauge("exo_instance_in_flight", "Tasks confirmed by the worker."),
            "pending": _instance_gauge("exo_instance_pending", "Tasks assigned, awaiting confirmation."),
            "unowned": _instance_gauge(
                "exo_instance_unowned", "Tasks the engine still runs that no live task owns (being stopped)."
            ),
            "prefill_tokens": _instance_gauge(
                "exo_instance_prefill_tokens", "Prompt tokens the engine still has to process."
            ),
            "decoding": _instance_gauge("exo_instance_decoding", "Sequences the engine is decoding."),
            "prefill_rate": _instance_gauge(
                "exo_instance_prefill_rate", "Measured prompt tokens per second (0: not yet)."
            ),
            "decode_rate": _instance_gauge(
                "exo_instance_decode_rate", "Measured decode steps per second (0: not yet)."
            ),
            "first_token_wait": _instance_gauge(
                "exo_instance_first_token_wait_seconds",
                "Estimated seconds to a short request's first token if placed there now.",
            ),
            "max": _instance_gauge("exo_instance_max_concurrency", "Concurrent task slots."),
            "ready": _instance_gauge(
                "exo_instance_ready", "1 when the instance is ready and its node alive."
            ),
            "cache_bytes": _instance_gauge(
                "exo_instance_prompt_cache_bytes", "Bytes held by the instance's prompt (KV) cache."
            ),
        }
        cache = {
            outcome: CounterMetricFamily(f"exo_instance_prompt_cache_{outcome}", doc, labels=_INSTANCE_LABELS)
            for outcome, doc in (
                ("hits", "Requests whose prompt reused the instance's prompt cache."),
                ("misses", "Requests whose prompt reused nothing from it."),
                ("reused_tokens", "Prompt tokens taken from the cache instead of processed again."),
                ("prompt_tokens", "All prompt tokens of the instance's requests, reused or not."),
            )
        }
        completed = CounterMetricFamily(
            "exo_instance_completed", "Tasks finished on the instance.", labels=_INSTANCE_LABELS
        )
        failed = CounterMetricFamily(
            "exo_instance_failed", "Tasks failed on the instance.", labels=_INSTANCE_LABELS
        )
        for row in view.instances:
            labels = [row.instance_id, row.node_id, row.model]
            families["in_flight"].add_metric(labels, row.in_flight)
            families["pending"].add_metric(labels, row.pending)
            families["unowned"].add_metric(labels, row.unowned)
            families["prefill_tokens"].add_metric(labels, row.prefill_tokens)
            families["decoding"].add_metric(labels, row.decoding)
            families["prefill_rate"].add_metric(labels, row.prefill_rate)
            families["decode_rate"].add_metric(labels, row.decode_rate)
            families["first_token_wait"].add_metric(labels, row.first_token_wait)
            families["max"].add_metric(labels, row.max_concurrency)
            families["ready"].add_metric(labels, 1 if row.status == InstanceStatus.READY else 0)
            completed.add_metric(labels, row.completed)
            failed.add_metric(labels, row.failed)
            families["cache_bytes"].add_metric(labels, row.prompt_cache_bytes)
            cache["hits"].add_metric(labels, row.prompt_cache_hits)
            cache["misses"].add_metric(labels, row.prompt_cache_misses)
            cache["reused_tokens"].add_metric(labels, row.prompt_cache_reused_tokens)
            cache["prompt_tokens"].add_metric(labels, row.prompt_tokens)
        yield from families.values()
        yield from cache.values()
        yield completed
        yield failed

    def _nodes(self, view: ClusterView) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "exo_node_up", "1 while the node heartbeats, 0 once declared dead.", labels=["node"]
        )
        subscribed = GaugeMetricFamily(
            "exo_node_subscribed", "1 while the node's bus subscription is live.", labels=["node"]
        )
        age = GaugeMetricFamily(
            "exo_node_heartbeat_age_seconds", "Seconds since the node's last heartbeat.", labels=["node"]
        )
        for row in view.nodes:
            up.add_metric([row.node_id], 1 if row.alive else 0)
            subscribed.add_metric([row.node_id], 1 if row.subscribed else 0)
            age.add_metric([row.node_id], row.last_heartbeat_age)
        yield up
        yield subscribed
        yield age

    def _bus(self) -> Iterator[Metric]:
        bus = self.runtime.bus
        counters = bus.counters if bus is not None else None
        gaps = bus.sequences.gaps if bus is not None else {}
        received = counters.received if counters is not None else {}
        sent = counters.sent if counters is not None else {}
        yield _labelled_counter(
            "exo_bus_messages_received", "Worker messages received, by type.", "type", received.items()
        )
        yield _labelled_counter(
            "exo_bus_messages_sent", "Master messages sent, by type.", "type", sent.items()
        )
        yield _counter(
            "exo_bus_sequence_gaps",
            "Bus messages missed (sequence gaps), all publishers.",
            sum(gaps.values()),
        )
        yield _labelled_counter(
            "exo_bus_sequence_gaps_by_origin",
            'Bus messages missed, per publisher (past 64 publishers, under origin="other").',
            "origin",
            gaps.items(),
        )
        yield _counter(
            "exo_bus_unsubscriptions_ignored",
            "Keyless unsubscriptions a peer sent on a plaintext bus (only a closing connection counts).",
            counters.ignored_unsubscriptions if counters is not None else 0,
        )
        yield _counter(
            "exo_bus_malformed_frames",
            "Received frames that failed to decode.",
            counters.malformed if counters else 0,
        )
        yield _counter(
            "exo_bus_duplicate_node_messages",
            "Messages refused from a second live process using an existing node id.",
            counters.refused if counters else 0,
        )
        yield _counter(
            "exo_bus_held_messages",
            "Messages dropped from a restarted worker while its old process might still be alive.",
            counters.held if counters else 0,
        )
        refusals = bus.curve.counters.refusals if bus is not None and bus.curve is not None else {}
        yield _labelled_counter(
            "exo_bus_refusals", "Bus peers refused at the handshake, by reason.", "reason", refusals.items()
        )
        drops = bus.guard.drops if bus is not None else {}
        yield _labelled_counter(
            "exo_bus_identity_drops", "Worker messages dropped by identity checks.", "reason", drops.items()
        )


class MasterMetrics:
    """One runtime's registry: the collector plus the latency histograms its observers feed."""

    def __init__(self, runtime: MasterRuntime, inference: InferenceMetrics | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(MasterCollector(runtime))
        if inference is not None:
            inference.register(self.registry)
        self.decision = Histogram(
            "exo_placement_decision_seconds",
            "Core time to handle one submission (placement decision, queueing or rejection).",
            buckets=DECISION_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "exo_queue_wait_seconds",
            "Time from submission to placement (0 when placed at once), per placement.",
            buckets=QUEUE_WAIT_BUCKETS,
            registry=self.registry,
        )
        runtime.decision_observers.append(self.decision.observe)
        runtime.effect_observers.append(self._on_effect)

    def _on_effect(self, effect: Effect) -> None:
        if isinstance(effect, TaskPlaced):
            self.queue_wait.observe(effect.waited)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def metrics_route(runtime: MasterRuntime, inference: InferenceMetrics | None = None) -> Route:
    metrics = MasterMetrics(runtime, inference)

    async def serve(request: Request) -> Response:
        # Rendered on the loop, not in a thread: the collector reads state the loop mutates.
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return Route("/metrics", serve, methods=["GET"])
