"""The scope grammar and the principal's decisions, on names alone."""

from __future__ import annotations

import pytest

from service.core.access import Principal, Scope, parse_scopes
from service.core.names import ModelName
from service.errors import Forbidden, InvalidName, InvalidRequest, NotFound

NET = ModelName("vision", "net")
OTHER = ModelName("vision", "other")
AUDIO = ModelName("audio", "net")


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("read:*", Scope("read", None, None)),
        ("write:vision/*", Scope("write", "vision", None)),
        ("admin:vision/net", Scope("admin", "vision", "net")),
    ],
)
def test_scopes_round_trip(text: str, parsed: Scope) -> None:
    assert Scope.parse(text) == parsed
    assert str(parsed) == text


@pytest.mark.parametrize(
    "text",
    ["", "read", "delete:*", "READ:*", "read:", "read:vision", "read:vision/a/b", "read:*/net"],
)
def test_malformed_scopes_are_refused(text: str) -> None:
    with pytest.raises((InvalidRequest, InvalidName)):
        Scope.parse(text)


@pytest.mark.parametrize("text", ["read:../*", "read:vision/..", "read:%2e%2e/*", "read:a\x00/*"])
def test_scopes_hold_valid_names_only(text: str) -> None:
    with pytest.raises(InvalidName):
        Scope.parse(text)


def test_admin_implies_write_implies_read() -> None:
    admin, write, read = (Scope.parse(f"{a}:vision/*") for a in ("admin", "write", "read"))
    assert admin.grants("read", NET) and admin.grants("write", NET) and admin.grants("admin", NET)
    assert write.grants("read", NET) and write.grants("write", NET)
    assert not write.grants("admin", NET)
    assert read.grants("read", NET) and not read.grants("write", NET)
    assert not admin.grants("read", AUDIO)
    assert not admin.grants("admin", None), "a namespace admin is not a global admin"
    assert Scope.parse("admin:*").grants("admin", None)


def test_one_model_scopes() -> None:
    scope = Scope.parse("write:vision/net")
    assert scope.grants("write", NET) and not scope.grants("read", OTHER)


def test_reads_hide_and_writes_refuse() -> None:
    reader = Principal("r", parse_scopes(["read:vision/*"]))
    assert reader.denial("read", NET) is None
    hidden = reader.denial("read", AUDIO)
    assert isinstance(hidden, NotFound)
    assert hidden.message == "model audio/net does not exist"  # what a missing model says
    assert isinstance(reader.denial("write", NET), Forbidden)
    assert isinstance(reader.denial("write", AUDIO), Forbidden)
    assert isinstance(reader.denial("admin", None), Forbidden)


def test_no_token_mints_a_stronger_one() -> None:
    team_admin = Principal("t", parse_scopes(["admin:vision/*", "read:*"]))
    assert team_admin.covers(parse_scopes(["read:vision/*", "admin:vision/net"]))
    assert not team_admin.covers(parse_scopes(["read:audio/*"]))  # read:* is not admin
    assert not team_admin.covers(parse_scopes(["admin:*"]))
    assert Principal("root", parse_scopes(["admin:*"])).covers(parse_scopes(["admin:*"]))


def test_readable_patterns() -> None:
    assert Principal("a", parse_scopes(["read:*"])).readable() is None
    assert Principal("anonymous", unrestricted=True).readable() is None
    scopes = parse_scopes(["write:vision/net", "read:audio/*"])
    assert Principal("b", scopes).readable() == scopes


def test_a_token_needs_scopes() -> None:
    with pytest.raises(InvalidRequest):
        parse_scopes([])
    assert parse_scopes(["read:*", "read:*"]) == (Scope("read", None, None),)
