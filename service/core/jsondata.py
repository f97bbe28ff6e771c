"""JSON and text from clients, checked before anything stores, parses or echoes it.

- **Strict JSON**: no ``NaN`` / ``Infinity`` (not JSON; PostgreSQL's jsonb refuses them), and
  every parser failure (nesting past the parser's recursion limit, an integer of more digits
  than Python converts) is a 422, never a ``RecursionError`` or ``ValueError``.
- **Text every store takes**: no NUL (PostgreSQL text and jsonb cannot hold it) and no
  unpaired surrogate (not encodable as UTF-8: neither database takes it, no response
  carries it).
- **Metadata** (a version's ``metadata``) is bounded in depth and number size, so what is
  stored can always be served back (the serializer stops at 255 levels).
- **Request bodies** are bounded in the number of JSON values they hold, counted on the raw
  bytes before parsing: parsed JSON costs up to ~25x its size (``{}`` is 3 bytes, a dict 64).
"""

from __future__ import annotations

import json
import math
from typing import Any

from service.errors import InvalidRequest, TooLarge

MAX_METADATA_DEPTH = 32
# Integers in metadata fit a signed 64-bit number: what every JSON consumer reads exactly.
INT_BOUND = 2**63
# A body may hold up to (max_rank + this) values per tensor of STATEHUB_MAX_TENSORS ...
VALUES_PER_TENSOR_BEYOND_RANK = 8
# ... plus this many for everything that is not a tensor (policy, adapters, token scopes).
VALUES_BESIDES_TENSORS = 10_000
UNREADABLE = "statehub.unreadable"


def body_value_budget(*, max_tensors: int, max_rank: int) -> int:
    """How many JSON values a request body may hold: what the largest spec needs.

    One tensor of a target spec (``{"key": k, "shape": [d1, ..., dR], "dtype": t}``) is R+4
    values by the count below (two brackets, R+2 commas); a tie group member is one more; a
    composed push's header entry and hash are R+7. Counting commas and opening brackets
    over-counts those inside strings, which only makes the bound stricter for odd keys.
    """
    return max_tensors * (max_rank + VALUES_PER_TENSOR_BEYOND_RANK) + VALUES_BESIDES_TENSORS


def count_values(body: bytes) -> int:
    """An upper bound on the number of JSON values in ``body`` (C-speed byte counts)."""
    return body.count(b",") + body.count(b"[") + body.count(b"{") + 1


def parse_body(body: bytes, *, max_values: int) -> Any:
    """A JSON request body, parsed within ``max_values`` values, its text checked.

    Raises:
        TooLarge: the body holds more values than ``max_values``.
        InvalidRequest: not UTF-8, not strict JSON, or a string with NUL or an unpaired
            surrogate.
    """
    values = count_values(body)
    if values > max_values:
        raise TooLarge(
            f"the request body holds up to {values} JSON values; the limit is {max_values} "
            "(what a spec of STATEHUB_MAX_TENSORS tensors of STATEHUB_MAX_RANK dimensions needs)",
            detail={"values": values, "limit": max_values},
        )
    try:
        text = body.decode("utf-8")  # strict: raw surrogates are not UTF-8
    except UnicodeDecodeError as exc:
        raise InvalidRequest(
            f"the request body is not UTF-8 (byte {exc.start}): send JSON as UTF-8",
            detail={"position": exc.start},
        ) from exc
    value = loads(text, what="body")
    # In valid UTF-8 JSON only a \u escape can spell NUL or a surrogate: the common body,
    # without one, is not walked at all.
    if "\\u" in text:
        check_json(value, what="body")
    return value


def loads(text: str, *, what: str) -> Any:
    """``json.loads``, strict, with every failure an ``InvalidRequest`` naming ``what``."""
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(
            f"{what} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})",
            detail={"line": exc.lineno, "column": exc.colno},
        ) from exc
    except RecursionError as exc:
        raise InvalidRequest(f"{what} is nested too deeply to parse") from exc
    except ValueError as exc:  # NaN / Infinity, or an integer of thousands of digits
        raise InvalidRequest(f"{what} is not acceptable JSON: {exc}") from exc


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def check_text(value: str, *, what: str) -> str:
    """``value`` if every store takes it: no NUL, no unpaired surrogate."""
    if "\x00" in value:
        raise InvalidRequest(f"{what} holds a NUL character", detail={"field": what})
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            code = ord(value[exc.start])
            raise InvalidRequest(
                f"{what} holds an unpaired surrogate (\\u{code:04x}): send valid Unicode text",
                detail={"field": what},
            ) from exc
    return value


def storable_text(value: str, *, limit: int) -> str:
    """``value`` cut to ``limit`` characters, NUL and unpaired surrogates replaced: for text
    the server records about a request it refuses (the audit log), which must not fail."""
    value = value[:limit]
    if "\x00" in value or not value.isascii():
        value = value.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")
    return value


def check_json(value: Any, *, what: str, max_depth: int | None = None) -> None:
    """Every string and key of ``value`` passes ``check_text``; with ``max_depth``, also
    nesting at most that deep, integers within 64 bits and finite floats (metadata).

    Iterative: a value nested deeper than the recursion limit is refused, not a crash.
    """
    stack: list[tuple[Any, int, tuple[Any, ...]]] = [(value, 0, ())]
    while stack:
        item, depth, loc = stack.pop()
        if isinstance(item, str):
            check_text(item, what=_where(what, loc))
        elif isinstance(item, dict | list):
            if max_depth is not None and depth >= max_depth:
                raise InvalidRequest(
                    f"{_where(what, loc)} nests deeper than {max_depth} levels",
                    detail={"limit": max_depth},
                )
            if isinstance(item, dict):
                for key, child in item.items():
                    if not isinstance(key, str):
                        raise InvalidRequest(f"{_where(what, loc)} has a key that is not text")
                    check_text(key, what=f"a key of {_where(what, loc)}")
                    stack.append((child, depth + 1, (loc, key)))
            else:
                stack.extend((child, depth + 1, (loc, i)) for i, child in enumerate(item))
        elif max_depth is None or item is None or isinstance(item, bool):
            continue
        elif isinstance(item, int):
            if not -INT_BOUND <= item < INT_BOUND:
                raise InvalidRequest(
                    f"{_where(what, loc)} is an integer outside the signed 64-bit range",
                    detail={"bits": item.bit_length()},
                )
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise InvalidRequest(f"{_where(what, loc)} is not a finite number")
        else:
            raise InvalidRequest(f"{_where(what, loc)} is not a JSON value")


def _where(what: str, loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    while loc:
        loc, part = loc
        parts.append(f"[{part}]" if isinstance(part, int) else f".{part}")
    return what + "".join(reversed(parts))[:200]


def parse_metadata(text: str) -> dict[str, Any]:
    """A version's ``metadata`` (a JSON object), checked before anything is stored.

    Raises:
        InvalidRequest: not a JSON object, nested deeper than ``MAX_METADATA_DEPTH``, an
            integer outside 64 bits, a non-finite number, NUL or an unpaired surrogate.
    """
    value = loads(text, what="metadata")
    if not isinstance(value, dict):
        raise InvalidRequest("metadata must be a JSON object")
    check_json(value, what="metadata", max_depth=MAX_METADATA_DEPTH)
    return value


def servable_metadata(value: dict[str, Any]) -> dict[str, Any]:
    """Stored metadata as it can be served: ``value``, or a note saying why it cannot be
    when it was stored before these checks (a read never fails for it)."""
    try:
        check_json(value, what="metadata", max_depth=MAX_METADATA_DEPTH)
    except InvalidRequest as exc:
        return {UNREADABLE: exc.message}
    return value
