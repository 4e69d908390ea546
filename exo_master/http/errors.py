"""OpenAI-style HTTP errors: one exception type, one JSON shape, one body decoder that never 500s.

Every client mistake becomes `{"error": {"message", "type", "param", "code"}}` with the right 4xx,
naming the offending parameter where there is one (the OpenAI SDKs surface `param`).
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec
from starlette.responses import JSONResponse

T = TypeVar("T")


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, type_: str, code: str | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def response(self) -> JSONResponse:
        return JSONResponse(
            error_body(self.message, self.type, self.code, self.param), status_code=self.status
        )


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


def param_of(text: str) -> str | None:
    """The top-level field a msgspec validation message is about (`- at `$.field[0].sub``)."""
    if "at `$." not in text:
        if text.startswith("Object missing required field `"):
            return text.split("`")[1]
        return None
    return text.rsplit("at `$.", 1)[1].rstrip("`").split("[")[0].split(".")[0]


def decode_json(raw: bytes, body_type: type[T]) -> T:
    """Decode and validate a JSON body; every failure is a 400 (never a 500)."""
    try:
        return msgspec.json.decode(raw, type=body_type)
    except msgspec.ValidationError as exc:
        text = str(exc)
        raise invalid(f"invalid request: {text}", param_of(text)) from exc
    except msgspec.DecodeError as exc:
        raise invalid(f"malformed JSON body: {exc}", code="invalid_json") from exc
    # msgspec reports invalid UTF-8 as UnicodeDecodeError and too-deep nesting as RecursionError.
    except UnicodeDecodeError as exc:
        raise invalid("the body is not valid UTF-8", code="invalid_json") from exc
    except RecursionError as exc:
        raise invalid("the JSON body is nested too deeply", code="invalid_json") from exc
