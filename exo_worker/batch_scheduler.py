"""BatchScheduler: continuous batching of one model instance's requests with mlx-lm's BatchGenerator.

Requests join the batch between steps (`admit`) and leave it when they end: at EOS, at max_tokens,
at a stop string, on cancel, or when their `on_text` fails. Each step decodes one token for every
sequence in the batch and processes one *chunk* of every prompt still being prefilled (mlx-lm's
BatchGenerator does both in one `next()`), then hands each request its piece of text and waits
until every piece was taken (see text_delivery). Cancels are checked before and after each step, so
a cancel takes effect at the next chunk boundary and the generator lets go of the sequence; the
other requests keep decoding.

Why chunks: a prompt is processed `prefill_step_size` tokens per `next()`, 2,048 by default. On a
CPU that prefills ~3-10 tokens/s that is minutes in which nothing else decodes and no cancel is
seen. The chunk is fixed (`prefill_chunk`) or, by default, sized from the measured prefill rate so
that one step's prompt work takes about `AUTO_CHUNK_SECONDS` (at least `MIN_CHUNK` tokens, so a
fast GPU still gets large, efficient chunks up to `MAX_CHUNK`).

A prompt that cannot fit the model's context with its completion fails at admission, after
tokenization only (`fit_completion`).

Before a prompt is processed, the instance's prompt cache is asked for the longest cached prefix;
only the rest is run through the model. When a sequence ends, its KV cache (prompt and answer) goes
back into the prompt cache for the next turn of the same conversation, or the next chat sharing its
system prompt.

Everything here runs on the engine's MLX thread only.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from exo_worker import sampling_defaults
from exo_worker.engine import EngineError, RunOutcome, fit_completion
from exo_worker.prompt_cache import PromptCache
from exo_worker.sampling import make_request_sampler
from exo_worker.stop_strings import StopStringFilter
from exo_worker.text_delivery import Delivery, deliver_all
from exo_worker.tool_calls import format_of, template_messages, template_tools
from exo_worker.work_meter import WorkMeter
from protocol.messages import FinishReason, TextGenerationParams, Usage

CANCELLED = RunOutcome(finish_reason=FinishReason.CANCELLED, usage=Usage())
MIN_CHUNK, MAX_CHUNK = 4, 2048  # prompt tokens per step, per prompt
FIRST_CHUNK = 16  # before the prefill rate is measured
AUTO_CHUNK_SECONDS = 0.5  # target prompt-processing time per step when the chunk is automatic


@dataclass(eq=False, slots=True)
class GenRequest:
    """One generation as handed to the MLX thread; `future` gets its outcome (or EngineError)."""

    params: TextGenerationParams
    delivery: Delivery
    stopped: Callable[[], bool]  # cancelled, or the awaiting task went away
    future: concurrent.futures.Future[RunOutcome]
    prompt: list[int] | None = None  # tokenized (and checked against the context) before it queued

    def start(self) -> bool:
        """Mark the request as taken; False when its awaiting task already gave up."""
        return self.future.set_running_or_notify_cancel()

    def settle(self, outcome: RunOutcome | EngineError) -> None:
        if isinstance(outcome, EngineError):
            self.future.set_exception(outcome)
        else:
            self.future.set_result(outcome)


@dataclass(eq=False, slots=True)
class _Sequence:
    """A request in the batch, with its decoding state."""

    request: GenRequest
    uid: int
    prompt_tokens: int
    detokenizer: Any
    stops: StopStringFilter
    prefill_left: int = 0  # prompt tokens not processed yet (0: decoding)
    completion_tokens: int = 0

    def outcome(self, reason: FinishReason) -> RunOutcome:
        return RunOutcome(
            finish_reason=reason,
            usage=Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens),
            # Set only once a stop string ended the text, and then the sequence ends with STOP.
            stop_sequence=self.stops.matched if reason is FinishReason.STOP else None,
        )


class BatchScheduler:
    """The batch of one engine: at most `max_batch` sequences decode together."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_batch: int,
        prompt_cache: PromptCache,
        default_sampling: sampling_defaults.Sampling = sampling_defaults.CONSERVATIVE,
        context_length: int = 0,
        prefill_chunk: int = 0,
        meter: WorkMeter | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if prefill_chunk < 0:
            raise ValueError(f"prefill_chunk must be >= 0 (0: automatic), got {prefill_chunk}")
        self.context_length = context_length  # 0: unknown, not checked
        self._fixed_chunk = prefill_chunk
        self.meter = meter or WorkMeter(prefill_chunk)
        self._model = model
        self._tokenizer = tokenizer
        self.max_batch = max_batch
        self.prompt_cache = prompt_cache
        # For requests that leave temperature/top_p unset (None): the model's own default.
        self._default_sampling = default_sampling
        self._log = structlog.get_logger(__name__)
        self._active: dict[int, _Sequence] = {}
        # Every admitted request whose outcome is not set yet, in the batch or just leaving it: on a
        # failure, fail_all ends them all, so no awaiting task is left without an answer.
        self._owned: set[GenRequest] = set()
        self._generator = self._new_generator()

    def _new_generator(self) -> Any:
        from mlx_lm.generate import BatchGenerator

        eos = [[token] for token in sorted(self._tokenizer.eos_token_ids)]
        return BatchGenerator(
            self._model,
            stop_tokens=eos,
            completion_batch_size=self.max_batch,
            prefill_batch_size=self.max_batch,
            # The chunk is set before every step (`_chunk_size`); this is only the generator's
            # internal split of what one step hands it, which must not cut a chunk again.
            prefill_step_size=MAX_CHUNK,
        )

    @property
    def free_slots(self) -> int:
        return self.max_batch - len(self._active)

    @property
    def busy(self) -> bool:
        return bool(self._active)

    # ---- joining the batch -----------------------------------------------------------------

    def admit(self, request: GenRequest) -> None:
        """Put a request into the batch (its prompt is processed by the next step)."""
        assert self.free_slots > 0, "admit() beyond max_batch"
        if not request.start():
            return
        if request.stopped():  # cancelled while it waited for a slot
            request.settle(CANCELLED)
            return
        params = request.params
        try:
            prompt = request.prompt if request.prompt is not None else self.tokenize(params)
            max_tokens = fit_completion(params, len(prompt), self.context_length)
        except EngineError as exc:
            request.settle(exc)
            return
        from mlx_lm.models.cache import make_prompt_cache

        sampling = sampling_defaults.resolve(params, self._default_sampling)
        try:
            cache, reused = self.prompt_cache.fetch(prompt)
            if cache is None:
                cache = make_prompt_cache(self._model)
            (uid,) = self._generator.insert(
                [prompt[reused:]],
                max_tokens=[max_tokens],
                caches=[cache],
                all_tokens=[prompt[:reused]],
                samplers=[
                    make_request_sampler(sampling.temperature, sampling.top_p, params.seed, params.top_k)
                ],
            )
        except Exception as exc:  # this request cannot join; the batch goes on without it
            self._log.exception("admission failed")
            request.settle(EngineError(f"generation failed: {one_line(exc)}"))
            return
        self._owned.add(request)
        self._active[uid] = _Sequence(
            request=request,
            uid=uid,
            prompt_tokens=len(prompt),
            detokenizer=self._tokenizer.detokenizer,
            stops=StopStringFilter(params.stop),
            prefill_left=len(prompt) - reused,
        )
        self.publish()

    def tokenize(self, params: TextGenerationParams) -> list[int]:
        """The prompt's tokens (and its chars-per-token measured). Uses only the tokenizer, so the
        engine may call it on another thread, before the request waits for a batch slot."""
        # A legacy completion (params.prompt set) continues the raw text: no chat template.
        raw = params.prompt
        prompt = self._encode_prompt(params) if raw is None else self._encode_raw(raw)
        chars = len(raw) if raw is not None else sum(len(m.content) for m in params.messages)
        self.meter.chars_per_token.add(chars, len(prompt))
        return prompt

    def _encode_prompt(self, params: TextGenerationParams) -> list[int]:
        chat = template_messages(params.messages)
        try:
            text = self._tokenizer.apply_chat_template(
                chat, tools=template_tools(params.tools), add_generation_prompt=True, tokenize=False
            )
            fmt = format_of(self._tokenizer)
            if params.tools and params.tool_choice == "required" and fmt is not None:
                text += fmt.start  # the answer starts inside a tool call (MlxEngine parses it so)
            # The template already writes any BOS token, so the tokenizer must not add another.
            ids: list[int] = self._tokenizer.encode(text, add_special_tokens=False)
        except Exception as exc:  # tokenizers and jinja raise many kinds; one line fails this request
            raise EngineError(f"cannot build the prompt: {one_line(exc)}") from exc
        if not ids:
            raise EngineError("the prompt is empty after applying the chat template")
        return ids

    def _encode_raw(self, text: str) -> list[int]:
        """A raw prompt (/v1/completions), tokenized as is; the tokenizer adds its BOS token if any."""
        try:
            ids: list[int] = self._tokenizer.encode(text)
        except Exception as exc:  # tokenizers raise many kinds; one line fails this request
            raise EngineError(f"cannot tokenize the prompt: {one_line(exc)}") from exc
        if not ids:
            raise EngineError("the prompt is empty")
        return ids

    # ---- one step ----------------------------------------------------------------------------

    def step(self) -> None:
        """Decode one token for every sequence, hand out the text, and retire what ended."""
        self._drop_stopped()
        if not self._active:
            self.publish()
            return
        self._generator.prefill_step_size = self._chunk_size()
        try:
            with self._generator.stats() as stats:
                prompt_responses, responses = self._generator.next()
        except Exception as exc:  # a model failure: every sequence of this batch is lost with it
            self._log.exception("batch step failed", sequences=len(self._active))
            self.fail_all(EngineError(f"generation failed: {one_line(exc)}"))
            return
        self.meter.prefill.add(stats.prompt_tokens, stats.prompt_time)
        self.meter.decode.add(stats.generation_steps, stats.decode_time)
        for progress in prompt_responses:
            prefilling = self._active.get(progress.uid)
            if prefilling is not None:
                done, total = progress.progress
                prefilling.prefill_left = max(0, total - done)
        pieces: list[tuple[Delivery, str]] = []
        ended: list[tuple[_Sequence, FinishReason]] = []
        for response in responses:
            seq = self._active[response.uid]
            seq.prefill_left = 0
            seq.completion_tokens += 1
            if response.finish_reason == "stop":  # EOS: its text is not part of the answer
                seq.detokenizer.finalize()
            else:
                seq.detokenizer.add_token(response.token)
                if response.finish_reason is not None:
                    seq.detokenizer.finalize()
            text, hit = seq.stops.feed(seq.detokenizer.last_segment)
            if hit:
                ended.append((seq, FinishReason.STOP))
                self._remove(seq, keep_cache=True)
            elif response.finish_reason is not None:
                tail, hit = seq.stops.flush()  # a stop string may still be held, undecided
                text += tail
                reason = FinishReason.STOP if hit or response.finish_reason == "stop" else FinishReason.LENGTH
                ended.append((seq, reason))
                del self._active[seq.uid]  # the generator has dropped it already
                self.prompt_cache.insert(response.all_tokens, response.prompt_cache)
            pieces.append((seq.request.delivery, text))
        deliver_all(pieces)
        for seq, reason in ended:
            failure = seq.request.delivery.failure()
            self._settle(seq.request, failure if failure is not None else seq.outcome(reason))
        for seq in list(self._active.values()):
            failure = seq.request.delivery.failure()
            if failure is not None:
                self._remove(seq, keep_cache=False)
                self._settle(seq.request, failure)
        self._drop_stopped()  # a cancel set while the text was delivered: honoured within one token
        self.publish()

    def _chunk_size(self) -> int:
        """Prompt tokens each prefilling sequence processes in the next step."""
        if self._fixed_chunk:
            return self._fixed_chunk
        rate = self.meter.prefill.value
        if rate <= 0:
            return FIRST_CHUNK
        prefilling = sum(1 for seq in self._active.values() if seq.prefill_left > 0) or 1
        chunk = int(rate * AUTO_CHUNK_SECONDS / prefilling)
        self.meter.prefill_chunk = max(MIN_CHUNK, min(MAX_CHUNK, chunk))
        return self.meter.prefill_chunk

    def publish(self) -> None:
        """Make the batch's current work visible to heartbeats (see WorkMeter)."""
        active = self._active.values()
        self.meter.publish(
            prefill_tokens=sum(seq.prefill_left for seq in active),
            decoding=sum(1 for seq in active if seq.prefill_left == 0),
        )

    def _drop_stopped(self) -> None:
        for seq in [s for s in self._active.values() if s.request.stopped()]:
            self._remove(seq, keep_cache=False)
            self._settle(seq.request, seq.outcome(FinishReason.CANCELLED))

    def _remove(self, seq: _Sequence, *, keep_cache: bool) -> None:
        del self._active[seq.uid]
        caches = self._generator.remove([seq.uid], return_prompt_caches=keep_cache)
        if keep_cache and seq.uid in caches:
            cache, tokens = caches[seq.uid]
            self.prompt_cache.insert(tokens, cache)

    def fail_all(self, error: EngineError, *, restart: bool = True) -> None:
        """End every sequence of the batch with `error` (and start a fresh generator)."""
        self._active = {}
        self.publish()
        self._generator.close()
        if restart:  # a fresh generator: the failed one's batch state is not to be trusted
            self._generator = self._new_generator()
        for request in list(self._owned):
            self._settle(request, error)

    def _settle(self, request: GenRequest, outcome: RunOutcome | EngineError) -> None:
        self._owned.discard(request)
        self.publish()  # before the awaiting task learns it ended: its work is gone from the report
        request.settle(outcome)

    def close(self) -> None:
        """Release the generator; anything still in the batch fails (the engine is going away)."""
        self.fail_all(EngineError("the engine is closed"), restart=False)


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
