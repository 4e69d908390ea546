"""Many simulated workers in one process, speaking the real bus protocol (benchmark 5).

    python -m benchkit.fakeworkers --master 127.0.0.1:52416 --first 0 --count 250

Each fake node publishes a full WorkerHeartbeat (one ready instance of the model) every interval,
spread evenly over the interval as independent workers would be, and subscribes to its node topic.
An AssignTask is answered at once (TaskAccepted, one TaskChunk, TaskFinished), so requests placed
on fake instances complete and the master's decision latency can be measured under heartbeat load.
One PUB and one SUB serve all the fake nodes of a process; it runs for --seconds, then exits.
"""

from __future__ import annotations

import argparse
import time

import zmq

from protocol import codec
from protocol.envelope import Stamper
from protocol.ids import InstanceId, ModelId, NodeId
from protocol.messages import (
    AssignTask,
    FinishReason,
    InstanceReport,
    TaskAccepted,
    TaskChunk,
    TaskFinished,
    Usage,
    WorkerHeartbeat,
    WorkerMessage,
)


class FakeWorkers:
    def __init__(self, master: str, first: int, count: int, model: str, max_concurrency: int) -> None:
        self.ctx = zmq.Context()
        self.pub = self.ctx.socket(zmq.PUB)
        self.sub = self.ctx.socket(zmq.SUB)
        for sock in (self.pub, self.sub):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 100_000)
            sock.setsockopt(zmq.RCVHWM, 100_000)
        host, port = master.rsplit(":", 1)
        self.pub.connect(f"tcp://{host}:{int(port) + 1}")
        self.sub.connect(f"tcp://{host}:{port}")
        self.nodes = [NodeId(f"fake{first + i:05d}") for i in range(count)]
        self.stampers = {n: Stamper(origin=n) for n in self.nodes}
        self.model = ModelId(model)
        self.max_concurrency = max_concurrency
        for node in self.nodes:
            self.sub.setsockopt(zmq.SUBSCRIBE, codec.node_topic(node))
        self.answered = 0

    def send(self, node: NodeId, body: WorkerMessage) -> None:
        envelope = self.stampers[node].stamp(body, time.time())
        self.pub.send_multipart(codec.encode_frames(codec.MASTER_TOPIC, envelope), flags=zmq.NOBLOCK)

    def heartbeat(self, node: NodeId) -> None:
        report = InstanceReport(
            instance_id=InstanceId(f"{node}/0"), model=self.model, max_concurrency=self.max_concurrency
        )
        self.send(node, WorkerHeartbeat(node_id=node, instances=(report,)))

    def answer(self, frames: list[bytes]) -> None:
        try:
            _, envelope = codec.decode_frames(frames)
        except codec.ProtocolError:
            return
        msg = envelope.body
        if not isinstance(msg, AssignTask):
            return
        node, task, inst = msg.node_id, msg.task_id, msg.instance_id
        self.send(node, TaskAccepted(node_id=node, task_id=task, instance_id=inst))
        self.send(node, TaskChunk(node_id=node, task_id=task, instance_id=inst, index=0, text="x"))
        usage = Usage(prompt_tokens=1, completion_tokens=1)
        finished = TaskFinished(
            node_id=node, task_id=task, instance_id=inst, finish_reason=FinishReason.LENGTH, usage=usage
        )
        self.send(node, finished)
        self.answered += 1

    def run(self, interval: float, seconds: float) -> None:
        step = interval / max(1, len(self.nodes))
        next_beat = time.monotonic()
        end = next_beat + seconds
        index = 0
        while time.monotonic() < end:
            now = time.monotonic()
            while next_beat <= now:
                self.heartbeat(self.nodes[index])
                index = (index + 1) % len(self.nodes)
                next_beat += step
            if self.sub.poll(timeout=max(0, int((next_beat - time.monotonic()) * 1000))):
                for _ in range(1000):
                    try:
                        self.answer(self.sub.recv_multipart(zmq.NOBLOCK))
                    except zmq.Again:
                        break

    def close(self) -> None:
        self.pub.close()
        self.sub.close()
        self.ctx.term()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--master", required=True, help="HOST:PORT of the master's bus")
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--model", default="sim-model")
    parser.add_argument("--max-concurrency", type=int, default=64)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, default=600.0, help="exit after this long")
    args = parser.parse_args()
    workers = FakeWorkers(args.master, args.first, args.count, args.model, args.max_concurrency)
    try:
        workers.run(args.interval, args.seconds)
    finally:
        workers.close()


if __name__ == "__main__":
    main()
