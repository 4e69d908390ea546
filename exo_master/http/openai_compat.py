"""Which OpenAI parameters this server honours, decided per field: refused loudly, never ignored.

The engines do plain sampling (temperature, top_p, stop, seed, max_tokens) and tool calls. A
parameter that would change the answer in a way they cannot deliver is a 400 naming it (`param` in
the error); a value that changes nothing (penalties of 0, `response_format: {"type": "text"}`,
`n: 1`, `logprobs: false`) is accepted, and so are fields that only concern OpenAI's own service
(`store`, `metadata`, `user`, prompt-cache keys). `CHAT_FIELDS` is the decision for every field of
the OpenAI SDK's chat request; the README's compatibility table lists the same decisions.
"""

from __future__ import annotations

from typing import Literal

from exo_master.http.errors import ApiError, invalid, unsupported
from exo_master.http.openai_schema import ChatCompletionRequest, CompletionRequest, SamplingFields


def _refuse_sampling(body: SamplingFields) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name) not in (None, 0):
            raise unsupported(name, "the engines sample without penalties (0 is accepted)")
    if body.logit_bias:
        raise unsupported("logit_bias", "the engines sample without logit biases ({} is accepted)")


Decision = Literal["honoured", "harmless", "refused"]

# Every key of the openai SDK's chat `CompletionCreateParams` (plus `stream`), decided. "refused"
# fields are accepted only when absent or at a value that changes nothing (see below).
CHAT_FIELDS: dict[str, Decision] = {
    "model": "honoured",
    "messages": "honoured",
    "max_tokens": "honoured",
    "max_completion_tokens": "honoured",
    "temperature": "honoured",
    "top_p": "honoured",
    "stop": "honoured",
    "seed": "honoured",
    "stream": "honoured",
    "stream_options": "honoured",
    "tools": "honoured",
    "tool_choice": "honoured",
    "parallel_tool_calls": "honoured",
    "n": "honoured",  # 1 only
    "response_format": "honoured",  # {"type": "text"} only
    # Only about OpenAI's own service: they change nothing in the answer.
    "metadata": "harmless",
    "store": "harmless",
    "user": "harmless",
    "safety_identifier": "harmless",
    "prompt_cache_key": "harmless",
    "prompt_cache_retention": "harmless",
    "prompt_cache_options": "harmless",
    "prediction": "harmless",  # a latency hint; the answer is the same without it
    "service_tier": "harmless",  # "auto" and "default" only: there is one tier here
    "presence_penalty": "refused",
    "frequency_penalty": "refused",
    "logit_bias": "refused",
    "logprobs": "refused",
    "top_logprobs": "refused",
    "functions": "refused",
    "function_call": "refused",
    "reasoning_effort": "refused",
    "verbosity": "refused",
    "modalities": "refused",
    "audio": "refused",
    "web_search_options": "refused",
    "moderation": "refused",
}


def refuse_unsupported_chat(body: ChatCompletionRequest) -> None:
    _refuse_sampling(body)
    if body.logprobs:
        raise unsupported("logprobs", "log probabilities are not returned (false is accepted)")
    if body.top_logprobs:
        raise unsupported("top_logprobs", "log probabilities are not returned (0 is accepted)")
    if body.response_format is not None and body.response_format.type != "text":
        raise unsupported("response_format", 'only {"type": "text"} is supported')
    if body.functions or body.function_call is not None:
        name = "functions" if body.functions else "function_call"
        raise unsupported(
            name, "the legacy function-call fields are not supported; send tools and tool_choice"
        )
    if body.reasoning_effort is not None:
        raise unsupported("reasoning_effort", "the served models have no reasoning-effort setting")
    if body.verbosity is not None:
        raise unsupported("verbosity", "answer length is set with max_tokens here")
    if body.service_tier not in (None, "auto", "default"):
        raise unsupported("service_tier", 'there is one service tier here ("auto" or "default" is accepted)')
    if body.modalities not in (None, ["text"]):
        raise unsupported("modalities", 'the answer is text only (["text"] is accepted)')
    if body.audio is not None:
        raise unsupported("audio", "the answer is text only")
    if body.web_search_options is not None:
        raise unsupported("web_search_options", "there is no web search here")
    if body.moderation is not None:
        raise unsupported("moderation", "no moderation is applied here")
    for message in body.messages:
        if isinstance(message.content, list) and any(p.type != "text" for p in message.content):
            raise unsupported("messages", "only text content parts are supported (no images or audio)")


def refuse_unsupported_completion(body: CompletionRequest) -> None:
    _refuse_sampling(body)
    if body.echo:
        raise unsupported("echo", "the prompt is not echoed (false is accepted)")
    if body.suffix:
        raise unsupported("suffix", "insertion (suffix) is not supported")
    if body.logprobs:
        raise unsupported("logprobs", "log probabilities are not returned (0 or null is accepted)")
    if body.best_of not in (None, 1):
        raise unsupported("best_of", "one completion per request (1 is accepted)")


def check_prompt_size(chars: int, limit: int, param: str) -> None:
    """Refuse an over-long prompt here, before it is shipped over the bus to a worker."""
    if chars > limit:
        raise ApiError(
            413,
            f"the prompt has {chars} characters; this server accepts at most {limit} (--max-prompt-chars)",
            "invalid_request_error",
            "prompt_too_large",
            param,
        )


def refuse_empty_prompt(text: str, param: str) -> None:
    if not text:
        raise invalid("the prompt is empty", param)
