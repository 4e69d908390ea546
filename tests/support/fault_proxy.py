"""A test-only ZeroMQ proxy between a master and its workers that drops, duplicates and reorders
bus frames in both directions, reproducibly (seeded). A real process on loopback:

    python -m tests.support.fault_proxy --upstream 127.0.0.1:P --listen 127.0.0.1:Q \\
        --drop 0.1 --duplicate 0.1 --reorder 0.1 --seed 1 --stats FILE

Workers connect to Q (and publish to Q+1) as if it were the master. Subscription frames are
forwarded untouched: they ride the TCP connection, which a lossy network does not split from its
data the way PUB/SUB drops messages. On SIGTERM it writes its counts as JSON to FILE and exits.
"""

from __future__ import annotations

import json
import random
import signal
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType

import typer
import zmq


@dataclass
class DirectionStats:
    forwarded: int = 0
    dropped: int = 0
    duplicated: int = 0
    reordered: int = 0


@dataclass
class Faults:
    """What happens to each data frame of one direction."""

    rng: random.Random
    drop: float
    duplicate: float
    reorder: float
    stats: DirectionStats = field(default_factory=DirectionStats)
    held: list[tuple[int, list[bytes]]] = field(default_factory=list)

    def process(self, frames: list[bytes]) -> list[list[bytes]]:
        out: list[list[bytes]] = []
        roll = self.rng.random()
        if roll < self.drop:
            self.stats.dropped += 1
        elif roll < self.drop + self.reorder:
            self.held.append((self.rng.randint(1, 4), frames))  # overtaken by the next 1-4 frames
            self.stats.reordered += 1
        else:
            out.append(frames)
            if self.rng.random() < self.duplicate:
                out.append(frames)
                self.stats.duplicated += 1
        still = []
        for countdown, held in self.held:
            if countdown <= 1:
                out.append(held)
            else:
                still.append((countdown - 1, held))
        self.held = still
        return out

    def flush(self) -> list[list[bytes]]:
        out = [frames for _, frames in self.held]
        self.held = []
        return out


def main(
    upstream: str = typer.Option(..., help="The master's bus HOST:PORT."),
    listen: str = typer.Option(..., help="HOST:PORT for the workers (PORT+1 too)."),
    drop: float = typer.Option(0.0),
    drop_to_master: float = typer.Option(
        -1.0, help="Drop rate from workers to the master (default: --drop)."
    ),
    duplicate: float = typer.Option(0.0),
    reorder: float = typer.Option(0.0),
    seed: int = typer.Option(0),
    stats: Path = typer.Option(..., help="Where to write the counts as JSON on SIGTERM."),
) -> None:
    up_host, up_port = upstream.rsplit(":", 1)
    host, port = listen.rsplit(":", 1)
    ctx = zmq.Context()
    down_xpub = ctx.socket(zmq.XPUB)  # workers' SUB sockets connect here
    down_xpub.setsockopt(zmq.XPUB_VERBOSE, 1)
    down_xpub.bind(f"tcp://{host}:{port}")
    up_xsub = ctx.socket(zmq.XSUB)  # the master's XPUB
    up_xsub.connect(f"tcp://{up_host}:{up_port}")
    down_sub = ctx.socket(zmq.SUB)  # workers' PUB sockets connect here
    down_sub.setsockopt(zmq.SUBSCRIBE, b"")
    down_sub.bind(f"tcp://{host}:{int(port) + 1}")
    up_pub = ctx.socket(zmq.PUB)  # the master's SUB
    up_pub.connect(f"tcp://{up_host}:{int(up_port) + 1}")
    for sock in (down_xpub, up_xsub, down_sub, up_pub):
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)

    rng = random.Random(seed)
    to_workers = Faults(rng, drop, duplicate, reorder)
    to_master = Faults(rng, drop if drop_to_master < 0 else drop_to_master, duplicate, reorder)
    running = True

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    poller = zmq.Poller()
    for sock in (down_xpub, up_xsub, down_sub):
        poller.register(sock, zmq.POLLIN)
    print("fault_proxy.ready", flush=True)
    while running:
        events = dict(poller.poll(20))
        if not events:  # quiet: let held frames go, so nothing waits for traffic that never comes
            for frames in to_workers.flush():
                down_xpub.send_multipart(frames)
            for frames in to_master.flush():
                up_pub.send_multipart(frames)
            continue
        if down_xpub in events:  # a worker (un)subscribed: pass it on to the master's XPUB
            up_xsub.send(down_xpub.recv())
        if up_xsub in events:
            for frames in to_workers.process(up_xsub.recv_multipart()):
                down_xpub.send_multipart(frames)
                to_workers.stats.forwarded += 1
        if down_sub in events:
            for frames in to_master.process(down_sub.recv_multipart()):
                up_pub.send_multipart(frames)
                to_master.stats.forwarded += 1
    stats.write_text(
        json.dumps({"to_workers": asdict(to_workers.stats), "to_master": asdict(to_master.stats)})
    )
    ctx.destroy(linger=0)
    sys.exit(0)


if __name__ == "__main__":
    typer.run(main)
