"""Which OpenAI parameters this server honours, decided per field: refused loudly, never ignored.

The engines do plain sampling (temperature, top_p, stop, seed, max_tokens). A parameter that would
change the answer in a way they cannot deliver is a 400 naming it (`param` in the error); a value
that changes nothing (penalties of 0, `tool_choice: "none"`, `response_format: {"type": "text"}`,
`n: 1`, `logprobs: false`) is accepted. The README's compatibility table lists the same decisions.
"""

from __future__ import annotations

from exo_master.http.errors import ApiError, invalid, unsupported
from exo_master.http.openai_schema import ChatCompletionRequest, CompletionRequest, SamplingFields


def _refuse_sampling(body: SamplingFields) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name) not in (None, 0):
            raise unsupported(name, "the engines sample without penalties (0 is accepted)")
    if body.logit_bias:
        raise unsupported("logit_bias", "the engines sample without logit biases ({} is accepted)")


def refuse_unsupported_chat(body: ChatCompletionRequest) -> None:
    _refuse_sampling(body)
    if body.logprobs:
        raise unsupported("logprobs", "log probabilities are not returned (false is accepted)")
    if body.top_logprobs:
        raise unsupported("top_logprobs", "log probabilities are not returned (0 is accepted)")
    if body.response_format is not None and body.response_format.type != "text":
        raise unsupported("response_format", 'only {"type": "text"} is supported')
    if body.tool_choice not in (None, "none", "auto"):
        raise unsupported("tool_choice", 'tool calls are not supported ("none" is accepted)')
    if body.tools and body.tool_choice != "none":
        raise unsupported("tools", 'tool calls are not supported (send tool_choice "none" to ignore tools)')
    if body.function_call not in (None, "none", "auto"):
        raise unsupported("function_call", 'function calls are not supported ("none" is accepted)')
    if body.functions and body.function_call != "none":
        raise unsupported("functions", "function calls are not supported")
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
