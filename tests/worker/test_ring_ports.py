"""Where a worker lets MLX distributed listen (--ring-host, --ring-ports), and the transformer
shape each local model carries for the master's shard planning."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import typer

from exo_worker.distributed.cli import default_ring_host, parse_ring_ports
from exo_worker.local_models import estimate
from protocol.ids import ModelId
from protocol.sharding import RingPorts, TransformerShape


def test_ring_ports_from_the_flags() -> None:
    assert parse_ring_ports("10.0.0.5", "52600-52699") == RingPorts(host="10.0.0.5", first=52600, last=52699)
    assert parse_ring_ports("mac.local", "7000-7000") == RingPorts(host="mac.local", first=7000, last=7000)


@pytest.mark.parametrize(
    ("host", "ports"),
    [
        ("h", "52600"),
        ("h", "a-b"),
        ("h", "0-10"),
        ("h", "10-5"),
        ("h", "1-70000"),
        ("a:b", "1-2"),
        ("a b", "1-2"),
    ],
)
def test_bad_ring_flags_are_usage_errors(host: str, ports: str) -> None:
    with pytest.raises(typer.BadParameter):
        parse_ring_ports(host, ports)


def test_the_default_ring_host_is_the_address_toward_the_master() -> None:
    assert default_ring_host("127.0.0.1") == "127.0.0.1"
    assert default_ring_host("localhost") == "127.0.0.1"
    assert default_ring_host("no-such-host.invalid") == socket.gethostname()


def test_a_model_carries_its_shape_from_config_json_or_none(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 10)
    config = {
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "hidden_size": 256,
        "intermediate_size": 512,
        "vocab_size": 1000,
        "quantization": {"group_size": 64, "bits": 4},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    shape = estimate(ModelId("m"), tmp_path).shape
    assert shape == TransformerShape(
        num_layers=4,
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=1000,
        quantization_group_size=64,
    )
    del config["vocab_size"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert estimate(ModelId("m"), tmp_path).shape is None
    (tmp_path / "config.json").write_text(json.dumps({**config, "vocab_size": 0}))
    assert estimate(ModelId("m"), tmp_path).shape is None  # out of range
    (tmp_path / "config.json").write_text("[1, 2]")
    assert estimate(ModelId("m"), tmp_path).shape is None
