"""Request bodies decoded and validated with msgspec; every failure a 400 in plain words.

msgspec's own messages name the JSON path ("Expected `float` <= 2.0 - at `$.temperature`"); a bound
on a top-level field is rephrased from the field's declared constraints ("temperature must be
between 0 and 2"), and `param` names the top-level field either way.
"""

from __future__ import annotations

import functools
import re
from typing import Any, TypeVar

import msgspec

from exo_master.http.errors import ApiError, invalid

T = TypeVar("T")

_BOUND = re.compile(r"^Expected `(\w+)`(?: of length)? ([<>]=?) ")
_KINDS = {"array": "items", "str": "characters", "object": "keys"}


def param_of(text: str) -> str | None:
    """The top-level field a msgspec validation message is about (`- at `$.field[0].sub``)."""
    if "at `$." not in text:
        if text.startswith("Object missing required field `"):
            return text.split("`")[1]
        return None
    return text.rsplit("at `$.", 1)[1].rstrip("`").split("[")[0].split(".")[0]


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


# msgspec.inspect's type names as its messages spell them ("Expected `array` of length <= 4").
_SPELLED = {"list": "array", "tuple": "array", "vartuple": "array", "set": "array", "dict": "object"}


def _kind(option: msgspec.inspect.Type) -> str:
    name = type(option).__name__.removesuffix("Type").lower()
    return _SPELLED.get(name, name)


@functools.cache
def _constraints(body_type: type) -> dict[str, dict[str, dict[str, Any]]]:
    """Per top-level field and per kind of value it may hold (a union such as `stop`, a string or
    a list of them, bounds each), the bounds msgspec checks (ge/gt/le/lt, min_length/max_length)."""
    found: dict[str, dict[str, dict[str, Any]]] = {}
    info = msgspec.inspect.type_info(body_type)
    for field in getattr(info, "fields", ()):
        options = field.type.types if isinstance(field.type, msgspec.inspect.UnionType) else (field.type,)
        for option in options:
            bounds = {
                k: getattr(option, k)
                for k in ("ge", "gt", "le", "lt", "min_length", "max_length")
                if getattr(option, k, None) is not None
            }
            if bounds:
                found.setdefault(field.name, {}).setdefault(_kind(option), {}).update(bounds)
    return found


def _sentence(field: str, kind: str, bounds: dict[str, Any]) -> str | None:
    if "min_length" in bounds or "max_length" in bounds:
        unit = _KINDS.get(kind, "items")
        low, high = bounds.get("min_length"), bounds.get("max_length")
        if low is not None and high is not None:
            return f"{field} must have between {low} and {high} {unit}"
        if high is not None:
            return f"{field} must have at most {high} {unit}"
        return f"{field} must have at least {low} {unit}" if low != 1 else f"{field} must not be empty"
    low = "ge" if "ge" in bounds else "gt" if "gt" in bounds else None
    high = "le" if "le" in bounds else "lt" if "lt" in bounds else None
    if low == "ge" and high == "le":
        return f"{field} must be between {_number(bounds['ge'])} and {_number(bounds['le'])}"
    parts = []
    if low is not None:
        parts.append(f"{'at least' if low == 'ge' else 'greater than'} {_number(bounds[low])}")
    if high is not None:
        parts.append(f"{'at most' if high == 'le' else 'less than'} {_number(bounds[high])}")
    return f"{field} must be {' and '.join(parts)}" if parts else None


def humanize(text: str, body_type: type) -> str:
    """A bound violation on a top-level field as a sentence; any other message as msgspec wrote it."""
    match = _BOUND.match(text)
    path = text.rsplit("at `$.", 1)[1].rstrip("`") if "at `$." in text else ""
    if match is not None and path.isidentifier():
        bounds = _constraints(body_type).get(path, {}).get(match.group(1))
        if bounds:
            sentence = _sentence(path, match.group(1), bounds)
            if sentence is not None:
                return sentence
    return f"invalid request: {text}"


def decode_json(raw: bytes, body_type: type[T]) -> T:
    """Decode and validate a JSON body; every failure is a 400 (never a 500)."""
    try:
        return msgspec.json.decode(raw, type=body_type)
    except msgspec.ValidationError as exc:
        text = str(exc)
        raise invalid(humanize(text, body_type), param_of(text)) from exc
    except msgspec.DecodeError as exc:
        raise invalid(f"malformed JSON body: {exc}", code="invalid_json") from exc
    # msgspec reports invalid UTF-8 as UnicodeDecodeError and too-deep nesting as RecursionError.
    except UnicodeDecodeError as exc:
        raise invalid("the body is not valid UTF-8", code="invalid_json") from exc
    except RecursionError as exc:
        raise invalid("the JSON body is nested too deeply", code="invalid_json") from exc


__all__ = ["ApiError", "decode_json", "humanize", "param_of"]
