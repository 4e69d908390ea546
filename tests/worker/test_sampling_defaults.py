"""Default sampling: the model's generation_config.json where it has one, else conservative."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from exo_worker import sampling_defaults
from exo_worker.sampling_defaults import CONSERVATIVE, Sampling, for_model, from_generation_config, resolve
from protocol.codec import decode, encode
from protocol.envelope import Envelope
from protocol.ids import ModelId
from protocol.messages import AssignTask, ChatMessage, TextGenerationParams

MESSAGES = (ChatMessage(role="user", content="Hi"),)


def params(**fields: float | None) -> TextGenerationParams:
    return TextGenerationParams(model=ModelId("m"), messages=MESSAGES, **fields)  # type: ignore[arg-type]


def write_config(directory: Path, config: object) -> Path:
    (directory / sampling_defaults.GENERATION_CONFIG).write_text(json.dumps(config))
    return directory


def test_the_model_config_gives_the_defaults(tmp_path: Path) -> None:
    write_config(tmp_path, {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "eos_token_id": 2})
    assert for_model(tmp_path) == Sampling(temperature=0.6, top_p=0.95, source="generation_config.json")
    assert for_model(str(tmp_path)).temperature == 0.6


def test_without_a_config_the_defaults_are_conservative(tmp_path: Path) -> None:
    assert for_model(tmp_path) == CONSERVATIVE
    assert for_model("mlx-community/Some-Model-4bit") == CONSERVATIVE  # a Hub id: no local file
    assert CONSERVATIVE.temperature <= 0.3 and CONSERVATIVE.top_p <= 1.0


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"temperature": 0.7}, (0.7, CONSERVATIVE.top_p)),  # a missing value comes from the fallback
        ({"top_p": 0.8}, (CONSERVATIVE.temperature, 0.8)),
        ({"do_sample": False, "temperature": 0.9}, (0.0, CONSERVATIVE.top_p)),  # transformers: greedy
        ({"temperature": -1, "top_p": 7}, (CONSERVATIVE.temperature, CONSERVATIVE.top_p)),  # invalid
        ({"temperature": True, "top_p": "0.5"}, (CONSERVATIVE.temperature, CONSERVATIVE.top_p)),
        ({"eos_token_id": 2}, (CONSERVATIVE.temperature, CONSERVATIVE.top_p)),  # nothing about sampling
    ],
)
def test_each_value_is_taken_only_when_valid(
    config: dict[str, object], expected: tuple[float, float]
) -> None:
    got = from_generation_config(config)
    assert (got.temperature, got.top_p) == expected


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '"text"'])
def test_a_malformed_config_is_ignored(tmp_path: Path, content: str) -> None:
    (tmp_path / sampling_defaults.GENERATION_CONFIG).write_text(content)
    assert for_model(tmp_path) == CONSERVATIVE


def test_the_request_wins_where_it_says_something() -> None:
    model = Sampling(temperature=0.6, top_p=0.95, source="generation_config.json")
    assert resolve(params(temperature=0.0, top_p=0.5), model) == Sampling(temperature=0.0, top_p=0.5)
    assert resolve(params(temperature=None, top_p=None), model) == model
    mixed = resolve(params(temperature=1.3, top_p=None), model)
    assert (mixed.temperature, mixed.top_p) == (1.3, 0.95)


@given(
    temperature=st.none() | st.floats(min_value=0, max_value=2),
    top_p=st.none() | st.floats(min_value=0.01, max_value=1),
)
def test_resolved_sampling_is_always_usable(temperature: float | None, top_p: float | None) -> None:
    got = resolve(params(temperature=temperature, top_p=top_p), CONSERVATIVE)
    assert got.temperature >= 0 and 0 < got.top_p <= 1
    assert got.temperature == (CONSERVATIVE.temperature if temperature is None else temperature)


def test_unset_sampling_crosses_the_bus_and_old_frames_still_decode() -> None:
    assert params().temperature == 1.0 and params().top_p == 1.0  # the old defaults, unchanged
    unset = AssignTask(
        task_id="t",  # type: ignore[arg-type]
        node_id="n",  # type: ignore[arg-type]
        instance_id="n/0",  # type: ignore[arg-type]
        params=params(temperature=None, top_p=None),
    )
    decoded = decode(encode(Envelope(origin="master", seq=1, sent_at=0.0, body=unset))).body
    assert isinstance(decoded, AssignTask)
    assert isinstance(decoded.params, TextGenerationParams)
    assert decoded.params.temperature is None and decoded.params.top_p is None
    old = msgspec.json.decode(
        msgspec.json.encode(params(temperature=0.5, top_p=0.9)), type=TextGenerationParams
    )
    assert (old.temperature, old.top_p) == (0.5, 0.9)
