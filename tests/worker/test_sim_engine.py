"""SimEngine: deterministic text, exact token counts, stop strings, cancellation, image kinds."""

from __future__ import annotations

import asyncio
import base64
import math
import threading
import time
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exo_worker.engine import EngineError, ModelLoadError, RunOutcome
from exo_worker.sim_engine import SimEngine, sim_image_b64, sim_prompt, sim_word
from protocol.ids import ModelId
from protocol.messages import (
    ChatMessage,
    FinishReason,
    ImageEditsParams,
    ImageGenerationParams,
    TaskKind,
    TaskParams,
    TextGenerationParams,
)

MODEL = ModelId("sim-model")


def text_params(content: str = "hello there world", **kwargs: object) -> TextGenerationParams:
    return TextGenerationParams(
        model=MODEL,
        messages=(ChatMessage(role="system", content="be brief"), ChatMessage(role="user", content=content)),
        **kwargs,  # type: ignore[arg-type]
    )


def run(
    engine: SimEngine,
    params: TaskParams,
    cancel: threading.Event | None = None,
    on_piece: Callable[[list[str]], None] | None = None,
) -> tuple[list[str], RunOutcome]:
    pieces: list[str] = []

    def sink(text: str) -> None:
        pieces.append(text)
        if on_piece is not None:
            on_piece(pieces)

    async def main() -> RunOutcome:
        return await asyncio.wait_for(engine.run(params, sink, cancel or threading.Event()), timeout=10)

    return pieces, asyncio.run(main())


def test_supports_every_kind_and_loads_instantly() -> None:
    engine = SimEngine(math.inf)
    assert set(engine.kinds) == set(TaskKind)
    progress: list[float] = []
    asyncio.run(engine.load(lambda _what, fraction: progress.append(fraction)))
    assert progress[-1] == 1.0


def test_load_error_is_a_model_load_error() -> None:
    with pytest.raises(ModelLoadError, match="no such weights"):
        asyncio.run(SimEngine(math.inf, load_error="no such weights").load())


def test_rejects_non_positive_rate() -> None:
    with pytest.raises(ValueError):
        SimEngine(0)


def test_text_is_deterministic_and_exactly_max_tokens() -> None:
    params = text_params(max_tokens=12, seed=7)
    pieces, outcome = run(SimEngine(math.inf), params)
    again, _ = run(SimEngine(math.inf), params)
    assert pieces == again
    assert len(pieces) == 12
    expected = [sim_word("", sim_prompt(params), 7, i) for i in range(12)]
    assert "".join(pieces) == " ".join(expected)
    assert outcome.finish_reason is FinishReason.LENGTH
    assert outcome.usage.completion_tokens == 12
    assert outcome.usage.prompt_tokens == 2 + 3  # words of every message


def test_seed_and_salt_change_the_text() -> None:
    base, _ = run(SimEngine(math.inf), text_params(max_tokens=20, seed=1))
    other_seed, _ = run(SimEngine(math.inf), text_params(max_tokens=20, seed=2))
    other_salt, _ = run(SimEngine(math.inf, seed_salt="b"), text_params(max_tokens=20, seed=1))
    assert base != other_seed
    assert base != other_salt


@settings(max_examples=30, deadline=None)
@given(max_tokens=st.integers(min_value=0, max_value=60), prompt=st.text(max_size=40))
def test_any_prompt_yields_exactly_max_tokens(max_tokens: int, prompt: str) -> None:
    pieces, outcome = run(SimEngine(math.inf), text_params(prompt, max_tokens=max_tokens))
    assert len(pieces) == max_tokens
    assert outcome == RunOutcome(FinishReason.LENGTH, outcome.usage)
    assert outcome.usage.completion_tokens == max_tokens


def test_stop_string_ends_with_stop_and_is_not_emitted() -> None:
    full, _ = run(SimEngine(math.inf), text_params(max_tokens=30, seed=3))
    text = "".join(full)
    stop = full[10].strip()  # a word the engine will certainly produce
    cut = text.index(stop)
    pieces, outcome = run(SimEngine(math.inf), text_params(max_tokens=30, seed=3, stop=(stop,)))
    assert outcome.finish_reason is FinishReason.STOP
    assert "".join(pieces) == text[:cut]
    assert stop not in "".join(pieces)


def test_stop_string_never_produced_changes_nothing() -> None:
    pieces, outcome = run(SimEngine(math.inf), text_params(max_tokens=8, stop=("zzz-not-a-word",)))
    assert len(pieces) == 8
    assert outcome.finish_reason is FinishReason.LENGTH


def test_cancel_before_start_emits_nothing() -> None:
    cancel = threading.Event()
    cancel.set()
    pieces, outcome = run(SimEngine(math.inf), text_params(max_tokens=5), cancel)
    assert pieces == []
    assert outcome.finish_reason is FinishReason.CANCELLED
    assert outcome.usage.completion_tokens == 0


def test_cancel_mid_stream_stops_within_one_token() -> None:
    cancel = threading.Event()

    def cancel_after_three(pieces: list[str]) -> None:
        if len(pieces) == 3:
            cancel.set()

    pieces, outcome = run(SimEngine(math.inf), text_params(max_tokens=1000), cancel, cancel_after_three)
    assert len(pieces) == 3
    assert outcome.finish_reason is FinishReason.CANCELLED
    assert outcome.usage.completion_tokens == 3


def test_rate_is_respected() -> None:
    start = time.perf_counter()
    pieces, _ = run(SimEngine(200.0), text_params(max_tokens=20))
    elapsed = time.perf_counter() - start
    assert len(pieces) == 20
    assert elapsed >= 20 / 200.0 * 0.9  # simulated compute time is really spent


@pytest.mark.parametrize(
    "params",
    [
        ImageGenerationParams(model=MODEL, prompt="a red fox", seed=1),
        ImageEditsParams(model=MODEL, prompt="make it blue", image_b64="aGVsbG8=", seed=1),
    ],
)
def test_image_kinds_emit_one_deterministic_base64_chunk(
    params: ImageGenerationParams | ImageEditsParams,
) -> None:
    pieces, outcome = run(SimEngine(math.inf), params)
    assert pieces == [sim_image_b64("", params)]
    assert len(base64.b64decode(pieces[0], validate=True)) == 24
    assert outcome.finish_reason is FinishReason.STOP
    again, _ = run(SimEngine(math.inf), params)
    assert again == pieces


def test_image_cancelled_before_start() -> None:
    cancel = threading.Event()
    cancel.set()
    pieces, outcome = run(SimEngine(math.inf), ImageGenerationParams(model=MODEL, prompt="x"), cancel)
    assert pieces == []
    assert outcome.finish_reason is FinishReason.CANCELLED


def test_unknown_params_type_is_an_engine_error() -> None:
    with pytest.raises(EngineError):
        run(SimEngine(math.inf), object())  # type: ignore[arg-type]
