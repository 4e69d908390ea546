"""A long mixed soak against a local cluster: does anything grow that should not?

    python scripts/soak.py --minutes 30 --out bench/results/soak.json      (also: make soak)

A plaintext local cluster (master + 3 sim workers) serves, for the whole run:
- a closed loop of `--concurrency` clients: plain and streamed chat completions of random length;
  one in ten streams hangs up after its first tokens (the master cancels the task), one in ten
  plain requests gives up after a short client timeout;
- every 2 minutes a worker is killed (SIGKILL) and started again under the same node id;
- every 90 s a flood of 1,100 heartbeats from made-up node ids (new ids each time, and as many
  envelope origins) that never subscribe.
Every `--sample-every` seconds it records the RSS and open descriptors of the master and of each
worker (from /proc) and the request counts, writes them all to `--out` as JSON, and prints a table
at the end. Flat after warm-up (within 10%) means no leak.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import typer

from exo_master.devtools.launcher import ClusterSpec, LocalCluster, wait_for
from protocol.ids import NodeId
from protocol.messages import WorkerHeartbeat

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/e2e, from a checkout
from tests.e2e.buspeer import BusPeer

WORKERS = 3
FLOOD = 1_100


@dataclass
class Counts:
    ok: int = 0
    errors: int = 0  # non-200 answers (a worker killed mid-task: 503 instance_lost is expected)
    hung_up: int = 0  # streams the client abandoned on purpose
    timeouts: int = 0  # plain requests the client abandoned on purpose
    floods: int = 0
    restarts: int = 0


@dataclass
class Sample:
    t: float
    rss_mb: dict[str, float]
    fds: dict[str, int]
    counts: dict[str, int]


@dataclass
class Soak:
    cluster: LocalCluster
    counts: Counts = field(default_factory=Counts)
    samples: list[Sample] = field(default_factory=list)

    def pids(self) -> dict[str, int]:
        assert self.cluster.master is not None
        out = {"master": self.cluster.master.pid}
        out.update({name: proc.pid for name, proc in self.cluster.workers.items() if proc.poll() is None})
        return out

    def sample(self, started: float) -> Sample:
        rss, fds = {}, {}
        for name, pid in self.pids().items():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
                rss[name] = round(kb / 1024, 1)
                fds[name] = len(os.listdir(f"/proc/{pid}/fd"))
            except (OSError, StopIteration):
                continue  # a worker being restarted
        sample = Sample(round(time.monotonic() - started, 1), rss, fds, asdict(self.counts))
        self.samples.append(sample)
        return sample


async def client_loop(soak: Soak, rng: random.Random, deadline: float) -> None:
    api = soak.cluster.api_url
    async with httpx.AsyncClient(base_url=api, timeout=120) as http:
        while time.monotonic() < deadline:
            body = {
                "model": "sim-model",
                "messages": [{"role": "user", "content": f"soak {rng.random()}"}],
                "max_tokens": rng.randint(4, 96),
            }
            roll = rng.random()
            try:
                if roll < 0.5:
                    async with http.stream(
                        "POST", "/v1/chat/completions", json={**body, "stream": True}
                    ) as r:
                        hang_up = rng.random() < 0.1
                        seen = 0
                        async for _ in r.aiter_lines():
                            seen += 1
                            if hang_up and seen >= 3:
                                soak.counts.hung_up += 1
                                break
                        else:
                            soak.counts.ok += r.status_code == 200
                            soak.counts.errors += r.status_code != 200
                elif roll < 0.55:
                    try:
                        await http.post("/v1/chat/completions", json=body, timeout=0.05)
                    except httpx.TimeoutException:
                        soak.counts.timeouts += 1
                else:
                    r = await http.post("/v1/chat/completions", json=body)
                    soak.counts.ok += r.status_code == 200
                    soak.counts.errors += r.status_code != 200
            except httpx.HTTPError:
                soak.counts.errors += 1


def flood(cluster: LocalCluster, round_: int) -> None:
    peer = BusPeer(cluster, None, None)
    try:
        for i in range(FLOOD):
            node = f"fake{round_}-{i}-{uuid.uuid4().hex[:6]}"
            peer.send(node, WorkerHeartbeat(node_id=NodeId(node), instances=()))
    finally:
        peer.close()


async def chaos_loop(soak: Soak, deadline: float) -> None:
    cluster = soak.cluster
    next_restart = time.monotonic() + 120
    next_flood = time.monotonic() + 90
    victim = 0
    while time.monotonic() < deadline:
        await asyncio.sleep(1.0)  # wait-ok: the chaos schedule's tick
        now = time.monotonic()
        if now >= next_flood:
            await asyncio.to_thread(flood, cluster, soak.counts.floods)
            soak.counts.floods += 1
            next_flood = now + 90
        if now >= next_restart:
            name = f"node{victim % WORKERS + 1}"
            victim += 1
            proc = cluster.workers[name]
            proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(proc.wait)
            cluster.start_worker(name)
            soak.counts.restarts += 1
            next_restart = now + 120


async def sample_loop(soak: Soak, started: float, deadline: float, every: float, out: Path) -> None:
    while True:
        s = soak.sample(started)
        out.write_text(json.dumps([asdict(x) for x in soak.samples], indent=1))
        print(f"t={s.t:7.1f}s rss={s.rss_mb} fds={s.fds} {s.counts}", flush=True)
        if time.monotonic() >= deadline:
            return
        await asyncio.sleep(min(every, max(0.0, deadline - time.monotonic())))  # wait-ok: the sampling period


async def run(soak: Soak, minutes: float, concurrency: int, every: float, out: Path, seed: int) -> None:
    started = time.monotonic()
    deadline = started + minutes * 60
    rng = random.Random(seed)
    await asyncio.gather(
        sample_loop(soak, started, deadline, every, out),
        chaos_loop(soak, deadline),
        *(client_loop(soak, random.Random(rng.random()), deadline) for _ in range(concurrency)),
    )


def table(samples: list[Sample]) -> str:
    names = sorted({n for s in samples for n in s.rss_mb}, key=lambda n: (n != "master", n))
    head = f"{'t (s)':>8} " + " ".join(f"{n + ' MB':>11} {n + ' fd':>9}" for n in names) + f" {'ok':>8}"
    rows = [head]
    for s in samples:
        cells = " ".join(f"{s.rss_mb.get(n, float('nan')):>11.1f} {s.fds.get(n, 0):>9}" for n in names)
        rows.append(f"{s.t:>8.0f} {cells} {s.counts['ok']:>8}")
    return "\n".join(rows)


def main(
    minutes: float = typer.Option(30.0, help="How long to run."),
    concurrency: int = typer.Option(24, help="Concurrent clients."),
    sample_every: float = typer.Option(15.0, help="Seconds between RSS/fd samples."),
    out: Path = typer.Option(Path("bench/results/soak.json"), help="Where the samples go (JSON)."),
    seed: int = typer.Option(0),
) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="exo-soak-"))
    spec = ClusterSpec(
        workers=WORKERS,
        max_concurrency=16,
        sim_tokens_per_s=200.0,
        curve=False,
        log_dir=log_dir,
        log_format="json",
    )
    with LocalCluster(spec) as cluster:
        cluster.start()
        soak = Soak(cluster)
        threading.excepthook = lambda args: print(f"soak: thread failed: {args.exc_value}", flush=True)
        asyncio.run(run(soak, minutes, concurrency, sample_every, out, seed))
        wait_for(lambda: cluster.state() is not None, 30, "the master after the soak")
    print(table(soak.samples))
    print(f"samples: {out}; logs: {log_dir}")


if __name__ == "__main__":
    typer.run(main)
