"""A slow-body flood past the open-files limit: /health and /ready still answer within a second
(real master process, its RLIMIT_NOFILE lowered to 256 so that 300 connections exceed it)."""

from __future__ import annotations

import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from exo_master.devtools.launcher import wait_for
from exo_master.devtools.ports import free_port, free_port_pair

pytestmark = pytest.mark.e2e

NOFILE = 256
FLOOD = 300
SLOW_HEAD = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: 100000\r\n\r\n{"
)


def _low_nofile() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))  # hard too: it cannot raise it


@pytest.fixture
def master(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    api, bus = free_port(), free_port_pair()
    log = tmp_path / "master.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "exo_master.daemon", "--host", "127.0.0.1", "--api-port", str(api),
             "--bus-port", str(bus), "--log-format", "json"],
            stdout=out, stderr=out, preexec_fn=_low_nofile,
        )  # fmt: skip
        url = f"http://127.0.0.1:{api}"
        try:
            wait_for(lambda: _get(url, "/health"), 30, "the master")
            yield url, log
        finally:
            proc.terminate()
            proc.wait(timeout=15)


def _get(url: str, path: str) -> bool:
    try:
        return httpx.get(url + path, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def test_health_answers_within_a_second_during_a_slow_body_flood(master: tuple[str, Path]) -> None:
    url, log = master
    port = int(url.rsplit(":", 1)[1])
    flood: list[socket.socket] = []
    try:
        for _ in range(FLOOD):  # each holds a body it never finishes
            conn = socket.create_connection(("127.0.0.1", port), timeout=5)
            conn.sendall(SLOW_HEAD)
            flood.append(conn)
        for path in ("/health", "/ready", "/health", "/ready"):
            started = time.monotonic()
            response = httpx.get(url + path, timeout=5.0)
            took = time.monotonic() - started
            assert response.status_code in (200, 503) and took < 1.0, (path, response.status_code, took)
        metrics = httpx.get(url + "/metrics", timeout=5.0).text
    finally:
        for conn in flood:
            conn.close()
    values = {
        line.split()[0]: float(line.split()[1])
        for line in metrics.splitlines()
        if line.startswith("exo_http_")
    }
    assert values["exo_http_max_connections"] == NOFILE - 64
    assert values["exo_http_connections_evicted_total"] >= FLOOD - (NOFILE - 64)
    assert values["exo_http_connections_open"] <= NOFILE - 64
    text = log.read_text()
    assert "http.connection_evicted" in text and '"max_connections": 192' in text
