"""Security with real processes: CURVE on the bus, identity checks, API keys, the loopback rule."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import zmq

from exo_master.devtools.launcher import LocalCluster, wait_for
from exo_master.devtools.ports import free_port, free_port_pair
from protocol import keys
from protocol.ids import InstanceId, ModelId, NodeId, TaskId
from protocol.messages import (
    FinishReason,
    InstanceReport,
    TaskChunk,
    TaskFailed,
    TaskFinished,
    WorkerHeartbeat,
)
from tests.e2e.buspeer import BusPeer
from tests.e2e.conftest import ClusterFactory

pytestmark = pytest.mark.e2e

CHAT = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def _counter(cluster: LocalCluster, family: str) -> dict[str, float]:
    """A labelled counter family from /metrics, by its single label value."""
    text = httpx.get(f"{cluster.api_url}/metrics", headers=cluster.headers, timeout=5).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(f"{family}_total{{"):
            label = line.split('"')[1]
            out[label] = float(line.split()[-1])
    return out


def _node_ids(cluster: LocalCluster) -> set[str]:
    state = cluster.state()
    assert state is not None
    return {n["node_id"] for n in state["nodes"]}


def _log_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


def _logged(path: Path, event: str) -> bool:
    return any(e.get("event") == event for e in _log_events(path))


def _peer(cluster: LocalCluster, name: str, authorize: bool = True, **kwargs: Any) -> BusPeer:
    assert cluster.keys is not None
    _, secret = cluster.keys.worker(name, authorize=authorize)
    master = keys.load_public(cluster.keys.master_public)
    return BusPeer(cluster, keys.load_keypair(secret), master, **kwargs)


@pytest.fixture
def peers() -> Iterator[list[BusPeer]]:
    made: list[BusPeer] = []
    yield made
    for peer in made:
        peer.close()


def test_an_authorized_worker_serves_and_nothing_is_refused(start_cluster: ClusterFactory) -> None:
    cluster = start_cluster(workers=2)
    client = openai.OpenAI(base_url=f"{cluster.api_url}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model="sim-model", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content
    assert _node_ids(cluster) == {"node1", "node2"}
    assert sum(_counter(cluster, "exo_bus_refusals").values()) == 0
    assert sum(_counter(cluster, "exo_bus_identity_drops").values()) == 0


def test_unknown_missing_and_wrong_master_keys_are_refused(
    start_cluster: ClusterFactory, tmp_path: Path
) -> None:
    cluster = start_cluster(workers=1)
    assert cluster.keys is not None and cluster.spec.log_dir is not None
    outsider_public, outsider_secret = keys.generate(tmp_path / "outsider", "outsider")
    impostor_public, _ = keys.generate(tmp_path / "impostor", "fake-master")
    _, wrong_master_secret = cluster.keys.worker("misconfigured")  # authorized, but wrong master key
    cluster.start_worker(
        "unknown",
        extra_args=["--secret-key", str(outsider_secret), "--master-key", str(cluster.keys.master_public)],
        with_keys=False,
    )
    cluster.start_worker("plaintext", with_keys=False)
    cluster.start_worker(
        "httpport", extra_args=["--master", f"127.0.0.1:{cluster.api_port}"], with_keys=False
    )
    cluster.start_worker(
        "wrongmaster",
        extra_args=["--secret-key", str(wrong_master_secret), "--master-key", str(impostor_public)],
        with_keys=False,
    )

    def all_refused() -> bool:
        refusals = _counter(cluster, "exo_bus_refusals")
        # Which side notices a plaintext peer first is a race: the master sees a mismatch (no_curve)
        # or the peer hanging up (aborted).
        plaintext = refusals.get("no_curve", 0) + refusals.get("aborted", 0)
        return plaintext >= 1 and all(refusals.get(r, 0) >= 1 for r in ("unknown_key", "bad_handshake"))

    wait_for(all_refused, 30, "the three refusals to be counted")
    logs = cluster.spec.log_dir
    wait_for(lambda: _logged(logs / "unknown.log", "bus.key_not_authorized"), 30, "the unknown key's line")
    wait_for(lambda: _logged(logs / "wrongmaster.log", "bus.wrong_master_key"), 30, "the wrong key's line")
    wait_for(lambda: _logged(logs / "plaintext.log", "bus.master_requires_curve"), 30, "the plaintext line")
    wait_for(lambda: _logged(logs / "httpport.log", "bus.not_a_bus_port"), 30, "the HTTP port's line")
    # Reachable but refused: said as such every liveness window, never "master.unreachable".
    wait_for(lambda: _logged(logs / "unknown.log", "master.refusing"), 30, "the refused worker's reminder")
    assert not _logged(logs / "unknown.log", "master.unreachable")
    assert not _logged(logs / "httpport.log", "bus.master_requires_curve")
    said = (
        ("unknown", "bus.key_not_authorized"),
        ("wrongmaster", "bus.wrong_master_key"),
        ("plaintext", "bus.master_requires_curve"),
        ("httpport", "bus.not_a_bus_port"),
    )
    for name, event in said:
        lines = [e for e in _log_events(logs / f"{name}.log") if e.get("event") == event]
        assert len(lines) == 1  # one clear line, not one per socket or per retry
    refused = [e for e in _log_events(logs / "master.log") if e.get("event") == "bus.refused"]
    assert keys.fingerprint(keys.load_public(outsider_public)) in {e.get("fingerprint") for e in refused}
    assert _node_ids(cluster) == {"node1"}
    assert httpx.post(f"{cluster.api_url}/v1/chat/completions", json=CHAT, timeout=30).status_code == 200
    assert _node_ids(cluster) == {"node1"}


def test_rogue_subscribers_read_nothing(start_cluster: ClusterFactory, peers: list[BusPeer]) -> None:
    cluster = start_cluster(workers=1)
    assert cluster.keys is not None
    everything = (b"",)
    plaintext = BusPeer(cluster, None, None, subscribe=everything)
    unknown = keys.Keypair(*zmq.curve_keypair())
    master_key = keys.load_public(cluster.keys.master_public)
    outsider = BusPeer(cluster, unknown, master_key, subscribe=everything)
    # Authorized, but asking for everything and for node1's topic: both are refused by the master.
    insider = _peer(cluster, "insider", subscribe=(b"", b"node/node1\x00", b"*\x00"))
    peers += [plaintext, outsider, insider]
    assert BusPeer.handshake(plaintext.sub_monitor) == "failed"
    assert BusPeer.handshake(outsider.sub_monitor) == "refused"
    insider.wait_admitted()
    reply = httpx.post(f"{cluster.api_url}/v1/chat/completions", json=CHAT, timeout=30)
    assert reply.status_code == 200 and reply.headers["x-exo-node"] == "node1"
    seen: list[Any] = []

    def heard_a_heartbeat() -> bool:
        seen.extend(insider.received())
        return any(type(env.body).__name__ == "MasterHeartbeat" for _, env in seen)

    # The broadcast topic is allowed: a master heartbeat proves the insider's link carries traffic.
    wait_for(heard_a_heartbeat, 10, "a master heartbeat on the broadcast topic")
    assert {topic for topic, _ in seen} == {b"*\x00"}
    assert plaintext.received() == [] and outsider.received() == []


def _stream_task(cluster: LocalCluster, max_tokens: int) -> tuple[httpx.Client, Any, str]:
    client = httpx.Client(base_url=cluster.api_url, timeout=60)
    body = {**CHAT, "max_tokens": max_tokens, "stream": True}
    response = client.send(client.build_request("POST", "/v1/chat/completions", json=body), stream=True)
    assert response.status_code == 200
    return client, response, response.headers["x-exo-task"]


def test_forged_messages_from_another_authorized_node_are_dropped(
    start_cluster: ClusterFactory, peers: list[BusPeer]
) -> None:
    cluster = start_cluster(workers=1, sim_tokens_per_s=10)
    forger = _peer(cluster, "forger")
    peers.append(forger)
    forger.wait_admitted()
    client, response, task_id = _stream_task(cluster, max_tokens=60)
    try:
        victim, stolen = NodeId("node1"), InstanceId("node1/0")
        theirs = {"node_id": victim, "task_id": TaskId(task_id), "instance_id": stolen}
        mine = {**theirs, "node_id": NodeId("forger")}
        finished = TaskFinished(**theirs, finish_reason=FinishReason.STOP)
        claim = InstanceReport(instance_id=stolen, model=ModelId("sim-model"), capacity=1000.0)
        forgeries: list[tuple[str, Any, str]] = [
            # As node1 (origin and node id agree): node1 belongs to node1.key, not the forger's key.
            ("node1", TaskChunk(**theirs, index=1, text="INJECTED"), "node_id_not_owned"),
            ("node1", finished, "node_id_not_owned"),
            ("node1", TaskFailed(**theirs, reason="forged"), "node_id_not_owned"),
            ("node1", WorkerHeartbeat(node_id=victim), "node_id_not_owned"),
            # Its own envelope, another node's id.
            ("forger", finished, "origin_mismatch"),
            # Its own node id, another node's instance (taking its tasks over, or its capacity).
            ("forger", TaskChunk(**mine, index=1, text="INJECTED"), "foreign_instance"),
            ("forger", WorkerHeartbeat(node_id=NodeId("forger"), instances=(claim,)), "foreign_instance"),
        ]
        expected: dict[str, int] = {}
        for _, _, reason in forgeries:
            expected[reason] = expected.get(reason, 0) + 1

        def all_dropped() -> bool:
            for origin, body, _ in forgeries:  # PUB drops until the subscription lands: re-offer
                forger.send(origin, body)
            drops = _counter(cluster, "exo_bus_identity_drops")
            return all(drops.get(reason, 0) >= n for reason, n in expected.items())

        wait_for(all_dropped, 15, "every forged message to be dropped")
        # Subscribing to node1's topic is refused; unsubscribing it must not unsubscribe node1.
        before = _counter(cluster, "exo_bus_identity_drops")["node_id_not_owned"]
        forger.sub.setsockopt(zmq.SUBSCRIBE, b"node/node1\x00")
        forger.sub.setsockopt(zmq.UNSUBSCRIBE, b"node/node1\x00")
        wait_for(
            lambda: _counter(cluster, "exo_bus_identity_drops")["node_id_not_owned"] >= before + 2,
            15,
            "the forged subscription and unsubscription to be refused",
        )
        text, finish = _read_stream(response)
    finally:
        response.close()
        client.close()
    assert "INJECTED" not in text
    assert finish == "length"  # the real end, 60 tokens later, not the forged stop or failure
    state = cluster.state()
    assert state is not None
    assert [(n["node_id"], n["alive"], n["subscribed"]) for n in state["nodes"]] == [("node1", True, True)]
    assert httpx.post(f"{cluster.api_url}/v1/chat/completions", json=CHAT, timeout=30).status_code == 200


def _read_stream(response: Any) -> tuple[str, str | None]:
    text, finish = [], None
    for line in response.iter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        choice = json.loads(line[6:])["choices"][0]
        text.append(choice.get("delta", {}).get("content") or "")
        finish = choice.get("finish_reason") or finish
    return "".join(text), finish


def test_a_key_added_while_running_is_admitted(start_cluster: ClusterFactory) -> None:
    cluster = start_cluster(workers=1)
    assert cluster.keys is not None and cluster.spec.log_dir is not None and cluster.master is not None
    public, secret = cluster.keys.worker("late", authorize=False)
    master_key = str(cluster.keys.master_public)
    cluster.start_worker(
        "late", extra_args=["--secret-key", str(secret), "--master-key", master_key], with_keys=False
    )
    log = cluster.spec.log_dir / "late.log"
    wait_for(lambda: _logged(log, "bus.key_not_authorized"), 30, "the late worker to be refused")
    assert _node_ids(cluster) == {"node1"}
    shutil.copyfile(public, cluster.keys.authorized / public.name)  # no restart of anything
    cluster.wait_ready(2, timeout=30)
    assert _node_ids(cluster) == {"node1", "late"}
    # SIGHUP re-reads the directory at once as well.
    cluster.master.send_signal(signal.SIGHUP)
    master_log = cluster.spec.log_dir / "master.log"
    wait_for(lambda: _logged(master_log, "bus.reload_requested"), 10, "the master to reload on SIGHUP")
    assert cluster.master.poll() is None


def test_api_keys_with_the_openai_sdk_and_exoctl(start_cluster: ClusterFactory) -> None:
    secret = "sk-exo-test-8d1f0c"
    cluster = start_cluster(workers=1, api_key=secret)
    url = cluster.api_url
    wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        wrong.chat.completions.create(model="sim-model", messages=[{"role": "user", "content": "hi"}])
    assert refused.value.status_code == 401
    assert refused.value.code == "invalid_api_key"
    right = openai.OpenAI(base_url=f"{url}/v1", api_key=secret, max_retries=0)
    reply = right.chat.completions.create(model="sim-model", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content
    for path in ("/v1/models", "/v1/cluster/state", "/metrics"):
        response = httpx.get(f"{url}{path}", timeout=5)
        assert response.status_code == 401, path
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/health", timeout=5).status_code == 200
    exoctl = [sys.executable, "-m", "exo_master.exoctl.cli", "nodes", "--api", url, "--json"]
    env = {k: v for k, v in os.environ.items() if k != "EXO_API_KEY"}
    denied = subprocess.run(exoctl, capture_output=True, text=True, timeout=60, env=env)
    assert denied.returncode == 1 and "API key" in denied.stderr
    allowed = subprocess.run(
        exoctl, capture_output=True, text=True, timeout=60, env={**env, "EXO_API_KEY": secret}
    )
    assert allowed.returncode == 0, allowed.stderr
    assert [n["node_id"] for n in json.loads(allowed.stdout)["nodes"]] == ["node1"]
    # The key is never shown: not in the logs, the metrics or the state.
    assert cluster.spec.log_dir is not None
    assert secret not in (cluster.spec.log_dir / "master.log").read_text()
    headers = {"authorization": f"Bearer {secret}"}
    assert secret not in httpx.get(f"{url}/metrics", headers=headers, timeout=5).text
    assert secret not in httpx.get(f"{url}/v1/cluster/state", headers=headers, timeout=5).text


def test_a_plaintext_bus_on_a_non_loopback_address_is_refused_before_binding() -> None:
    # 0.0.0.0 is refused before anything binds, so this test never listens outside loopback.
    args = ["--api-port", str(free_port()), "--bus-port", str(free_port_pair()), "--log-format", "json"]
    master = subprocess.run(
        [sys.executable, "-m", "exo_master.daemon", *args, "--bus-host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert master.returncode == 2
    (line,) = master.stderr.strip().splitlines()
    event = json.loads(line)
    assert event["event"] == "master.insecure_bus_refused"
    assert "exoctl keys generate" in event["fix"] and "--insecure" in event["fix"]


def _squat(cluster: LocalCluster, node_id: str, key_name: str) -> int:
    """A worker claiming `node_id` with the (authorized) key of `key_name`: its exit code."""
    assert cluster.keys is not None
    _, secret = cluster.keys.worker(key_name)
    keys_args = ["--secret-key", str(secret), "--master-key", str(cluster.keys.master_public)]
    real = cluster.workers.get(node_id)
    squatter = cluster.start_worker(node_id, extra_args=keys_args, with_keys=False)
    try:
        return squatter.wait(timeout=60)
    finally:
        cluster.stop_process(squatter)
        if real is not None:
            cluster.workers[node_id] = real  # the launcher stops the real one at the end


def test_a_node_id_belongs_to_its_key_before_and_after_its_worker_starts(
    start_cluster: ClusterFactory,
) -> None:
    """authorized/NAME.key admits node id NAME only: a squatter with another authorized key is
    refused, says why and exits 2, whether it comes before the real worker or after; the real one
    serves every request."""
    cluster = start_cluster(workers=1)  # node1, with node1.key
    assert cluster.spec.log_dir is not None
    assert _squat(cluster, "node7", "squatter") == 2  # before node7's own worker
    log = (cluster.spec.log_dir / "node7.log").read_text()
    assert "not authorized for node id 'node7'" in log and "node7.key" in log, log[-1500:]
    assert "master.unreachable" not in log
    assert _squat(cluster, "node1", "other") == 2  # a duplicate of a running node, with another key
    replies = [httpx.post(f"{cluster.api_url}/v1/chat/completions", json=CHAT, timeout=30) for _ in range(6)]
    assert [r.status_code for r in replies] == [200] * 6
    assert {r.headers["x-exo-node"] for r in replies} == {"node1"}
    assert _counter(cluster, "exo_bus_identity_drops").get("node_id_not_owned", 0) >= 2
