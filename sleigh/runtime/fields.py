"""Typed reads of JSON that came from disk (a package manifest, a checkpoint's config): a missing
field or a wrong type is one SleighError naming the field, never a KeyError or TypeError later."""

from __future__ import annotations

import math
import re

from sleigh.errors import SleighError

_MISSING = object()
_SHA256 = re.compile(r"[0-9a-f]{64}")


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true is not a count


KINDS = {
    "object": (lambda v: isinstance(v, dict), "an object"),
    "list": (lambda v: isinstance(v, list), "a list"),
    "string": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "count": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "positive": (lambda v: is_int(v) and v > 0, "an integer >= 1"),
    "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), "a finite number"),
    "sha256": (lambda v: isinstance(v, str) and _SHA256.fullmatch(v) is not None, "64 lowercase hex digits"),
}


def describe(v) -> str:
    """A short name of a JSON value for an error line: `null`, `a list`, `the string '12'`."""
    if v is None:
        return "null"
    names = {bool: "the boolean", int: "the integer", float: "the number", str: "the string"}
    if type(v) in names:
        return f"{names[type(v)]} {v!r:.40}"
    return {dict: "an object", list: "a list"}.get(type(v), type(v).__name__)


class Fields:
    """`f.get(obj, "key", "positive", "llm")` -> obj["key"], checked. Errors read
    `WHERE | llm.key is missing. Expected: an integer >= 1; EXPECTED`."""

    def __init__(self, where: str, expected: str):
        self.where, self.expected = where, expected

    def fail(self, field: str, problem: str, want: str) -> SleighError:
        return SleighError(self.where, f"{field} {problem}", f"{want}; {self.expected}")

    def get(self, obj: dict, key: str, kind: str, path: str = "", *, default=_MISSING, null: bool = False):
        field = f"{path}.{key}" if path else key
        value = obj.get(key, _MISSING)
        ok, want = KINDS[kind]
        if value is _MISSING:
            if default is not _MISSING:
                return default
            raise self.fail(field, "is missing", want)
        if value is None and null:
            return None
        if not ok(value):
            raise self.fail(field, f"is {describe(value)}", want + (" or null" if null else ""))
        return value

    def items(self, obj: list, kind: str, path: str) -> list:
        """Every element of a list, checked."""
        ok, want = KINDS[kind]
        for i, value in enumerate(obj):
            if not ok(value):
                raise self.fail(f"{path}[{i}]", f"is {describe(value)}", want)
        return obj
