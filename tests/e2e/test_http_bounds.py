"""HTTP bounds and clean shutdown against a real master: slow and oversized bodies, idle keep-alive
connections, SIGTERM in the middle of a stream, and JSON-only log files."""

from __future__ import annotations

import json
import select
import signal
import socket
from pathlib import Path

import httpx
import pytest

from exo_master.devtools.launcher import LocalCluster
from tests.e2e.conftest import ClusterFactory

pytestmark = pytest.mark.e2e
MODEL = "sim-model"
BOUNDS = ["--body-timeout", "1", "--keep-alive-timeout", "1", "--max-body-bytes", "4096"]


def connect(cluster: LocalCluster) -> socket.socket:
    sock = socket.create_connection((cluster.spec.host, cluster.api_port), timeout=15)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (the socket timeout bounds it)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def head(path: str, length: int, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n{extra}\r\n"
    ).encode()


def test_bounds(start_cluster: ClusterFactory) -> None:
    cluster = start_cluster(workers=1, master_args=BOUNDS)

    # A slow body (declared 1000 bytes, a byte every 0.25 s for 0.5 s, then nothing) is cut with a
    # 408 after --body-timeout. The client stops writing before the cut: a byte landing on the
    # closed socket would make the kernel reset the connection and drop the answer. That a trickle
    # never extends the deadline is tested in-process (tests/master/test_api_inputs.py).
    pending = [connect(cluster) for _ in range(5)]
    answers: dict[socket.socket, bytes] = {}
    for sock in pending:
        sock.sendall(head("/v1/chat/completions", 1000) + b"{")
    for _ in range(2):
        select.select([], [], [], 0.25)  # the slow client's pace between bytes
        for sock in pending:
            sock.sendall(b" ")
    for sock in pending:
        with sock:
            answers[sock] = read_until_closed(sock)  # bounded by the socket's 15 s timeout
    for answer in answers.values():
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b'"code":"body_timeout"' in answer

    # A declared body over --max-body-bytes is a 413 before anything is read.
    with connect(cluster) as sock:
        sock.sendall(head("/v1/chat/completions", 50 * 1024 * 1024))
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"code":"body_too_large"' in answer

    # A chunked body (no declared length) over the limit is a 413 too.
    with connect(cluster) as sock:
        chunk = b"x" * 1000
        body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(6)) + b"0\r\n\r\n"
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n" + body
        )
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]

    # An idle keep-alive connection is closed by the server after --keep-alive-timeout.
    with connect(cluster) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
        answer = read_until_closed(sock)  # returns once the server closes the idle connection
    assert answer.startswith(b"HTTP/1.1 200")

    # The master still serves.
    reply = httpx.post(
        f"{cluster.api_url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
        timeout=30,
    )
    assert reply.status_code == 200


def json_lines(path: Path) -> list[dict[str, object]]:
    lines = path.read_text().splitlines()
    assert lines, f"{path} is empty"
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"a non-JSON line in {path.name}: {line!r}")
    return parsed


def test_sigterm_ends_open_streams_with_an_error_event_and_done(
    start_cluster: ClusterFactory, tmp_path: Path
) -> None:
    cluster = start_cluster(workers=1, sim_tokens_per_s=20, log_format="json")
    assert cluster.master is not None
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 500,
        "stream": True,
    }
    events: list[str] = []
    # A request still sending its body when SIGTERM arrives gets a 503 at once, not a cancelled task.
    uploading = connect(cluster)
    uploading.sendall(head("/v1/chat/completions", 1000) + b"{")
    with httpx.stream("POST", f"{cluster.api_url}/v1/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
            if len(events) == 3:
                cluster.master.send_signal(signal.SIGTERM)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "shutting_down" and error["type"] == "service_unavailable"
    assert cluster.master.wait(timeout=30) == 0
    with uploading:
        answer = read_until_closed(uploading)
    assert answer.startswith(b"HTTP/1.1 503"), answer[:200]
    assert b'"code":"shutting_down"' in answer
    cluster.stop()

    log_dir = tmp_path / "cluster0"
    master = json_lines(log_dir / "master.log")
    text = (log_dir / "master.log").read_text()
    assert "Task was destroyed" not in text and "CancelledError" not in text
    assert "Exception in ASGI application" not in text
    assert any(line.get("event") == "master.stopping" and line.get("open_requests") == 1 for line in master)
    json_lines(log_dir / "node1.log")  # the worker's log is JSON only too
