"""Loading and unloading on the master's command: progress in the reports, idempotent commands, a
model the node does not hold fails visibly, an unload frees the instance; the sim catalog's sizes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from exo_worker.engine import Engine
from exo_worker.instance_host import InstanceHost
from exo_worker.local_models import estimate, parse_sim_model, parse_size
from exo_worker.runner_group import RunnerGroup
from exo_worker.sim_engine import SimEngine
from protocol.ids import InstanceId, ModelId, NodeId
from protocol.messages import InstanceStatus, LoadInstance, UnloadInstance
from tests.worker.test_runner import arun

NODE = NodeId("n")
SIM = parse_sim_model("sim-model=2GiB:0.2")


def host() -> InstanceHost:
    sent: list[object] = []
    group = RunnerGroup(NODE, [], sent.append)

    def engines(model: ModelId, instance_id: InstanceId, slots: int) -> Engine:
        return SimEngine(1000.0, load_delay_s=SIM.load_seconds)

    return InstanceHost(NODE, group, sent.append, {SIM.name: SIM.local()}, engines)


def load(iid: str, model: str = "sim-model") -> LoadInstance:
    return LoadInstance(
        node_id=NODE, instance_id=InstanceId(iid), model=ModelId(model), placement="p", max_concurrency=2
    )


async def until(condition: object, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)  # wait-ok: polling a condition with a deadline


@arun
async def test_a_placed_instance_loads_with_progress_and_an_unload_removes_it() -> None:
    h = host()
    h.load(load("p.0"))
    h.load(load("p.0"))  # re-sent: nothing new
    [report] = h.runners.reports()
    assert (report.status, report.placement, report.memory_bytes) == (InstanceStatus.LOADING, "p", 2 * 2**30)
    await until(lambda: h.runners.reports()[0].status is InstanceStatus.READY)
    assert h.runners.reports()[0].progress == 1.0
    assert h.memory_in_use() == 2 * 2**30
    h.unload(UnloadInstance(node_id=NODE, instance_id=InstanceId("p.0")))
    h.unload(UnloadInstance(node_id=NODE, instance_id=InstanceId("p.0")))  # idempotent
    assert h.runners.reports() == () and h.memory_in_use() == 0
    await h.shutdown()


@arun
async def test_a_model_the_node_does_not_hold_is_a_failed_instance_with_the_reason() -> None:
    h = host()
    h.load(load("p.0", model="other"))
    [report] = h.runners.reports()
    assert report.status is InstanceStatus.FAILED
    assert report.error == "node n does not hold model 'other'"
    assert report.memory_bytes == 0


@arun
async def test_an_unload_while_loading_cancels_the_load() -> None:
    h = host()
    h.load(load("p.0"))
    h.unload(UnloadInstance(node_id=NODE, instance_id=InstanceId("p.0")))
    await h.shutdown()
    assert h.runners.reports() == ()


@pytest.mark.parametrize(
    ("text", "size"),
    [("16GiB", 16 * 2**30), ("512 MiB", 512 * 2**20), ("1.5GB", 1_500_000_000), ("1024", 1024)],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "big", "x=lots", "a/b=1GiB", "x=1GiB:-1"])
def test_bad_sim_models_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_sim_model(text)


def test_a_model_directory_is_estimated_from_its_weights_and_config(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 1000)
    config = {"num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "hidden_size": 256}
    (tmp_path / "config.json").write_text(json.dumps(config))
    local = estimate(ModelId("tiny"), tmp_path)
    assert (local.size_bytes, local.weights_bytes) == (1000, 1100)
    assert local.kv_bytes_per_token == 2 * 4 * 2 * 32 * 2
