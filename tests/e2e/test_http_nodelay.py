"""TCP_NODELAY on the master's accepted HTTP connections, read from the master process itself.

Without it every keep-alive request after the first waits ~40 ms for the client's delayed ACK
(Nagle): see issue 11. The option is read on the master's own accepted socket, duplicated into this
process with pidfd_getfd(2) (Linux >= 5.6; the test process starts the master, so it may trace it).
"""

from __future__ import annotations

import ctypes
import os
import socket
import sys

import httpx
import pytest

from tests.e2e.conftest import ClusterFactory

pytestmark = pytest.mark.e2e

_SYS_PIDFD_GETFD = 438  # the same number on every Linux architecture (new syscalls are unified)


def _peer_socket_nodelay(pid: int, local: tuple[str, int], remote: tuple[str, int]) -> int | None:
    """TCP_NODELAY of process `pid`'s socket connected local <-> remote (its view), None if none is."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            except FileNotFoundError:
                continue
            fd = libc.syscall(_SYS_PIDFD_GETFD, pidfd, int(name), 0)
            if fd < 0:
                pytest.skip(f"pidfd_getfd refused: {os.strerror(ctypes.get_errno())}")
            with socket.socket(fileno=fd) as sock:
                try:
                    if sock.getsockname()[:2] != local or sock.getpeername()[:2] != remote:
                        continue
                except OSError:  # listening or unconnected sockets have no peer
                    continue
                return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
    finally:
        os.close(pidfd)
    return None


@pytest.mark.skipif(sys.platform != "linux", reason="reads another process's socket via pidfd_getfd")
def test_accepted_http_connections_have_tcp_nodelay(start_cluster: ClusterFactory) -> None:
    cluster = start_cluster(workers=1)
    assert cluster.master is not None
    with socket.create_connection(("127.0.0.1", cluster.api_port), timeout=10) as client:
        # One full request/response, so the master has certainly accepted this connection.
        client.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
        assert client.recv(65536).startswith(b"HTTP/1.1 200")
        mine = client.getsockname()[:2]
        nodelay = _peer_socket_nodelay(cluster.master.pid, ("127.0.0.1", cluster.api_port), mine)
    assert nodelay is not None, "the master holds no socket for this connection"
    assert nodelay != 0


def test_keep_alive_requests_do_not_wait_for_delayed_acks(start_cluster: ClusterFactory) -> None:
    """Many chat completions on one kept-alive connection all succeed on that one connection."""
    cluster = start_cluster(workers=1, sim_tokens_per_s=1000.0)
    body = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    peers = set()
    with httpx.Client(base_url=cluster.api_url, limits=limits, timeout=30) as client:
        for _ in range(50):
            response = client.post("/v1/chat/completions", json=body)
            assert response.status_code == 200
            stream = response.extensions["network_stream"]
            peers.add(stream.get_extra_info("client_addr"))
    assert len(peers) == 1  # kept alive: the latency of this path is measured by `make bench`
