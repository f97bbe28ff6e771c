"""Names and references (DESIGN section 2), validated before they reach storage.

Model names are ``namespace/name`` (namespace defaults to ``default``); a version reference
within a model is a number (``3``), an alias (``prod``, ``latest``) or ``sha256:<digest>``.
Full references: ``name``, ``ns/name:3``, ``ns/name@prod``, ``ns/name@sha256:<digest>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from service.errors import InvalidName, InvalidRef

DEFAULT_NAMESPACE = "default"
LATEST = "latest"
MAX_NAME_LENGTH = 96

# A name segment: letters, digits, '.', '_' and '-', starting with a letter or digit, no '..'.
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_DIGEST = re.compile(r"[0-9a-f]{64}")


def validate_segment(value: str, *, what: str) -> str:
    if not value:
        raise InvalidName(f"{what} is empty")
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidName(
            f"{what} is {len(value)} characters long; the limit is {MAX_NAME_LENGTH}",
            detail={"length": len(value), "limit": MAX_NAME_LENGTH},
        )
    if not _SEGMENT.fullmatch(value) or ".." in value:
        raise InvalidName(
            f"{what} {value!r} is not valid: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit",
            detail={"value": value},
        )
    return value


def validate_alias(alias: str) -> str:
    validate_segment(alias, what="alias")
    if alias.isdigit() or alias.startswith("sha256"):
        raise InvalidName(f"alias {alias!r} would read as a version number or digest")
    return alias


@dataclass(frozen=True)
class ModelName:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"

    @classmethod
    def of(cls, namespace: str, name: str) -> ModelName:
        return cls(
            validate_segment(namespace, what="namespace"), validate_segment(name, what="name")
        )

    @classmethod
    def parse(cls, text: str) -> ModelName:
        namespace, sep, name = text.partition("/")
        if not sep:
            return cls.of(DEFAULT_NAMESPACE, text)
        if "/" in name:
            raise InvalidName(f"model name {text!r} has more than one '/'")
        return cls.of(namespace, name)


@dataclass(frozen=True)
class VersionRef:
    """One of: a version number, an alias, or a blob digest."""

    number: int | None = None
    alias: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        if self.number is not None:
            return str(self.number)
        if self.digest is not None:
            return f"sha256:{self.digest}"
        return self.alias or LATEST

    @classmethod
    def parse(cls, text: str) -> VersionRef:
        if text.isdigit():
            number = int(text)
            if number < 1 or len(text) > 12:
                raise InvalidRef(f"version number {text!r} is out of range")
            return cls(number=number)
        if text.startswith("sha256:"):
            digest = text.removeprefix("sha256:")
            if not _DIGEST.fullmatch(digest):
                raise InvalidRef(f"{text!r} is not sha256: followed by 64 lower-case hex digits")
            return cls(digest=digest)
        try:
            return cls(alias=validate_alias(text))
        except InvalidName as exc:
            raise InvalidRef(
                f"version reference {text!r} is not a number, an alias or sha256:<digest>"
            ) from exc


def parse_ref(text: str) -> tuple[ModelName, VersionRef]:
    """``ns/name``, ``ns/name:3``, ``ns/name@prod``, ``ns/name@sha256:...`` (ns optional)."""
    if "@" in text:
        model, _, ref = text.partition("@")
        return ModelName.parse(model), VersionRef.parse(ref)
    model, sep, number = text.rpartition(":")
    if sep and number.isdigit():
        return ModelName.parse(model), VersionRef.parse(number)
    return ModelName.parse(text), VersionRef(alias=LATEST)
