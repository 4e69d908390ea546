"""The cost of CURVE on the bus: with vs without, measured in the same run on this machine.

Two parts, each alternating plaintext and CURVE rounds so both see the same machine load:
- bus: raw sockets and the real codec, a worker-like PUB to a master-like SUB (behind the ZAP
  authenticator for CURVE): one-way throughput of TaskChunk envelopes (small and 1 KiB text) with
  the process CPU time per message (libzmq's I/O threads, where CURVE works, included), and the
  round trip worker -> master -> worker (PUB/SUB then XPUB/SUB back), p50/p99.
- cluster: a real master and a sim worker per mode (launched like `make run`, CURVE keys made by
  the launcher), up at once with a second plaintext cluster as an A/A control (the spread between
  two identical set-ups, printed next to the CURVE difference): sequential 1-token completions
  (latency p50/p99, a new connection each) and a concurrent batch of 64-token completions
  (requests/s, tokens/s).

    python scripts/bench_curve.py            # prints a table, writes nothing
    python scripts/bench_curve.py --quick --out bench-curve.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import zmq
from zmq.auth.thread import ThreadAuthenticator

from exo_master.devtools.launcher import ClusterSpec, LocalCluster
from exo_master.devtools.ports import free_port_pair
from protocol import codec
from protocol.envelope import Stamper
from protocol.ids import InstanceId, NodeId, TaskId
from protocol.messages import TaskChunk

MODES = ("plaintext", "curve")


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---- bus ---------------------------------------------------------------------------------------


class BusPair:
    """A master side (SUB in, XPUB out) and a worker side (PUB out, SUB in) on loopback."""

    def __init__(self, curve: bool) -> None:
        self.ctx = zmq.Context()
        self.auth: ThreadAuthenticator | None = None
        port = free_port_pair()
        self.m_in, self.m_out = self.ctx.socket(zmq.SUB), self.ctx.socket(zmq.XPUB)
        self.w_out, self.w_in = self.ctx.socket(zmq.PUB), self.ctx.socket(zmq.SUB)
        for sock in (self.m_in, self.m_out, self.w_out, self.w_in):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
        if curve:
            server_public, server_secret = zmq.curve_keypair()
            client_public, client_secret = zmq.curve_keypair()
            self.auth = ThreadAuthenticator(self.ctx)
            self.auth.start()
            self.auth.configure_curve_callback("*", _Allow(client_public))
            for sock in (self.m_in, self.m_out):
                sock.curve_secretkey, sock.curve_publickey = server_secret, server_public
                sock.curve_server = True
            for sock in (self.w_out, self.w_in):
                sock.curve_secretkey, sock.curve_publickey = client_secret, client_public
                sock.curve_serverkey = server_public
        self.m_in.setsockopt(zmq.SUBSCRIBE, b"")
        self.w_in.setsockopt(zmq.SUBSCRIBE, b"")
        self.m_in.bind(f"tcp://127.0.0.1:{port + 1}")
        self.m_out.bind(f"tcp://127.0.0.1:{port}")
        self.w_out.connect(f"tcp://127.0.0.1:{port + 1}")
        self.w_in.connect(f"tcp://127.0.0.1:{port}")
        self.m_out.recv()  # the worker's subscription: the return path is live
        self.stamper = Stamper(NodeId("bench"))
        self._warm()

    def _warm(self) -> None:
        """Until a message gets through (the PUB drops until the master's subscription lands)."""
        deadline = time.monotonic() + 10
        while not self.m_in.poll(10):
            self.w_out.send_multipart(self.frames("warm"))
            assert time.monotonic() < deadline, "the bus did not come up"
        while self.m_in.poll(50):
            self.m_in.recv_multipart()

    def frames(self, text: str, index: int = 0) -> list[bytes]:
        node, task, instance = NodeId("bench"), TaskId("t"), InstanceId("bench/0")
        body = TaskChunk(node_id=node, task_id=task, instance_id=instance, index=index, text=text)
        return codec.encode_frames(codec.MASTER_TOPIC, self.stamper.stamp(body, time.time()))

    def throughput(self, n: int, text: str) -> tuple[float, float]:
        """(messages per second, process CPU microseconds per message), worker PUB -> master SUB,
        decoded on arrival. The CPU time counts every thread, libzmq's I/O threads (where CURVE
        encrypts and decrypts) included, so it shows the cost even when Python is the bottleneck."""
        got = 0

        def receive() -> None:
            nonlocal got
            for _ in range(n):
                codec.decode_frames(self.m_in.recv_multipart())
                got += 1

        payloads = [self.frames(text, i) for i in range(n)]
        reader = threading.Thread(target=receive)
        reader.start()
        started, cpu = time.perf_counter(), time.process_time()
        for frames in payloads:
            self.w_out.send_multipart(frames)
        reader.join(timeout=120)
        assert got == n, f"lost {n - got} of {n} messages"
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
        return n / wall, cpu / n * 1e6

    def round_trips(self, n: int) -> list[float]:
        """Seconds per worker -> master -> worker round trip, one at a time."""
        out = []
        for i in range(n):
            started = time.perf_counter()
            self.w_out.send_multipart(self.frames("ping", i))
            _, envelope = codec.decode_frames(self.m_in.recv_multipart())
            self.m_out.send_multipart(codec.encode_frames(codec.BROADCAST_TOPIC, envelope))
            codec.decode_frames(self.w_in.recv_multipart())
            out.append(time.perf_counter() - started)
        return out

    def close(self) -> None:
        for sock in (self.m_in, self.m_out, self.w_out, self.w_in):
            sock.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()


class _Allow:
    def __init__(self, key: bytes) -> None:
        self.key = key

    def callback(self, domain: str, key: bytes) -> bool:
        return key == self.key


def bench_bus(rounds: int, messages: int, pings: int) -> dict[str, Any]:
    """Both pairs stay up; each round measures both modes, in alternating order, block by block."""
    keys = ("msgs_per_s_small", "cpu_us_per_msg_small", "msgs_per_s_1kib", "cpu_us_per_msg_1kib")
    samples: dict[str, dict[str, list[float]]] = {m: {k: [] for k in keys} for m in MODES}
    rtts: dict[str, list[float]] = {m: [] for m in MODES}
    pairs = {mode: BusPair(curve=mode == "curve") for mode in MODES}
    try:
        for r in range(rounds):
            for mode in MODES if r % 2 == 0 else MODES[::-1]:
                pair, s = pairs[mode], samples[mode]
                rate, cpu = pair.throughput(messages, "token")
                s["msgs_per_s_small"].append(rate)
                s["cpu_us_per_msg_small"].append(cpu)
                rate, cpu = pair.throughput(messages // 4, "x" * 1024)
                s["msgs_per_s_1kib"].append(rate)
                s["cpu_us_per_msg_1kib"].append(cpu)
                rtts[mode] += pair.round_trips(pings)
    finally:
        for pair in pairs.values():
            pair.close()
    result: dict[str, Any] = {}
    for mode in MODES:
        row = {k: round(statistics.median(v), 2) for k, v in samples[mode].items()}
        row["round_trip_p50_us"] = round(_pct(rtts[mode], 0.5) * 1e6, 1)
        row["round_trip_p99_us"] = round(_pct(rtts[mode], 0.99) * 1e6, 1)
        result[mode] = row
    result["curve_over_plaintext"] = {
        key: round(result["curve"][key] / result["plaintext"][key], 3) for key in result["plaintext"]
    }
    return result


# ---- cluster -----------------------------------------------------------------------------------


async def _latencies(url: str, n: int) -> list[float]:
    body = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    out = []
    # A new connection per request (as curl): on a reused one, every request would wait ~40 ms for
    # the client's delayed ACK (uvicorn writes headers and body apart), hiding what is measured here.
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        for _ in range(n):
            started = time.perf_counter()
            response = await client.post("/v1/chat/completions", json=body)
            out.append(time.perf_counter() - started)
            assert response.status_code == 200, response.text
    return out


async def _batch(url: str, n: int, max_tokens: int) -> tuple[float, float]:
    body = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        started = time.perf_counter()
        responses = await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(n)))
        elapsed = time.perf_counter() - started
    assert all(r.status_code == 200 for r in responses), "a request failed"
    tokens = sum(r.json()["usage"]["completion_tokens"] for r in responses)
    return n / elapsed, tokens / elapsed


# The cluster part adds an A/A control: a second plaintext cluster measured the same way, so the
# spread between two identical set-ups on this machine is printed next to the CURVE difference.
CLUSTER_MODES = ("plaintext", "curve", "plaintext_control")


def bench_cluster(rounds: int, pings: int, batch: int, log_dir: Path) -> dict[str, Any]:
    clusters = {
        mode: LocalCluster(
            ClusterSpec(
                workers=1,
                curve=mode == "curve",
                sim_tokens_per_s=5000,
                max_concurrency=batch,
                log_dir=log_dir / mode,
                master_args=["--log-level", "warning"],
                worker_args=["--log-level", "warning"],
            )
        )
        for mode in CLUSTER_MODES
    }
    lat: dict[str, list[float]] = {m: [] for m in CLUSTER_MODES}
    rps: dict[str, list[float]] = {m: [] for m in CLUSTER_MODES}
    tps: dict[str, list[float]] = {m: [] for m in CLUSTER_MODES}
    try:
        for cluster in clusters.values():
            cluster.start()
            asyncio.run(_batch(cluster.api_url, batch, 64))  # warm-up, not counted
        for r in range(rounds):
            shift = r % len(CLUSTER_MODES)  # rotate the order: none is always first
            for mode in CLUSTER_MODES[shift:] + CLUSTER_MODES[:shift]:
                cluster = clusters[mode]
                lat[mode] += asyncio.run(_latencies(cluster.api_url, pings))
                requests, tokens = asyncio.run(_batch(cluster.api_url, batch, 64))
                rps[mode].append(requests)
                tps[mode].append(tokens)
    finally:
        for cluster in clusters.values():
            cluster.stop()
    result: dict[str, Any] = {}
    for mode in CLUSTER_MODES:
        result[mode] = {
            "latency_p50_ms": round(_pct(lat[mode], 0.5) * 1e3, 3),
            "latency_p99_ms": round(_pct(lat[mode], 0.99) * 1e3, 3),
            "requests_per_s": round(statistics.median(rps[mode]), 1),
            "tokens_per_s": round(statistics.median(tps[mode])),
        }
    for other in ("curve", "plaintext_control"):
        result[f"{other}_over_plaintext"] = {
            key: round(result[other][key] / result["plaintext"][key], 3) for key in result["plaintext"]
        }
    return result


def run(quick: bool) -> dict[str, Any]:
    log_dir = Path(tempfile.mkdtemp(prefix="exo-bench-curve-"))
    if quick:
        bus = bench_bus(rounds=4, messages=10_000, pings=250)
        cluster = bench_cluster(rounds=3, pings=100, batch=32, log_dir=log_dir)
    else:
        bus = bench_bus(rounds=16, messages=20_000, pings=500)
        cluster = bench_cluster(rounds=9, pings=200, batch=64, log_dir=log_dir)
    return {"benchmark": "curve", "quick": quick, "zmq": zmq.zmq_version(), "bus": bus, "cluster": cluster}


def _table(result: dict[str, Any]) -> str:
    lines = [
        "| part | metric | plaintext | curve | curve / plaintext | A/A control / plaintext |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for part in ("bus", "cluster"):
        section = result[part]
        control = section.get("plaintext_control_over_plaintext", {})
        for key, ratio in section["curve_over_plaintext"].items():
            plain, curve = section["plaintext"][key], section["curve"][key]
            lines.append(f"| {part} | {key} | {plain} | {curve} | {ratio} | {control.get(key, '')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="Fewer rounds and messages (about a minute).")
    parser.add_argument("--out", type=Path, help="Also write the result as JSON here.")
    args = parser.parse_args(argv)
    result = run(args.quick)
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
