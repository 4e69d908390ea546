"""A hand-driven bus peer for security tests: real sockets, the real codec, any key (or none).

It connects like a worker (a PUB to the master's inbox, a SUB to its publish port) and can stamp
any envelope, so a test can forge what a malicious but authorized node would send. Handshakes
are observed through socket monitors, so tests wait on the outcome, never on a sleep.
"""

from __future__ import annotations

import contextlib
import socket
import time
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from exo_master.devtools.launcher import LocalCluster
from protocol import codec
from protocol.envelope import Envelope
from protocol.keys import Keypair
from protocol.messages import WorkerMessage

_OUTCOMES = {
    zmq.EVENT_HANDSHAKE_SUCCEEDED: "ok",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "refused",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "failed",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "failed",
}


class BusPeer:
    def __init__(
        self,
        cluster: LocalCluster,
        keypair: Keypair | None,
        master_public: bytes | None,
        subscribe: tuple[bytes, ...] = (),
    ) -> None:
        self.ctx = zmq.Context()
        self.pub = self._socket(zmq.PUB, keypair, master_public)
        self.sub = self._socket(zmq.SUB, keypair, master_public)
        for topic in subscribe:
            self.sub.setsockopt(zmq.SUBSCRIBE, topic)
        self.pub_monitor = self.pub.get_monitor_socket()
        self.sub_monitor = self.sub.get_monitor_socket()
        self.pub_endpoint = f"tcp://127.0.0.1:{cluster.bus_port + 1}"
        self.sub_endpoint = f"tcp://127.0.0.1:{cluster.bus_port}"
        self.pub.connect(self.pub_endpoint)
        self.sub.connect(self.sub_endpoint)
        self._seq = 0

    def wait_admitted(self, timeout: float = 20.0) -> None:
        """Until both sockets are through the handshake, re-dialling after each refusal (a key just
        added to the directory is seen by the master's next poll)."""
        deadline = time.monotonic() + timeout
        for sock, monitor, endpoint in (
            (self.pub, self.pub_monitor, self.pub_endpoint),
            (self.sub, self.sub_monitor, self.sub_endpoint),
        ):
            while (outcome := self.handshake(monitor, deadline - time.monotonic())) != "ok":
                assert outcome == "refused", outcome
                sock.disconnect(endpoint)
                sock.connect(endpoint)

    def _socket(self, kind: int, keypair: Keypair | None, master_public: bytes | None) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if keypair is not None:
            assert master_public is not None
            sock.curve_secretkey = keypair.secret
            sock.curve_publickey = keypair.public
            sock.curve_serverkey = master_public
        return sock

    @staticmethod
    def handshake(monitor: zmq.Socket[bytes], timeout: float = 15.0) -> str:
        """The first handshake outcome on a socket: ok | refused | failed."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if monitor.poll(int(left * 1000) + 1):
                event: dict[str, Any] = dict(recv_monitor_message(monitor))
                outcome = _OUTCOMES.get(event["event"])
                if outcome is not None:
                    return outcome
        raise TimeoutError("no handshake outcome")

    def send(self, origin: str, body: WorkerMessage) -> None:
        self._seq += 1
        envelope = Envelope(origin=origin, seq=self._seq, sent_at=time.time(), body=body)
        self.pub.send_multipart(codec.encode_frames(codec.MASTER_TOPIC, envelope))

    def send_raw(self, frames: list[bytes]) -> None:
        self.pub.send_multipart(frames)

    def received(self) -> list[tuple[bytes, Envelope]]:
        out = []
        while self.sub.poll(0):
            out.append(codec.decode_frames(self.sub.recv_multipart()))
        return out

    def close(self) -> None:
        for sock in (self.pub_monitor, self.sub_monitor, self.pub, self.sub):
            sock.close(linger=0)
        self.ctx.term()


def raw_subscription_frames(port: int, frames: list[bytes], host: str = "127.0.0.1") -> None:
    """Speak ZMTP 3.0 by hand as an XSUB peer (NULL mechanism) and send these (un)subscription
    frames as they are. A libzmq XSUB would drop an unsubscription for a topic it never subscribed;
    a stranger on the network is under no such rule."""
    greeting = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" * 32
    ready_body = (
        b"\x05READY" + bytes([len(b"Socket-Type")]) + b"Socket-Type" + (4).to_bytes(4, "big") + b"XSUB"
    )
    with socket.create_connection((host, port), timeout=10) as conn:
        conn.sendall(greeting)
        received = b""
        while len(received) < 64:  # the master's greeting
            chunk = conn.recv(64 - len(received))
            assert chunk, "the master closed the connection during the greeting"
            received += chunk
        conn.sendall(b"\x04" + bytes([len(ready_body)]) + ready_body)
        for frame in frames:
            assert len(frame) < 256
            conn.sendall(b"\x00" + bytes([len(frame)]) + frame)
        conn.settimeout(0.5)
        with contextlib.suppress(TimeoutError, OSError):
            conn.recv(4096)  # the master's READY: the frames went through the handshake
