"""Typed errors mirroring the server's stable codes; one function maps responses to them."""

from __future__ import annotations

from typing import Any

import httpx


class StatehubWarning(UserWarning):
    """A fetch whose result is not all from the checkpoint (kept target keys), as
    transformers warns about weights "newly initialized"; ``on_missing="keep"`` given
    explicitly says that was meant and silences it."""


class StatehubError(Exception):
    """Base of every statehub client error."""

    code = "internal"

    def __init__(
        self,
        message: str,
        *,
        detail: dict[str, Any] | None = None,
        request_id: str | None = None,
        response: httpx.Response | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail or {}
        self.request_id = request_id
        self.response = response

    @property
    def status_code(self) -> int | None:
        return self.response.status_code if self.response is not None else None


class InvalidRequest(StatehubError, ValueError):
    code = "invalid_request"


class InvalidName(InvalidRequest):
    code = "invalid_name"


class InvalidRef(InvalidRequest):
    code = "invalid_ref"


class InvalidSpec(InvalidRequest):
    code = "invalid_spec"


class InvalidAdapter(InvalidRequest):
    code = "invalid_adapter"


class RecipeParamsMissing(InvalidRequest):
    """A built-in recipe matches but needs a model fact (``detail['missing']``, e.g.
    ``head_dim``): pass ``params={"head_dim": N}``, or push the config.json with the weights."""

    code = "recipe_params_missing"


class InvalidCheckpoint(InvalidRequest):
    code = "invalid_checkpoint"


class UnsafePickle(InvalidCheckpoint):
    code = "unsafe_pickle"


class NotFound(StatehubError, LookupError):
    code = "not_found"


class Conflict(StatehubError):
    code = "conflict"


class TensorsMissing(Conflict):
    """A composed push named tensors the registry does not store (``detail['missing']``)."""

    code = "tensors_missing"


class FilesMissing(Conflict):
    """A folder push named files the registry does not store (``detail['missing']``)."""

    code = "files_missing"


class Incompatible(StatehubError):
    """The policy forbids what fitting the checkpoint would need; ``.plan`` says why."""

    code = "incompatible"

    @property
    def plan(self) -> dict[str, Any] | None:
        return self.detail.get("plan")


class Unauthorized(StatehubError):
    code = "unauthorized"


class Forbidden(StatehubError):
    code = "forbidden"


class TooLarge(StatehubError):
    code = "too_large"


class RangeNotSatisfiable(StatehubError):
    code = "range_not_satisfiable"


class StorageError(StatehubError):
    code = "storage_error"


class StorageUnavailable(StorageError):
    code = "storage_unavailable"


class ShuttingDown(StatehubError):
    """The replica that answered is draining; retried calls reach another one."""

    code = "shutting_down"


class ConnectionFailed(StatehubError, ConnectionError):
    """The server could not be reached (after retries where the call is idempotent)."""

    code = "connection_failed"


class IntegrityError(StatehubError):
    """What arrived does not match what the server announced (length or digest)."""

    code = "integrity_error"


class NotCached(StatehubError, LookupError):
    """Offline (``STATEHUB_OFFLINE``), and the cache holds no answer to this request."""

    code = "not_cached"


_BY_CODE: dict[str, type[StatehubError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        InvalidName,
        InvalidRef,
        InvalidSpec,
        InvalidAdapter,
        RecipeParamsMissing,
        InvalidCheckpoint,
        UnsafePickle,
        NotFound,
        Conflict,
        TensorsMissing,
        FilesMissing,
        Incompatible,
        Unauthorized,
        Forbidden,
        TooLarge,
        RangeNotSatisfiable,
        StorageError,
        StorageUnavailable,
        ShuttingDown,
    )
}
_BY_STATUS: dict[int, type[StatehubError]] = {
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: TooLarge,
    416: RangeNotSatisfiable,
    422: InvalidRequest,
    503: StorageUnavailable,
}


def raise_for_status(response: httpx.Response) -> None:
    """Raise the typed error for an error response; return quietly for 1xx-3xx."""
    if response.status_code < 400:
        return
    if not response.is_stream_consumed:
        response.read()
    try:
        error = response.json()["error"]
        code, message, detail = error["code"], error["message"], error.get("detail") or {}
    except (ValueError, KeyError, TypeError):
        code, message, detail = "", response.text[:500] or response.reason_phrase, {}
    cls = _BY_CODE.get(code) or _BY_STATUS.get(response.status_code) or StatehubError
    raise cls(
        f"{message} (HTTP {response.status_code})",
        detail=detail,
        request_id=response.headers.get("x-request-id"),
        response=response,
    )
