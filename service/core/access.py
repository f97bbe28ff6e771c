"""Scopes and principals: who may do what to which model (pure logic, no I/O).

A scope is ``<action>:<pattern>``::

    action  := "read" | "write" | "admin"     admin implies write, write implies read
    pattern := "*"                            every namespace (and global objects)
             | <namespace> "/*"               every model of one namespace
             | <namespace> "/" <name>         one model

``read`` lists, shows, plans, fetches and downloads; ``write`` creates models, pushes
versions and moves aliases; ``admin`` deletes and restores, and manages the tokens it
covers. Global objects (adapters, garbage collection) need ``admin:*`` to change; any
valid token may list adapters.

Denials are decided from the name alone, before anything is looked up, so they never say
whether an object exists: a caller without ``read`` on a name gets the same ``not_found`` a
missing model gets ("reads hide"); a caller lacking ``write``/``admin`` gets ``forbidden``
("writes refuse").
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from service.core.names import ModelName, validate_segment
from service.errors import Forbidden, InvalidRequest, NotFound, StatehubError

Action = Literal["read", "write", "admin"]
ACTIONS: tuple[Action, ...] = ("read", "write", "admin")
_RANK: dict[str, int] = {action: rank for rank, action in enumerate(ACTIONS)}
_BY_NAME: dict[str, Action] = {action: action for action in ACTIONS}
MAX_SCOPES = 64


@dataclass(frozen=True)
class Scope:
    action: Action
    namespace: str | None  # None: every namespace
    name: str | None  # None: every model of the namespace

    def __str__(self) -> str:
        if self.namespace is None:
            return f"{self.action}:*"
        return f"{self.action}:{self.namespace}/{self.name or '*'}"

    @classmethod
    def parse(cls, text: str) -> Scope:
        word, sep, pattern = text.partition(":")
        action = _BY_NAME.get(word)
        if not sep or action is None:
            raise InvalidRequest(
                f"scope {text[:100]!r} is not <action>:<pattern> with action read, write or "
                "admin (e.g. read:vision/*, write:vision/resnet, admin:*)",
                detail={"scope": text[:100]},
            )
        if pattern == "*":
            return cls(action, None, None)
        namespace, sep, name = pattern.partition("/")
        if not sep:
            raise InvalidRequest(
                f"scope pattern {pattern[:100]!r} needs a namespace: use {namespace[:96]}/* "
                "for the whole namespace or * for every namespace",
                detail={"scope": text[:100]},
            )
        validate_segment(namespace, what="scope namespace")
        if name != "*":
            validate_segment(name, what="scope model name")
        return cls(action, namespace, None if name == "*" else name)

    def matches(self, name: ModelName) -> bool:
        if self.namespace is None:
            return True
        return self.namespace == name.namespace and self.name in (None, name.name)

    def grants(self, action: Action, name: ModelName | None) -> bool:
        """``action`` on ``name``; ``name=None`` asks for every namespace at once."""
        if _RANK[self.action] < _RANK[action]:
            return False
        return self.namespace is None if name is None else self.matches(name)

    def covers(self, other: Scope) -> bool:
        """Everything ``other`` grants, this scope grants too."""
        if _RANK[self.action] < _RANK[other.action]:
            return False
        if self.namespace is None:
            return True
        return self.namespace == other.namespace and self.name in (None, other.name)


def parse_scopes(texts: Iterable[str]) -> tuple[Scope, ...]:
    scopes = tuple(dict.fromkeys(Scope.parse(t) for t in texts))
    if not scopes:
        raise InvalidRequest("a token needs at least one scope (e.g. read:vision/*)")
    if len(scopes) > MAX_SCOPES:
        raise InvalidRequest(f"a token holds at most {MAX_SCOPES} scopes")
    return scopes


@dataclass(frozen=True)
class Principal:
    """The caller of a request.

    ``unrestricted`` is the open mode: no token is configured and the server listens on
    loopback only, so every caller may do everything (as ``anonymous``).
    """

    actor: str
    scopes: tuple[Scope, ...] = ()
    token_id: int | None = None
    unrestricted: bool = False

    def can(self, action: Action, name: ModelName | None) -> bool:
        return self.unrestricted or any(s.grants(action, name) for s in self.scopes)

    def denial(self, action: Action, name: ModelName | None) -> StatehubError | None:
        """The error for ``action`` on ``name`` (None: every namespace), or None if allowed."""
        if self.can(action, name):
            return None
        where = "*" if name is None else str(name)
        if action == "read" and name is not None:
            # Word for word what a missing model answers: nothing tells the two apart.
            return NotFound(f"model {name} does not exist", detail={"model": str(name)})
        return Forbidden(
            f"this token has no {action} scope on {where}",
            detail={"required": f"{action}:{where}"},
        )

    def covers(self, scopes: Sequence[Scope]) -> bool:
        """May this caller mint (or see, or revoke) a token holding ``scopes``?

        Only with ``admin`` over each of them: a token never creates a stronger one.
        """
        if self.unrestricted:
            return True
        admin = [s for s in self.scopes if s.action == "admin"]
        return all(any(a.covers(s) for a in admin) for s in scopes)

    def administers_anything(self) -> bool:
        return self.unrestricted or any(s.action == "admin" for s in self.scopes)

    def readable(self) -> tuple[Scope, ...] | None:
        """The patterns this caller may read, for filtering lists; None means everything."""
        if self.unrestricted or any(s.namespace is None for s in self.scopes):
            return None
        return tuple(self.scopes)
