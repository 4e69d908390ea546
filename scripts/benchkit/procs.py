"""Processes a benchmark starts (mock backends, sglang-router) and what /proc says about them.

Only processes started here are stopped, by their PID. CPU is utime + stime from /proc/PID/stat
(the process and its threads); memory is VmRSS from /proc/PID/status. Linux only for those two.
"""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx

from exo_master.devtools.launcher import wait_for
from exo_master.devtools.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
MOCK = ROOT / "scripts" / "mock_openai.py"
# benchkit lives in scripts/, outside the installed packages: `python -m benchkit.X` children find it
# (and tests/support) through PYTHONPATH.
BENCHKIT_PATH = {
    "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "scripts"), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
}
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime (fields 14, 15 of stat)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def router_installed() -> bool:
    try:
        metadata.version("sglang-router")
    except metadata.PackageNotFoundError:
        return False
    return True


def machine_info() -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for name in (
        "exo-master",
        "uvicorn",
        "uvloop",
        "httptools",
        "starlette",
        "pyzmq",
        "aiohttp",
        "sglang-router",
        "msgspec",
    ):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    cpu = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        cpu = next(
            (
                ln.split(":", 1)[1].strip()
                for ln in cpuinfo.read_text().splitlines()
                if ln.startswith("model name")
            ),
            "",
        )
    return {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "versions": versions,
    }


class Processes:
    """A set of child processes; `stop()` ends exactly those, by PID."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "ab") as out:
            proc = subprocess.Popen(
                args, stdout=out, stderr=out, env={**os.environ, **BENCHKIT_PATH, **(env or {})}
            )
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def start_mocks(
    procs: Processes, count: int, tokens_per_s: float | list[float], max_concurrency: int = 0
) -> list[str]:
    """`count` mock OpenAI backends (each at its own rate, if a list); base URLs once each answers."""
    rates = tokens_per_s if isinstance(tokens_per_s, list) else [tokens_per_s] * count
    urls = []
    for i in range(count):
        port = free_port()
        args = [
            sys.executable,
            str(MOCK),
            "--port",
            str(port),
            "--tokens-per-s",
            str(rates[i]),
            "--max-concurrency",
            str(max_concurrency),
        ]
        procs.spawn(f"mock{i}-{port}", args)
        urls.append(f"http://127.0.0.1:{port}")
    for url in urls:
        wait_for(lambda u=url: _answers(f"{u}/health"), 30, f"mock backend {url}")  # type: ignore[misc]
    return urls


@dataclass
class Router:
    url: str
    proc: subprocess.Popen[bytes]


def start_router(procs: Processes, backends: list[str], policy: str) -> Router:
    """sglang-router in front of `backends`, once it routes a request."""
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "sglang_router.launch_router",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--worker-urls",
        *backends,
        "--policy",
        policy,
        "--log-level",
        "warn",
        # Its metrics listener defaults to one fixed port: two routers at once would collide.
        "--prometheus-host",
        "127.0.0.1",
        "--prometheus-port",
        str(free_port()),
    ]
    # Nothing may leave this machine: a hub lookup (tokenizers) would go to a closed loopback port.
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1"}
    proc = procs.spawn(f"router-{policy}-{port}", args, env)
    url = f"http://127.0.0.1:{port}"

    def routes() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"sglang-router exited with code {proc.returncode}")
        try:
            body = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
            return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(routes, 60, f"sglang-router ({policy})", interval=0.2)
    return Router(url=url, proc=proc)
