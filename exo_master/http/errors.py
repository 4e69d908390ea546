"""HTTP errors: one exception type, one mapper to each API surface's shape, one body decoder.

Every client mistake is an `ApiError` with the right 4xx, naming the offending parameter where
there is one. Each surface spells errors its own way (`ErrorStyle`): OpenAI's
`{"error": {"message", "type", "param", "code"}}`, Anthropic's
`{"type": "error", "error": {"type", "message"}}`, Ollama's `{"error": "message"}`. `error_payload`
is the only place that spells them, for whole responses and for a failure mid-stream alike.
"""

from __future__ import annotations

import enum
from typing import Any, TypeVar

from starlette.responses import JSONResponse

T = TypeVar("T")


class ErrorStyle(enum.Enum):
    OPENAI = "openai"
    ANTHROPIC = "anthropic"
    OLLAMA = "ollama"


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, type_: str, code: str | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def response(self, style: ErrorStyle = ErrorStyle.OPENAI) -> JSONResponse:
        return JSONResponse(error_payload(self, style), status_code=self.status)


# Anthropic names its error types by what happened, not by status alone.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def error_payload(error: ApiError, style: ErrorStyle) -> dict[str, Any]:
    """The JSON body of `error` in the shape of one API surface."""
    if style is ErrorStyle.ANTHROPIC:
        type_ = _ANTHROPIC_TYPES.get(
            error.status, "api_error" if error.status >= 500 else "invalid_request_error"
        )
        return {"type": "error", "error": {"type": type_, "message": error.message}}
    if style is ErrorStyle.OLLAMA:
        return {"error": error.message}
    return error_body(error.message, error.type, error.code, error.param)


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    """A 400 for a request the API understands but refuses."""
    return ApiError(400, message, "invalid_request_error", code, param)


def unsupported(param: str, why: str) -> ApiError:
    """A 400 for a parameter this server does not implement (never silently ignored)."""
    return ApiError(
        400,
        f"'{param}' is not supported by this server: {why}",
        "invalid_request_error",
        "unsupported_parameter",
        param,
    )


def model_not_found(model: str, served: list[str]) -> ApiError:
    """The one answer for a model no live instance serves, on every route and surface."""
    listing = ", ".join(served) if served else "none (no instance is live)"
    return ApiError(
        404,
        f"the model {model!r} is not served by this cluster; served models: {listing}",
        "invalid_request_error",
        code="model_not_found",
        param="model",
    )
