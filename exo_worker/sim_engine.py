"""SimEngine: a fake inference backend for load tests and cluster tests. No model, no weights.

It behaves like a real engine from the scheduler's point of view: it takes time per token (the
configured tokens/s stands in for compute), streams text, honours max_tokens, stop strings and
cancellation, and serves every task kind. Its output is deterministic: each word is chosen by a hash
of (salt, prompt, seed, token index), so a test or benchmark can predict the exact text.

Prefill is modelled when `prefill_tokens_per_s` is finite: a prompt of N tokens (one word, one
token) is processed in chunks of `prefill_chunk` tokens, each taking chunk / rate seconds of the
instance's one compute lane (chunks of concurrent prompts take turns, first come first served, as
mlx-lm's batch steps do); a cancel takes effect at the next chunk boundary. A decoding sequence
waits for the chunk in progress before its next token, as a batch step does. With a
`context_length`, a prompt plus max_tokens over it fails as the MLX engine's does.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import threading

from exo_worker.engine import EngineError, ModelLoadError, ProgressSink, RunOutcome, TextSink, fit_completion
from exo_worker.stop_strings import StopStringFilter
from exo_worker.tool_calls import ToolFormat, load_format, run_with_tools
from exo_worker.work_meter import RatioMeter
from protocol.messages import (
    FinishReason,
    ImageEditsParams,
    ImageGenerationParams,
    InstanceWork,
    TaskKind,
    TaskParams,
    TextGenerationParams,
    Usage,
)

ALL_KINDS: tuple[TaskKind, ...] = tuple(TaskKind)

# A small fixed vocabulary: output reads as (nonsense) words, and one word is one simulated token.
_VOCABULARY: tuple[str, ...] = (
    "the", "cluster", "schedules", "a", "task", "on", "every", "node", "model", "token",
    "stream", "quickly", "and", "fair", "queue", "master", "worker", "heartbeat", "bus", "message",
    "slot", "ready", "load", "light", "blue", "river", "stone", "cloud", "seven", "green",
    "quiet", "bright", "answer", "question", "simple", "small", "large", "fast", "slow", "open",
    "window", "garden", "paper", "signal", "bridge", "forest", "north", "south",
)  # fmt: skip


def _digest(*parts: object, size: int = 8) -> bytes:
    text = "\x00".join(str(p) for p in parts)
    return hashlib.blake2b(text.encode(), digest_size=size).digest()


def sim_word(salt: str, prompt: str, seed: int | None, index: int) -> str:
    """The word a SimEngine emits at token `index`; public so tests can predict output."""
    value = int.from_bytes(_digest(salt, prompt, seed, index), "big")
    return _VOCABULARY[value % len(_VOCABULARY)]


def sim_prompt(params: TextGenerationParams) -> str:
    if params.prompt is not None:  # a legacy completion: the raw prompt, no chat roles
        return params.prompt
    return "\n".join(f"{m.role}: {m.content}" for m in params.messages)


def word_count(text: str) -> int:
    return len(text.split())


class SimEngine:
    """Load-testing engine: deterministic text at a fixed rate; every TaskKind supported.

    `tokens_per_s` may be math.inf for "as fast as possible" (it still yields to the event loop
    every token, so a busy SimEngine never starves the bus).
    """

    def __init__(
        self,
        tokens_per_s: float,
        seed_salt: str = "",
        *,
        load_delay_s: float = 0.0,
        load_error: str | None = None,
        kinds: tuple[TaskKind, ...] = ALL_KINDS,
        tool_format: str = "json_tools",
        prefill_tokens_per_s: float = math.inf,
        prefill_chunk: int = 256,
        context_length: int = 0,
    ) -> None:
        if not tokens_per_s > 0:
            raise ValueError(f"tokens_per_s must be > 0, got {tokens_per_s}")
        if not prefill_tokens_per_s > 0:
            raise ValueError(f"prefill_tokens_per_s must be > 0, got {prefill_tokens_per_s}")
        if prefill_chunk < 1 or context_length < 0:
            raise ValueError("prefill_chunk must be >= 1 and context_length >= 0")
        self._interval = 0.0 if math.isinf(tokens_per_s) else 1.0 / tokens_per_s
        self._tokens_per_s = tokens_per_s
        self._prefill_rate = prefill_tokens_per_s
        self._prefill_chunk = prefill_chunk
        self._context_length = context_length
        self._lane = asyncio.Lock()  # created lazily on first use by asyncio: no loop needed here
        self._lane_idle = asyncio.Event()
        self._lane_idle.set()
        self._prefill_left = 0  # over all prompts being processed
        self._decoding = 0
        self._chars_per_token = RatioMeter(decay=0.95)
        self._salt = seed_salt
        self._load_delay_s = load_delay_s
        # Lets tests and cluster experiments exercise the "instance failed to load" path.
        self._load_error = load_error
        self._kinds = kinds
        # The model family whose tool-call syntax it writes (an mlx_lm.tool_parsers module).
        self._tool_format = tool_format
        self._loaded_format: ToolFormat | None = None

    @property
    def kinds(self) -> tuple[TaskKind, ...]:
        return self._kinds

    @property
    def context_length(self) -> int:
        return self._context_length

    def work(self) -> InstanceWork:
        finite = not math.isinf(self._prefill_rate)
        return InstanceWork(
            prefill_tokens=self._prefill_left,
            decoding=self._decoding,
            prefill_rate=self._prefill_rate if finite else 0.0,
            decode_rate=0.0 if math.isinf(self._tokens_per_s) else self._tokens_per_s,
            chars_per_token=round(self._chars_per_token.value, 3),
            prefill_chunk=self._prefill_chunk if finite else 0,
        )

    async def load(self, progress: ProgressSink | None = None) -> None:
        if progress is not None:
            progress("loading simulated model", 0.0)
        if self._load_delay_s > 0:
            steps = 10  # the simulated load time, in steps, so heartbeats show it progress
            for step in range(1, steps + 1):
                await asyncio.sleep(self._load_delay_s / steps)
                if progress is not None and step < steps:
                    progress("loading simulated model", step / steps)
        if self._load_error is not None:
            raise ModelLoadError(self._load_error)
        if progress is not None:
            progress("loaded", 1.0)

    async def run(self, params: TaskParams, on_text: TextSink, cancel: threading.Event) -> RunOutcome:
        if isinstance(params, TextGenerationParams):
            text_params = params
            fmt = await self._format() if params.tools else None

            async def generate(sink: TextSink) -> RunOutcome:
                return await self._generate_text(text_params, sink, cancel, fmt)

            return await run_with_tools(fmt, params, on_text, generate)
        if isinstance(params, ImageGenerationParams | ImageEditsParams):
            return await self._generate_image(params, on_text, cancel)
        raise EngineError(f"SimEngine cannot run {type(params).__name__}")

    async def _format(self) -> ToolFormat:
        if self._loaded_format is None:
            # Importing mlx-lm takes seconds: off the loop, so the worker keeps heartbeating.
            self._loaded_format = await asyncio.to_thread(load_format, self._tool_format)
        return self._loaded_format

    async def _compute(self, deadline: float) -> float:
        """Sleep until `deadline` (simulated compute time); return the next token's deadline."""
        loop = asyncio.get_running_loop()
        # An absolute schedule keeps the average rate exact despite timer overhead; when the loop
        # fell more than a token behind, restart the schedule from now rather than bursting.
        await asyncio.sleep(max(0.0, deadline - loop.time()))
        return max(deadline, loop.time() - self._interval) + self._interval

    async def _generate_text(
        self,
        params: TextGenerationParams,
        on_text: TextSink,
        cancel: threading.Event,
        fmt: ToolFormat | None = None,
    ) -> RunOutcome:
        prompt = sim_prompt(params)
        texts = [params.prompt] if params.prompt is not None else [m.content for m in params.messages]
        prompt_tokens = sum(word_count(text) for text in texts)
        max_tokens = fit_completion(params, prompt_tokens, self._context_length)
        self._chars_per_token.add(sum(len(text) for text in texts), prompt_tokens)
        if not await self._prefill(prompt_tokens, cancel):
            return RunOutcome(FinishReason.CANCELLED, Usage(prompt_tokens=prompt_tokens))
        self._decoding += 1
        try:
            return await self._decode(params, prompt, prompt_tokens, max_tokens, on_text, cancel, fmt)
        finally:
            self._decoding -= 1

    async def _prefill(self, tokens: int, cancel: threading.Event) -> bool:
        """Process the prompt chunk by chunk on the shared lane; False when cancelled."""
        if math.isinf(self._prefill_rate):
            return True
        self._prefill_left += tokens
        try:
            while tokens > 0:
                async with self._lane:
                    if cancel.is_set():
                        return False
                    chunk = min(self._prefill_chunk, tokens)
                    self._lane_idle.clear()
                    try:
                        await asyncio.sleep(chunk / self._prefill_rate)  # simulated compute
                    finally:
                        self._lane_idle.set()
                    tokens -= chunk
                    self._prefill_left -= chunk
                if cancel.is_set():  # at the chunk boundary
                    return False
            return True
        finally:
            self._prefill_left -= tokens

    async def _decode(
        self,
        params: TextGenerationParams,
        prompt: str,
        prompt_tokens: int,
        max_tokens: int,
        on_text: TextSink,
        cancel: threading.Event,
        fmt: ToolFormat | None,
    ) -> RunOutcome:
        call = sim_tool_call(params, fmt)
        pieces = call.split(" ") if call is not None else None
        stops = StopStringFilter(params.stop)
        deadline = asyncio.get_running_loop().time() + self._interval
        for index in range(max_tokens):
            if not self._lane_idle.is_set():  # a prompt chunk is being processed: this step waits
                await self._lane_idle.wait()
            if cancel.is_set():
                return RunOutcome(
                    FinishReason.CANCELLED, Usage(prompt_tokens=prompt_tokens, completion_tokens=index)
                )
            deadline = await self._compute(deadline)
            if cancel.is_set():  # cancelled during this token's compute: stop within one token
                return RunOutcome(
                    FinishReason.CANCELLED, Usage(prompt_tokens=prompt_tokens, completion_tokens=index)
                )
            if pieces is not None:  # a tool call, written a word at a time like a model would
                if index >= len(pieces):
                    tail, _ = stops.flush()
                    if tail:
                        on_text(tail)
                    usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=index)
                    return RunOutcome(FinishReason.STOP, usage, stop_sequence=stops.matched)
                word = pieces[index]
            else:
                word = sim_word(self._salt, prompt, params.seed, index)
            text, hit = stops.feed(word if index == 0 else " " + word)
            if text:
                on_text(text)
            if hit:  # the text ends before the stop string (stop_strings.py: the rule every engine uses)
                usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=index + 1)
                return RunOutcome(FinishReason.STOP, usage, stop_sequence=stops.matched)
        tail, hit = stops.flush()
        if tail:
            on_text(tail)
        usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=max_tokens)
        reason = FinishReason.STOP if hit else FinishReason.LENGTH
        return RunOutcome(reason, usage, stop_sequence=stops.matched)

    async def _generate_image(
        self, params: ImageGenerationParams | ImageEditsParams, on_text: TextSink, cancel: threading.Event
    ) -> RunOutcome:
        usage = Usage(prompt_tokens=word_count(params.prompt))
        if cancel.is_set():
            return RunOutcome(FinishReason.CANCELLED, usage)
        await self._compute(asyncio.get_running_loop().time() + self._interval)  # one step of "compute"
        if cancel.is_set():
            return RunOutcome(FinishReason.CANCELLED, usage)
        on_text(sim_image_b64(self._salt, params))
        return RunOutcome(FinishReason.STOP, usage)


def sim_image_b64(salt: str, params: ImageGenerationParams | ImageEditsParams) -> str:
    """The deterministic stand-in "image" (24 bytes, base64) a SimEngine emits for `params`."""
    source = _digest(params.image_b64, size=16).hex() if isinstance(params, ImageEditsParams) else ""
    raw = _digest(salt, params.KIND, params.prompt, params.seed, params.size, params.n, source, size=24)
    return base64.b64encode(raw).decode("ascii")


def sim_tool_call(params: TextGenerationParams, fmt: ToolFormat | None) -> str | None:
    """The tool call a SimEngine writes, in `fmt`'s syntax, or None (a plain answer).

    It calls the first tool unless the conversation ends with a tool's result (then it answers
    in words), so a test sees the whole round trip: call, result, answer. Arguments follow the
    tool's schema: a word for a string, 7 for a number, true for a boolean.
    """
    if fmt is None or not params.tools or (params.messages and params.messages[-1].role == "tool"):
        return None
    tool = params.tools[0]
    properties = tool.parameters.get("properties", {})
    values: dict[object, object] = {"integer": 7, "number": 7, "boolean": True, "array": [], "object": {}}
    arguments = {
        name: values.get(spec.get("type") if isinstance(spec, dict) else None, "seven")
        for name, spec in (properties.items() if isinstance(properties, dict) else ())
    }
    body = json.dumps({"name": tool.name, "arguments": arguments})
    return f"{fmt.start}\n{body}\n{fmt.end}"
