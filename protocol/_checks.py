"""Field validators used by the generated frame decoders.

Each raises :class:`MalformedFrame` naming the frame and field, so a peer always learns
which field was wrong. They run only on decode: our own encoders are trusted.
"""

from __future__ import annotations

from typing import Any

from conveyor.protocol.errors import error_for_code

MALFORMED = 501
NAME_MAX = 255
STR_MAX = 65535
U16_MAX = 0xFFFF
U32_MAX = 0xFFFFFFFF
U64_MAX = 0xFFFFFFFFFFFFFFFF
# spec/protocol.toml max_nesting_depth (tests/unit/test_codec.py checks they agree): how deep
# arrays and maps may nest inside a table, the table itself being level 1. msgpack packs
# at most ~511 levels, and a stored or delivered message nests its headers a few levels
# deeper than the frame that carried them, so an unbounded depth accepted on receive
# could become a message that can never be written or delivered.
NESTING_MAX = 32


def fail(where: str, why: str) -> Exception:
    return error_for_code(MALFORMED, f"{where}: {why}")


def check_uint(v: Any, hi: int, where: str, lo: int = 0) -> int:
    if type(v) is not int:
        raise fail(where, f"expected unsigned integer, got {type(v).__name__}")
    if v < lo or v > hi:
        raise fail(where, f"{v} out of range {lo}..{hi}")
    return v


def check_bool(v: Any, where: str) -> bool:
    if type(v) is not bool:
        raise fail(where, f"expected bool, got {type(v).__name__}")
    return v


def check_str(v: Any, limit: int, where: str) -> str:
    if type(v) is not str:
        raise fail(where, f"expected string, got {type(v).__name__}")
    n = len(v)
    if n > limit or (n * 4 > limit and len(v.encode()) > limit):
        raise fail(where, f"longer than {limit} bytes")
    return v


def check_bytes(v: Any, where: str) -> bytes:
    if type(v) is not bytes:
        raise fail(where, f"expected bin, got {type(v).__name__}")
    return v


def check_binlist(v: Any, where: str) -> list[bytes]:
    """An array of bin (run bodies): one C-level pass over the element types."""
    if type(v) is not list:
        raise fail(where, f"expected array, got {type(v).__name__}")
    if v and set(map(type, v)) != {bytes}:
        i = next(i for i, b in enumerate(v) if type(b) is not bytes)
        raise fail(f"{where}[{i}]", f"expected bin, got {type(v[i]).__name__}")
    return v


def check_table(v: Any, where: str) -> dict[str, Any]:
    """A map of str keys whose values nest at most NESTING_MAX deep, with str keys in
    every nested map too (a bin key would break JSON views of the message later)."""
    if type(v) is not dict:
        raise fail(where, f"expected map, got {type(v).__name__}")
    for k, x in v.items():
        if type(k) is not str:
            raise fail(where, "map keys must be strings")
        t = type(x)
        if t is dict or t is list:
            _check_nested(x, 2, where)
    return v


def _check_nested(v: dict[Any, Any] | list[Any], depth: int, where: str) -> None:
    """``v`` is a container at nesting level ``depth`` inside a table."""
    if depth > NESTING_MAX:
        raise fail(where, f"values nest deeper than {NESTING_MAX} levels")
    if type(v) is dict:
        for k, x in v.items():
            if type(k) is not str:
                raise fail(where, f"map keys must be strings (nested key {k!r:.40})")
            t = type(x)
            if t is dict or t is list:
                _check_nested(x, depth + 1, where)
    else:
        for x in v:
            t = type(x)
            if t is dict or t is list:
                _check_nested(x, depth + 1, where)


def check_list(v: Any, where: str) -> list[Any]:
    if type(v) is not list:
        raise fail(where, f"expected array, got {type(v).__name__}")
    return v


def check_strlist(v: Any, where: str) -> list[str]:
    for i, item in enumerate(check_list(v, where)):
        check_str(item, NAME_MAX, f"{where}[{i}]")
    return v  # type: ignore[no-any-return]


def check_tablelist(v: Any, where: str) -> list[dict[str, Any]]:
    for i, item in enumerate(check_list(v, where)):
        check_table(item, f"{where}[{i}]")
    return v  # type: ignore[no-any-return]


def check_arity(f: Any, lo: int, hi: int, where: str) -> list[Any]:
    if type(f) is not list:
        raise fail(where, f"body must be an array, got {type(f).__name__}")
    if not lo <= len(f) <= hi:
        want = str(lo) if lo == hi else f"{lo}..{hi}"
        raise fail(where, f"expected {want} fields, got {len(f)}")
    return f
