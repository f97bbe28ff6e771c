"""service.core.jsondata: strict JSON, text every store takes, bounded metadata, and the
value budget of a request body measured against the largest spec it must let through."""

from __future__ import annotations

import json

import pytest

from service.core.jsondata import (
    INT_BOUND,
    MAX_METADATA_DEPTH,
    UNREADABLE,
    body_value_budget,
    check_text,
    count_values,
    parse_body,
    parse_metadata,
    servable_metadata,
    storable_text,
)
from service.errors import InvalidRequest, TooLarge
from service.settings import Settings


def largest_spec(tensors: int, rank: int) -> bytes:
    """A fetch body at the limits: every tensor of the largest rank, every one tied, a full
    policy."""
    body = {
        "target": {
            "tensors": [
                {"key": f"layers.{i}.weight", "shape": [2**40] * rank, "dtype": "BF16"}
                for i in range(tensors)
            ],
            "tie_groups": [
                [f"layers.{i}.weight", f"layers.{i + 1}.weight"] for i in range(0, tensors, 2)
            ],
        },
        "policy": {
            "strict": False,
            "allow_ops": ["cast", "reshape", "slice", "pad", "fill"],
            "adapters": [f"adapter-{i}" for i in range(32)],
        },
    }
    return json.dumps(body).encode()


def compose_body(tensors: int, rank: int) -> bytes:
    header = {
        f"layers.{i}.weight": {
            "dtype": "F32",
            "shape": [1] * rank,
            "data_offsets": [4 * i, 4 * i + 4],
        }
        for i in range(tensors)
    }
    body = {
        "header": json.dumps(header),
        "size": 8,
        "tensors": {f"layers.{i}.weight": "0" * 64 for i in range(tensors)},
    }
    return json.dumps(body).encode()


@pytest.mark.parametrize("rank", [1, 4, 8])
def test_the_largest_real_bodies_fit_the_budget(rank: int) -> None:
    tensors = 2_000
    budget = body_value_budget(max_tensors=tensors, max_rank=rank)
    for body in (largest_spec(tensors, rank), compose_body(tensors, rank)):
        assert count_values(body) <= budget
        parse_body(body, max_values=budget)


def test_the_default_budget_refuses_the_issue_body_and_bounds_its_objects() -> None:
    settings = Settings()
    budget = body_value_budget(max_tensors=settings.max_tensors, max_rank=settings.max_rank)
    empty_objects = b"[" + b"{}," * 11_000_000 + b"{}]"
    assert len(empty_objects) <= settings.max_spec_bytes
    with pytest.raises(TooLarge) as refused:
        parse_body(empty_objects, max_values=budget)
    assert refused.value.detail == {"values": 22_000_003, "limit": budget}  # an upper bound
    # What the budget still lets a caller build: ~3.2 M values, at most a 64-byte dict each.
    assert budget * 64 < 256 * 1024 * 1024


@pytest.mark.parametrize(
    "body",
    [
        b'{"a": NaN}',
        b'{"a": Infinity}',
        b'{"a": "\\u0000"}',
        b'{"a\\u0000": 1}',
        b'{"a": ["\\udc00"]}',
        b'{"a": "\\ud800x"}',
        b'{"a": "\xed\xa0\x80"}',
        b'{"a": "\xff"}',
        b'{"a": "\x00"}',
        b'{"a": ' + b"9" * 5000 + b"}",
        b"[" * 100_000 + b"]" * 100_000,
        b"{'a': 1}",
    ],
)
def test_bodies_that_json_or_the_stores_cannot_hold_are_invalid_requests(body: bytes) -> None:
    with pytest.raises(InvalidRequest):
        parse_body(body, max_values=10**9)


def test_escapes_that_spell_valid_text_pass() -> None:
    body = b'{"a": "\\ud834\\udd1e \\u00e9 \\\\u0000 \\\\ud800", "b": "\xc3\xa9"}'
    assert parse_body(body, max_values=100) == {"a": "𝄞 é \\u0000 \\ud800", "b": "é"}


def test_check_text_names_the_field() -> None:
    assert check_text("ok é", what="x") == "ok é"
    with pytest.raises(InvalidRequest, match=r"body\.name holds a NUL"):
        check_text("a\x00", what="body.name")
    with pytest.raises(InvalidRequest, match="unpaired surrogate"):
        check_text("\udfff", what="body.name")


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_metadata_bounds() -> None:
    assert parse_metadata('{"a": ' + nested(MAX_METADATA_DEPTH - 1) + "}")
    assert parse_metadata(json.dumps({"big": INT_BOUND - 1, "small": -INT_BOUND}))
    for bad in [
        '{"a": ' + nested(MAX_METADATA_DEPTH) + "}",
        '{"a": ' + nested(5000) + "}",
        json.dumps({"big": INT_BOUND}),
        json.dumps({"a": [1e308 * 10]}),  # json.dumps writes Infinity
        '{"a": 1e999}',  # parses to inf
        "[]",
        '"text"',
    ]:
        with pytest.raises(InvalidRequest):
            parse_metadata(bad)


def test_servable_metadata_replaces_what_cannot_be_served() -> None:
    assert servable_metadata({"a": [1, "b"]}) == {"a": [1, "b"]}
    deep: list[object] = []
    for _ in range(5000):
        deep = [deep]
    served = servable_metadata({"a": deep})
    assert set(served) == {UNREADABLE} and "deeper than" in served[UNREADABLE]


def test_storable_text_never_fails_to_store() -> None:
    assert storable_text("/v1/adapters/a\x00\ud800" + "x" * 500, limit=300) == (
        "/v1/adapters/a\ufffd?" + "x" * 284
    )
    assert storable_text("plain", limit=300) == "plain"
