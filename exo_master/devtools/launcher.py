"""Start a master and N workers on this machine as child processes; wait until they serve.

Used by `scripts/local_cluster.py` (and so `make run`) and by the end-to-end tests, so that what
the tests start is exactly what a user starts. Only processes started here are ever stopped.

It never claims someone else's cluster: its ports are checked before anything starts (a taken
port raises `PortInUse`), and the master it starts gets a unique session id, so readiness is only
ever read from that master, never from another one answering on the same address.

The bus runs CURVE by default, as across machines: the launcher makes a master keypair, one per
worker and the authorized-keys directory under `keys/` in the log directory (or a temporary one),
so the secure path is the default one with no extra step. `ClusterSpec(curve=False)` runs plaintext.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

from exo_master.devtools.ports import ClusterStartError, check_ports, free_cluster_ports
from protocol import keys

# The model a worker declares when the cluster is not managed and names none (exo-worker's own
# default before workers could start without a model).
_DEFAULT_MODEL = {"sim": "sim-model", "mlx": "smollm2"}


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `condition` until it returns something truthy, or raise after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@dataclass
class ClusterSpec:
    workers: int = 2
    engine: str = "sim"
    model: str | None = None
    policy: str = "least-work"
    instances_per_worker: int = 1
    max_concurrency: int = 16
    sim_tokens_per_s: float = 50.0
    host: str = "127.0.0.1"
    api_port: int = 0  # 0: pick a free one
    bus_port: int = 0
    heartbeat_interval: float = 1.0
    log_dir: Path | None = None
    log_format: str = "json"
    worker_args: list[str] = field(default_factory=list)
    # HOST:PORT the workers connect to; None: the master's bus (tests put a fault proxy between).
    worker_master: str | None = None
    master_args: list[str] = field(default_factory=list)
    curve: bool = True  # CURVE keys on the bus (made here); False: plaintext, loopback only
    keys_dir: Path | None = None  # default: log_dir/keys, else a temporary directory
    api_key: str | None = None  # passed to the master as --api-key and sent by state()
    # Workers find the master by mDNS (no --master): the master advertises this cluster name on
    # loopback (--advertise), the workers look for it there only (--mdns-interface 127.0.0.1).
    discovery_cluster: str | None = None
    # True: workers start without --model and the master places models (POST /v1/instances);
    # False: each worker declares `model` (default: the engine's default model) itself.
    managed: bool = False


class ClusterKeys:
    """The local cluster's key files: master.key(_secret), workers/NAME.key(_secret), authorized/."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.authorized = directory / "authorized"
        self.authorized.mkdir(parents=True, exist_ok=True)
        self.master_public, self.master_secret = self._pair(directory, "master")

    def _pair(self, directory: Path, name: str) -> tuple[Path, Path]:
        public = directory / f"{name}{keys.PUBLIC_SUFFIX}"
        secret = directory / f"{name}{keys.SECRET_SUFFIX}"
        if not secret.exists():
            public, secret = keys.generate(directory, name)
        return public, secret

    def worker(self, name: str, authorize: bool = True) -> tuple[Path, Path]:
        """A worker's (public, secret) files, made on first use; its public key authorized if asked."""
        public, secret = self._pair(self.directory / "workers", name)
        if authorize:
            shutil.copyfile(public, self.authorized / public.name)
        return public, secret


class LocalCluster:
    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec
        self.api_port, self.bus_port = free_cluster_ports(spec.host, spec.api_port or 0, spec.bus_port or 0)
        # Passed to each master we start (a new one per start: workers tell a restarted master by
        # its session); its /v1/cluster/state echoes it, so an answer from any other master on that
        # address (a cluster started earlier) is recognised as not ours.
        self.session = ""
        self.master: subprocess.Popen[bytes] | None = None
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[IO[bytes]] = []
        self._temp_keys: Path | None = None
        self.keys: ClusterKeys | None = None
        if spec.curve:
            directory = spec.keys_dir or (spec.log_dir / "keys" if spec.log_dir is not None else None)
            if directory is None:
                directory = self._temp_keys = Path(tempfile.mkdtemp(prefix="exo-keys-"))
            self.keys = ClusterKeys(directory)

    @property
    def api_url(self) -> str:
        return f"http://{self.spec.host}:{self.api_port}"

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.spec.log_dir is not None:
            self.spec.log_dir.mkdir(parents=True, exist_ok=True)
            out: IO[bytes] | int = open(self.spec.log_dir / f"{name}.log", "ab")  # noqa: SIM115
            self._logs.append(out)  # type: ignore[arg-type]
        else:
            out = subprocess.DEVNULL
        return subprocess.Popen([sys.executable, "-m", *args], stdout=out, stderr=out, env=env)

    def start_master(self) -> None:
        s = self.spec
        self.session = f"local-{uuid.uuid4().hex[:12]}"
        self.master = self._spawn(
            "master",
            [
                "exo_master.daemon",
                "--host", s.host,
                "--api-port", str(self.api_port),
                "--bus-port", str(self.bus_port),
                "--policy", s.policy,
                "--heartbeat-interval", str(s.heartbeat_interval),
                "--log-format", s.log_format,
                *self._master_security_args(),
                "--session", self.session,
                *(["--advertise", "--cluster", s.discovery_cluster] if s.discovery_cluster else []),
                *s.master_args,
            ],
        )  # fmt: skip

    def _master_security_args(self) -> list[str]:
        args: list[str] = []
        if self.keys is not None:
            args += ["--secret-key", str(self.keys.master_secret)]
            args += ["--authorized-keys", str(self.keys.authorized)]
        if self.spec.api_key:
            args += ["--api-key", self.spec.api_key]
        return args

    def start_worker(
        self, node_id: str, extra_args: list[str] | None = None, with_keys: bool = True
    ) -> subprocess.Popen[bytes]:
        """Start a worker (with its own authorized key when the cluster runs CURVE and `with_keys`)."""
        s = self.spec
        if s.discovery_cluster:
            where = ["--cluster", s.discovery_cluster, "--mdns-interface", "127.0.0.1"]
        else:
            where = ["--master", s.worker_master or f"{s.host}:{self.bus_port}"]
        args = [
            "exo_worker.daemon",
            *where,
            "--node-id", node_id,
            "--engine", s.engine,
            "--instances", str(s.instances_per_worker),
            "--max-concurrency", str(s.max_concurrency),
            "--sim-tokens-per-s", str(s.sim_tokens_per_s),
            "--heartbeat-interval", str(s.heartbeat_interval),
            "--log-format", s.log_format,
            *s.worker_args,
        ]  # fmt: skip
        if not s.managed:
            args += ["--model", s.model or _DEFAULT_MODEL[s.engine]]
        if self.keys is not None and with_keys:
            _, secret = self.keys.worker(node_id)
            args += ["--secret-key", str(secret), "--master-key", str(self.keys.master_public)]
        proc = self._spawn(node_id, [*args, *(extra_args or [])])
        self.workers[node_id] = proc
        return proc

    def check_ports(self) -> None:
        check_ports(self.spec.host, self.api_port, self.bus_port)

    def start(self, ready_timeout: float = 60.0) -> LocalCluster:
        self.check_ports()
        if self.keys is not None:  # authorized before the master reads its directory
            for i in range(self.spec.workers):
                self.keys.worker(f"node{i + 1}")
        self.start_master()
        self.wait_healthy(timeout=30)
        for i in range(self.spec.workers):
            self.start_worker(f"node{i + 1}")
        if self.spec.managed:
            self.wait_nodes(self.spec.workers, timeout=ready_timeout)
        else:
            self.wait_ready(self.spec.workers * self.spec.instances_per_worker, timeout=ready_timeout)
        return self

    def wait_nodes(self, nodes: int, timeout: float) -> dict[str, Any]:
        """Until `nodes` live nodes are subscribed (workers without a model have no instance yet)."""

        def joined() -> dict[str, Any] | None:
            self._check_alive()
            state = self.state()
            live = [n for n in state["nodes"] if n["alive"] and n["subscribed"]] if state else []
            return state if len(live) >= nodes else None

        result: dict[str, Any] = wait_for(joined, timeout, f"{nodes} nodes")
        return result

    def place(self, model: str, replicas: int, timeout: float = 60.0) -> dict[str, Any]:
        """POST /v1/instances and wait until every replica is ready; returns the placement."""
        response = httpx.post(
            f"{self.api_url}/v1/instances",
            json={"model": model, "replicas": replicas},
            headers=self.headers,
            timeout=10,
        )
        if response.status_code != 201:
            raise ClusterStartError(f"placing {model} failed ({response.status_code}): {response.text}")
        placement_id = response.json()["id"]

        def ready() -> dict[str, Any] | None:
            self._check_alive()
            got = httpx.get(f"{self.api_url}/v1/instances/{placement_id}", headers=self.headers, timeout=5)
            body: dict[str, Any] = got.json()
            return body if got.status_code == 200 and body["ready"] >= replicas else None

        placed: dict[str, Any] = wait_for(ready, timeout, f"{replicas} ready replicas of {model}")
        return placed

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.spec.api_key}"} if self.spec.api_key else {}

    def state(self, tasks: int = 0) -> dict[str, Any] | None:
        """GET /v1/cluster/state (with up to `tasks` task rows), or None while it does not answer.

        Raises ClusterStartError when a master answers with another session: not the one we started.
        """
        try:
            response = httpx.get(
                f"{self.api_url}/v1/cluster/state", params={"tasks": tasks}, headers=self.headers, timeout=2
            )
        except httpx.HTTPError:
            return None
        if response.status_code != 200:
            return None
        state: dict[str, Any] = response.json()
        if state.get("session") != self.session:
            raise ClusterStartError(
                f"another master (session {state.get('session')!r}) answers at {self.api_url}, "
                f"not the one started here (session {self.session!r})"
            )
        return state

    def _check_alive(self) -> None:
        if self.master is not None and self.master.poll() is not None:
            raise ClusterStartError(f"the master exited with code {self.master.returncode}")
        for name, proc in self.workers.items():
            if proc.poll() is not None:
                raise ClusterStartError(f"worker {name} exited with code {proc.returncode}")

    def wait_healthy(self, timeout: float) -> None:
        def healthy() -> bool:
            self._check_alive()
            return self.state() is not None

        wait_for(healthy, timeout, "the master's API")

    def wait_ready(self, instances: int, timeout: float) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            self._check_alive()
            state = self.state()
            if state is None:
                return None
            count = sum(1 for i in state["instances"] if i["status"] == "ready")
            subscribed = all(n["subscribed"] for n in state["nodes"] if n["alive"])
            return state if count >= instances and subscribed else None

        result: dict[str, Any] = wait_for(ready, timeout, f"{instances} ready instances")
        return result

    def stop_process(self, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop(self) -> None:
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.workers.values():
            self.stop_process(proc)
        if self.master is not None:
            self.stop_process(self.master)
        for f in self._logs:
            f.close()
        self._logs.clear()
        if self._temp_keys is not None:
            shutil.rmtree(self._temp_keys, ignore_errors=True)
            self._temp_keys = None

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
