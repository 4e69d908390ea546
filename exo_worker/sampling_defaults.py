"""Default sampling for requests that leave `temperature` / `top_p` unset: the model's own.

A request that does not say how to sample (`TextGenerationParams.temperature` / `top_p` is None)
gets what the model's authors recommend, read from `generation_config.json` in the model directory
(the Hugging Face convention, which mlx-community repos keep; `exo_worker.models` writes one when it
prepares a model from a GGUF file). Without one, or for a value it lacks, a conservative default:
a small model sampled at temperature 1.0 rambles, so CONSERVATIVE stays close to greedy.

Like vLLM, a value the config gives is used whether or not it also sets `do_sample`, except that
an explicit `"do_sample": false` means greedy (temperature 0), as in transformers.

The engine calls `for_model(source)` once after loading, then `resolve(params, defaults)` per
request and samples with the floats it returns.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from protocol.messages import TextGenerationParams

log = structlog.get_logger("exo_worker.sampling_defaults")

GENERATION_CONFIG = "generation_config.json"


@dataclass(frozen=True, slots=True)
class Sampling:
    """How to sample: temperature (0 = greedy) and nucleus top_p in (0, 1]."""

    temperature: float
    top_p: float
    source: str = "request"  # where the values came from, for logs


CONSERVATIVE = Sampling(temperature=0.2, top_p=0.9, source="conservative default")


def _temperature(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
        return float(value)
    return None


def _top_p(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= 1:
        return float(value)
    return None


def from_generation_config(config: dict[str, Any], fallback: Sampling = CONSERVATIVE) -> Sampling:
    """The sampling a generation_config.json asks for; each missing or invalid value from `fallback`."""
    temperature = _temperature(config.get("temperature"))
    top_p = _top_p(config.get("top_p"))
    if config.get("do_sample") is False:
        temperature = 0.0
    if temperature is None and top_p is None and config.get("do_sample") is not False:
        return fallback
    return Sampling(
        temperature=fallback.temperature if temperature is None else temperature,
        top_p=fallback.top_p if top_p is None else top_p,
        source=GENERATION_CONFIG,
    )


def for_model(source: str | Path, fallback: Sampling = CONSERVATIVE) -> Sampling:
    """Defaults for a model: its directory's generation_config.json, else `fallback`.

    `source` is what the engine loads: a local directory, or a Hub id (then mlx-lm's download
    cache is not searched here, and `fallback` applies). An unreadable or malformed file is logged
    and ignored: it must not stop a model that otherwise loads from serving.
    """
    path = Path(source).expanduser() / GENERATION_CONFIG
    if not path.is_file():
        return fallback
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("sampling_defaults.unreadable", path=str(path), error=str(exc))
        return fallback
    if not isinstance(config, dict):
        log.warning("sampling_defaults.not_an_object", path=str(path))
        return fallback
    return from_generation_config(config, fallback)


def resolve(params: TextGenerationParams, defaults: Sampling) -> Sampling:
    """The sampling for one request: its own values where it gives them, else the model's."""
    if params.temperature is not None and params.top_p is not None:
        return Sampling(temperature=params.temperature, top_p=params.top_p)
    return Sampling(
        temperature=defaults.temperature if params.temperature is None else params.temperature,
        top_p=defaults.top_p if params.top_p is None else params.top_p,
        source=defaults.source,
    )
