"""Checks every input goes through before it reaches the database: text that
PostgreSQL can store, ids that fit its integer columns, JSON of bounded depth."""

import json
import re
from typing import Any

from app.services.errors import Invalid

# Ids are PostgreSQL `integer` columns: a larger number can name nothing.
MAX_ID = 2**31 - 1
# Nesting of an imported JSON value; deeper is refused before Python's recursion limit is near.
MAX_JSON_DEPTH = 64

# A lone UTF-16 surrogate cannot be encoded as UTF-8, so PostgreSQL cannot store it;
# NUL cannot be stored in a text column at all.
_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")
_ASCII_DIGITS = re.compile(r"\s*([0-9]{1,18})\s*")


def text_problem(value: str) -> str | None:
    """Why PostgreSQL cannot store this text (a NUL or a lone surrogate), or None."""
    match = _UNSTORABLE.search(value)
    if match is None:
        return None
    if match.group() == "\x00":
        return "contains a NUL character (\\u0000), which cannot be stored"
    return f"contains a lone UTF-16 surrogate (\\u{ord(match.group()):04x}), which is not valid Unicode text"


def check_text(value: str, field: str) -> str:
    """The text unchanged; raises Invalid naming the field when it cannot be stored."""
    problem = text_problem(value)
    if problem is not None:
        raise Invalid(f"The {field.replace('_', ' ')} {problem}.", errors={field: problem})
    return value


def as_id(raw: Any) -> int | None:
    """An id from a form or JSON value: a whole number 1..MAX_ID, else None."""
    value = small_int(raw)
    return value if value is not None and 1 <= value <= MAX_ID else None


def small_int(raw: Any) -> int | None:
    """A whole number written with ASCII digits (at most 18), or None: never a huge
    integer whose parsing or storing fails further on."""
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        return raw if abs(raw) < 10**18 else None
    if isinstance(raw, float) and raw.is_integer() and abs(raw) < 1e18:
        return int(raw)
    if isinstance(raw, str):
        match = _ASCII_DIGITS.fullmatch(raw)
        return int(match.group(1)) if match else None
    return None


class JsonProblem(ValueError):
    """JSON that parses but cannot be accepted: NaN/Infinity, or nested too deep."""


def _no_constant(name: str) -> Any:
    raise JsonProblem(f"{name} is not allowed (JSON has no NaN or Infinity)")


_DECODER = json.JSONDecoder(parse_constant=_no_constant)


def decode_json(text: str, start: int = 0) -> tuple[Any, int]:
    """One JSON value at text[start:] and where it ends (json's raw_decode), bounded:
    raises json.JSONDecodeError for bad syntax and JsonProblem for NaN/Infinity or
    nesting deeper than MAX_JSON_DEPTH (never RecursionError)."""
    try:
        value, end = _DECODER.raw_decode(text, start)
    except RecursionError:
        raise JsonProblem(f"nested more than {MAX_JSON_DEPTH} levels deep") from None
    _check_depth(value, text, start, end)
    return value, end


def load_json(text: str | bytes) -> Any:
    """The JSON document in text, bounded as decode_json is; raises json.JSONDecodeError,
    UnicodeDecodeError (bytes that are not UTF-8) or JsonProblem."""
    if isinstance(text, bytes):
        text = text.decode("utf-8-sig")
    try:
        value = _DECODER.decode(text)
    except RecursionError:
        raise JsonProblem(f"nested more than {MAX_JSON_DEPTH} levels deep") from None
    _check_depth(value, text, 0, len(text))
    return value


def _check_depth(value: Any, text: str, start: int, end: int) -> None:
    # Nesting deeper than the limit needs more brackets than the limit: most values
    # are let through by this count alone, without walking them.
    if text.count("[", start, end) + text.count("{", start, end) <= MAX_JSON_DEPTH:
        return
    # Iterative, so checking a deep value cannot itself overflow the stack.
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise JsonProblem(f"nested more than {MAX_JSON_DEPTH} levels deep")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
