"""What a node tells the master about itself: its memory, its backend, and the models it can load
without downloading anything, each with an estimate of the memory one instance needs.

The estimate (the master adds KV headroom per slot, see exo_master.core.instances.memory):
    weights_bytes       the weight files' size on disk (MLX loads safetensors as stored, quantized
                        or not) plus 10% for the runtime's buffers and the tokenizer
    kv_bytes_per_token  2 (K and V) x num_hidden_layers x num_key_value_heads x head_dim x 2 bytes
                        (float16), from config.json
Each model also carries its transformer shape from config.json (`TransformerShape`, for the
master's shard planning; None when the config lacks a field).
The sim engine has a catalog instead: each model a simulated size and load time (`--sim-model`).
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from exo_worker.engine import ModelLoadError
from protocol.ids import ModelId
from protocol.messages import LocalModel
from protocol.sharding import TransformerShape, shape_from_config

_GIB = 1 << 30
_WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".npz")
# SmolLM2-135M before its one-time conversion (no config.json yet): 30 layers, 3 KV heads of 64.
_SMOLLM2_KV_BYTES_PER_TOKEN = 2 * 30 * 3 * 64 * 2
SMOLLM2_SHAPE = TransformerShape(
    num_layers=30,
    hidden_size=576,
    intermediate_size=1536,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    quantization_group_size=32,
)


def machine_memory() -> tuple[int, int]:
    """(total, available) bytes. Available is what the OS could give a new process now."""
    page = os.sysconf("SC_PAGE_SIZE")
    total = os.sysconf("SC_PHYS_PAGES") * page
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return total, int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return total, os.sysconf("SC_AVPHYS_PAGES") * page
    except (ValueError, OSError):  # macOS: no cheap "available" figure; assume half is usable
        return total, total // 2


def mlx_backend() -> str:
    return "mlx-metal" if sys.platform == "darwin" else "mlx-cpu"


def estimate(model: ModelId, directory: Path) -> LocalModel:
    """A model directory (config.json plus weight files) as a LocalModel with its memory estimate."""
    size = sum(f.stat().st_size for f in directory.iterdir() if f.suffix in _WEIGHT_SUFFIXES and f.is_file())
    kv = 0
    shape = None
    try:
        config = json.loads((directory / "config.json").read_text())
        shape = _shape(config)
        layers = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads", heads))
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
        kv = 2 * layers * kv_heads * head_dim * 2
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        pass  # no usable config: the weights alone (the load will say what is wrong)
    return LocalModel(
        model=model,
        path=str(directory),
        size_bytes=size,
        weights_bytes=size + size // 10,
        kv_bytes_per_token=kv,
        shape=shape,
    )


def _shape(config: object) -> TransformerShape | None:
    if not isinstance(config, dict):
        return None
    try:
        return shape_from_config(config)
    except (KeyError, TypeError, ValueError):  # not a transformer mlx-lm reads (ValidationError too)
        return None


def mlx_catalog(models_dir: Path | None) -> dict[ModelId, LocalModel]:
    """The models an MLX worker holds: the built-in SmolLM2 (if its package is installed) and each
    directory with a config.json under `models_dir` (served under its folder name)."""
    from exo_worker.models import SMOLLM2_DIR, cache_dir, find_smollm2_gguf

    catalog: dict[ModelId, LocalModel] = {}
    root = models_dir if models_dir is not None else cache_dir() / "models"
    if root.is_dir():
        for directory in sorted(root.iterdir()):
            if (directory / "config.json").is_file():
                catalog[ModelId(directory.name)] = estimate(ModelId(directory.name), directory)
    prepared = catalog.pop(ModelId(SMOLLM2_DIR), None)
    try:
        gguf = find_smollm2_gguf()
    except ModelLoadError:  # the package is not installed: no built-in model
        return catalog
    if prepared is not None:
        catalog[ModelId("smollm2")] = LocalModel(
            model=ModelId("smollm2"),
            path=prepared.path,
            size_bytes=prepared.size_bytes,
            weights_bytes=prepared.weights_bytes,
            kv_bytes_per_token=prepared.kv_bytes_per_token,
            shape=prepared.shape or SMOLLM2_SHAPE,
        )
    else:  # converted on first load: the GGUF's size is the weights' (they stay 4-bit)
        size = gguf.stat().st_size
        catalog[ModelId("smollm2")] = LocalModel(
            model=ModelId("smollm2"),
            path=str(gguf),
            size_bytes=size,
            weights_bytes=size + size // 10,
            kv_bytes_per_token=_SMOLLM2_KV_BYTES_PER_TOKEN,
            shape=SMOLLM2_SHAPE,
        )
    return catalog


# ---- the sim engine's catalog ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SimModel:
    name: ModelId
    size_bytes: int
    load_seconds: float

    def local(self) -> LocalModel:
        return LocalModel(
            model=self.name,
            path=f"sim://{self.name}",
            size_bytes=self.size_bytes,
            weights_bytes=self.size_bytes,
            shape=SMOLLM2_SHAPE,  # shaped like SmolLM2, so it can be placed in shards too
        )


DEFAULT_SIM_MODELS = ("sim-model=1GiB:0.5",)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|TiB|KB|MB|GB|TB)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_UNITS |= {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def parse_size(text: str) -> int:
    """'16GiB', '512 MiB', '1.5GB', '1024' (bytes) -> bytes."""
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"not a size: {text!r} (e.g. 16GiB, 512MiB, 2GB)")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "B").lower()])


def parse_sim_model(text: str) -> SimModel:
    """'NAME=SIZE[:LOAD_SECONDS]', e.g. 'big=20GiB:3'."""
    name, eq, rest = text.partition("=")
    if not eq or not name.strip() or "/" in name:
        raise ValueError(f"expected NAME=SIZE[:SECONDS], got {text!r}")
    size, _, seconds = rest.partition(":")
    load = float(seconds) if seconds else 0.5
    if not load >= 0:
        raise ValueError(f"load seconds must be >= 0, got {seconds!r}")
    return SimModel(name=ModelId(name.strip()), size_bytes=parse_size(size), load_seconds=load)
