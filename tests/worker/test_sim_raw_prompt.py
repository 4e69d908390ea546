"""SimEngine on a legacy completion: the words follow the raw prompt, not the chat rendering."""

from __future__ import annotations

import asyncio
import math
import threading

from exo_worker.sim_engine import SimEngine, sim_word
from protocol.ids import ModelId
from protocol.messages import ChatMessage, TextGenerationParams


def run(params: TextGenerationParams) -> tuple[str, int]:
    pieces: list[str] = []
    outcome = asyncio.run(SimEngine(math.inf).run(params, pieces.append, threading.Event()))
    return "".join(pieces), outcome.usage.prompt_tokens


def test_raw_prompt_drives_the_words_and_the_prompt_token_count() -> None:
    raw = TextGenerationParams(
        model=ModelId("m"), messages=(), prompt="once upon a time", max_tokens=5, seed=2
    )
    text, prompt_tokens = run(raw)
    assert text == " ".join(sim_word("", "once upon a time", 2, i) for i in range(5))
    assert prompt_tokens == 4
    chat = TextGenerationParams(
        model=ModelId("m"),
        messages=(ChatMessage(role="user", content="once upon a time"),),
        max_tokens=5,
        seed=2,
    )
    assert run(chat)[0] == " ".join(sim_word("", "user: once upon a time", 2, i) for i in range(5))
