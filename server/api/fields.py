"""Typed reads of one untrusted JSON object, and the 400 a bad field becomes.

`Fields` checks type and range per read; errors name the field (`prefix + name`) as `param`.
Shared by the request parsers in server/api/protocol.py and server/api/chat_messages.py.
`rejected` is the same 400 for a check that model.sampling_params owns (RequestRejected).
"""

from __future__ import annotations

import math
from typing import Any

from model.errors import RequestRejected
from model.sampling_params import is_int, is_number
from server.http.errors import HTTPError

# A float this large is an integer literal orjson could not hold in 64 bits (or out of
# range anyway).
_TWO_POW_63 = float(1 << 63)


def bad_request(param: str | None, message: str) -> HTTPError:
    return HTTPError(400, message, param=param)


def rejected(exc: RequestRejected) -> HTTPError:
    return bad_request(exc.param, str(exc))


def _type_name(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    names.update({list: "an array", dict: "an object", type(None): "null"})
    return names.get(type(value), type(value).__name__)


class Fields:
    """Typed, range-checked reads of one JSON object; errors name `prefix + field`."""

    def __init__(self, obj: dict[str, Any], prefix: str = "") -> None:
        self.obj = obj
        self.prefix = prefix

    def param(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def _wrong_type(self, name: str, expected: str, value: object) -> HTTPError:
        return bad_request(
            self.param(name),
            f"Invalid type for '{self.param(name)}': expected {expected}, "
            f"but got {_type_name(value)} instead.",
        )

    def get(self, name: str) -> Any:
        return self.obj.get(name)

    def _typed(self, name: str, default: Any, kind: type, expected: str) -> Any:
        value = self.obj.get(name)
        if value is None:
            return default
        if not isinstance(value, kind):
            raise self._wrong_type(name, expected, value)
        return value

    def bool(self, name: str, default: bool) -> bool:
        return self._typed(name, default, bool, "a boolean")

    def str(self, name: str, default: str | None = None) -> str | None:
        return self._typed(name, default, str, "a string")

    def int(self, name: str, default: int | None, lo: int | None = None, hi: int | None = None):
        value = self.obj.get(name)
        if value is None:
            return default
        if not is_int(value):
            # orjson reads an integer literal past 64 bits as a float: a whole number beyond
            # a bounded field's range is out of range, not of the wrong type.
            if (
                lo is not None
                and hi is not None
                and isinstance(value, float)
                and value.is_integer()
                and (value < lo or value > hi or abs(value) >= _TWO_POW_63)
            ):
                raise self._out_of_range(name, value, lo, hi)
            raise self._wrong_type(name, "an integer", value)
        self._check_range(name, value, lo, hi)
        return value

    def number(
        self, name: str, default: float, lo: float, hi: float | None, lo_open: bool = False
    ) -> float:
        value = self.obj.get(name)
        if value is None:
            return default
        if not is_number(value) or not math.isfinite(value):
            raise self._wrong_type(name, "a number", value)
        self._check_range(name, value, lo, hi, lo_open)
        return float(value)

    def _check_range(self, name, value, lo, hi, lo_open: bool = False) -> None:
        too_low = lo is not None and (value <= lo if lo_open else value < lo)
        if too_low or (hi is not None and value > hi):
            raise self._out_of_range(name, value, lo, hi, lo_open)

    def _out_of_range(self, name, value, lo, hi, lo_open: bool = False) -> HTTPError:
        if hi is None:
            bounds = f"{'>' if lo_open else '>='} {lo}"
        else:
            bounds = f"{'(' if lo_open else '['}{lo}, {hi}]"
        return bad_request(
            self.param(name), f"Invalid '{self.param(name)}': {value!r} is out of range {bounds}."
        )


# Deeper client JSON is refused before any recursive code (templates, our own copies) sees it.
MAX_JSON_DEPTH = 64


def check_depth(value: object, param: str, limit: int = MAX_JSON_DEPTH) -> None:
    """400 when `value` nests arrays/objects more than `limit` levels (checked without recursion)."""
    level = [value] if isinstance(value, (dict, list)) else []
    for _ in range(limit):
        level = [
            child
            for item in level
            for child in (item.values() if isinstance(item, dict) else item)
            if isinstance(child, (dict, list))
        ]
        if not level:
            return
    raise too_deep(param, limit)


def too_deep(param: str, limit: int = MAX_JSON_DEPTH) -> HTTPError:
    return bad_request(param, f"'{param}' is nested too deeply (limit {limit} levels).")
