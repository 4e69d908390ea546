"""Does a flood of made-up peers grow the master? RSS and /metrics size before and after.

    python scripts/measure_peer_flood.py --count 100000

Two floods against a fresh local master each:
- plaintext: `count` heartbeats, each from its own made-up node id (and so its own envelope origin);
- CURVE: one authorized key cycling `count` incarnations of its own node id while its first
  process keeps heartbeating (each newcomer is held, then refused).
Prints one JSON line per flood: RSS before, right after, and 5 s later; /metrics bytes; nodes
listed; NodeRefused sent.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

import httpx
import typer
import zmq

from exo_master.devtools.launcher import ClusterSpec, LocalCluster, wait_for
from protocol import codec, keys
from protocol.envelope import Envelope
from protocol.ids import NodeId
from protocol.messages import WorkerHeartbeat

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/e2e, from a checkout
from tests.e2e.buspeer import BusPeer


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return round(next(int(x.split()[1]) for x in status.splitlines() if x.startswith("VmRSS:")) / 1024, 1)


def send(peer: BusPeer, origin: str, incarnation: str, seq: int) -> None:
    body = WorkerHeartbeat(node_id=NodeId(origin), instances=())
    envelope = Envelope(origin=origin, seq=seq, sent_at=time.time(), body=body, incarnation=incarnation)
    while True:
        try:
            peer.pub.send_multipart(codec.encode_frames(codec.MASTER_TOPIC, envelope), zmq.NOBLOCK)
            return
        except zmq.Again:
            time.sleep(0.001)  # wait-ok: the PUB's queue is full; let it drain


def measure(cluster: LocalCluster, peer: BusPeer, flood: str, count: int) -> dict[str, object]:
    assert cluster.master is not None
    pid = cluster.master.pid
    metrics = f"{cluster.api_url}/metrics"
    before = rss_mb(pid)
    started = time.monotonic()
    if flood == "origins":
        for i in range(count):
            send(peer, f"fake-{i}-{uuid.uuid4().hex[:8]}", "", 1)
    else:
        for i in range(count):
            send(peer, "cycler", "first", 2 * i + 1)  # the live process
            send(peer, "cycler", uuid.uuid4().hex[:12], 1)  # a newcomer: held, then refused
    took = time.monotonic() - started
    wait_for(lambda: cluster.state() is not None, 30, "the master")
    after = rss_mb(pid)
    time.sleep(5)  # wait-ok: let the fakes age out
    text = httpx.get(metrics, headers=cluster.headers, timeout=30).text
    refused = [
        line
        for line in text.splitlines()
        if line.startswith('exo_bus_messages_sent_total{type="NodeRefused"')
    ]
    state = cluster.state() or {}
    return {
        "flood": flood,
        "count": count,
        "send_s": round(took, 1),
        "rss_before_mb": before,
        "rss_after_mb": after,
        "rss_5s_later_mb": rss_mb(pid),
        "metrics_bytes": len(text),
        "nodes_listed": len(state.get("nodes", [])),
        "node_refused_sent": float(refused[0].split()[-1]) if refused else 0,
    }


def main(count: int = typer.Option(100_000)) -> None:
    with LocalCluster(ClusterSpec(workers=0, curve=False)) as cluster:
        cluster.start_master()
        cluster.wait_healthy(30)
        peer = BusPeer(cluster, None, None)
        time.sleep(1)  # wait-ok: the PUB's connection (slow joiner)
        print(json.dumps(measure(cluster, peer, "origins", count)), flush=True)
        peer.close()
    with LocalCluster(ClusterSpec(workers=0, curve=True)) as cluster:
        cluster.start_master()
        cluster.wait_healthy(30)
        assert cluster.keys is not None
        _, secret = cluster.keys.worker("cycler")
        time.sleep(1.5)  # wait-ok: the master's directory poll picks the new key up
        peer = BusPeer(cluster, keys.load_keypair(secret), keys.load_public(cluster.keys.master_public))
        peer.wait_admitted()
        time.sleep(1)  # wait-ok: the PUB's connection (slow joiner)
        print(json.dumps(measure(cluster, peer, "incarnations", count)), flush=True)
        peer.close()


if __name__ == "__main__":
    typer.run(main)
