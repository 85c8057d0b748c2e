"""Type and range checks shared by the file readers (manifests, profiles) and the command line's options.

File readers raise `Invalid` (a field-level problem) and wrap it with the file's name; option checks raise
`ModellegoError` naming the flag. Every check is cheap and runs before anything is allocated from the value.
"""

from __future__ import annotations

import json
import math
from typing import Any

SEED_MAX = 2**64 - 1


class Invalid(ValueError):
    """A value read from a file has the wrong type or lies out of range; the message names the field."""


def show(value: Any, limit: int = 60) -> str:
    """A short, printable rendering of an untrusted value for error messages (repr escapes control characters)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**18:
        return f"a {len(str(abs(value)))}-digit number" if abs(value) < 10**4000 else "a huge number"
    if isinstance(value, (list, dict)) and len(value) > 8:
        return f"a {type(value).__name__} of {len(value):,} items"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def integer(value: Any, field: str, low: int, high: int) -> int:
    """`value` as an int in [low, high] (JSON integers only: no bools, no floats, no strings)."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise Invalid(f"{field} must be an integer from {low:,} to {high:,}, got {show(value)}")
    return value


def number(value: Any, field: str, low: float, high: float, low_open: bool = False) -> float:
    """`value` as a finite float in [low, high] (or (low, high] with `low_open`)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and (value > low if low_open else value >= low) and value <= high
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise Invalid(f"{field} must be a finite number in {interval}, got {show(value)}")
    return float(value)


def string(value: Any, field: str, max_length: int, empty: bool = False) -> str:
    """`value` as a str of at most `max_length` characters (non-empty unless `empty`)."""
    if not isinstance(value, str) or len(value) > max_length or (not empty and not value):
        what = "a string" if empty else "a non-empty string"
        raise Invalid(f"{field} must be {what} of at most {max_length:,} characters, got {show(value)}")
    return value


def sequence(value: Any, field: str, low: int, high: int) -> list:
    """`value` as a list of `low`..`high` items."""
    if not isinstance(value, list) or not low <= len(value) <= high:
        raise Invalid(f"{field} must be a list of {low:,} to {high:,} items, got {show(value)}")
    return value


def mapping(value: Any, field: str) -> dict:
    """`value` as a dict (a JSON object)."""
    if not isinstance(value, dict):
        raise Invalid(f"{field} must be a JSON object, got {show(value)}")
    return value


def parse_json(text: str, field: str, max_chars: int, max_depth: int) -> Any:
    """Parse untrusted JSON of at most `max_chars` characters nested at most `max_depth` levels."""
    if len(text) > max_chars:
        raise Invalid(f"{field} is {len(text):,} characters long; at most {max_chars:,} are accepted")
    try:
        value = json.loads(text)
    except RecursionError:
        raise Invalid(f"{field} is nested more than {max_depth} levels deep") from None
    except ValueError as error:  # JSONDecodeError, and integers beyond Python's digit limit
        raise Invalid(f"{field} is not valid JSON ({str(error).splitlines()[0][:120]})") from None
    if depth(value) > max_depth:
        raise Invalid(f"{field} is nested more than {max_depth} levels deep")
    return value


def depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0), computed without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, level + 1)
            stack.extend((child, level + 1) for child in item if isinstance(child, (list, dict)))
    return deepest
