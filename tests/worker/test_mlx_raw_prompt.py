"""MlxEngine on a legacy completion (TextGenerationParams.prompt): the raw text, no chat template."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from exo_worker.mlx_engine import MlxEngine
from protocol.ids import ModelId
from protocol.messages import ChatMessage, FinishReason, TextGenerationParams

pytestmark = pytest.mark.mlx


def run(engine: MlxEngine, params: TextGenerationParams) -> tuple[str, int, FinishReason]:
    pieces: list[str] = []
    outcome = asyncio.run(engine.run(params, pieces.append, threading.Event()))
    return "".join(pieces), outcome.usage.prompt_tokens, outcome.finish_reason


def test_a_raw_prompt_is_continued_without_the_chat_template(tiny_model_dir: Path) -> None:
    engine = MlxEngine(tiny_model_dir, label="tiny")
    asyncio.run(engine.load())
    try:
        text = "The capital of France is"
        raw = TextGenerationParams(
            model=ModelId("tiny"), messages=(), prompt=text, max_tokens=6, temperature=0.0
        )
        chat = TextGenerationParams(
            model=ModelId("tiny"),
            messages=(ChatMessage(role="user", content=text),),
            max_tokens=6,
            temperature=0.0,
        )
        raw_text, raw_prompt_tokens, reason = run(engine, raw)
        _, chat_prompt_tokens, _ = run(engine, chat)
        assert reason is FinishReason.LENGTH and raw_text
        # The chat template wraps the text in role markers: the raw prompt is strictly shorter.
        assert 0 < raw_prompt_tokens < chat_prompt_tokens
    finally:
        engine.close()
