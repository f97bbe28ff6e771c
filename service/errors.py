"""The one error hierarchy of the server.

Every error a user can cause or meet carries a stable ``code`` and maps to one HTTP status,
centrally, in ``service.app``. Nothing else in the server turns exceptions into responses.

    StatehubError                      500  internal (never raised for a user's mistake)
    ├── InvalidRequest (ValueError)    422  invalid_request
    │   ├── InvalidName                422  invalid_name
    │   ├── InvalidRef                 422  invalid_ref
    │   ├── InvalidSpec                422  invalid_spec
    │   ├── InvalidAdapter             422  invalid_adapter
    │   ├── RecipeParamsMissing        422  recipe_params_missing
    │   └── InvalidCheckpoint          422  invalid_checkpoint
    │       └── UnsafePickle           422  unsafe_pickle
    ├── NotFound (LookupError)         404  not_found
    ├── Conflict                       409  conflict
    │   ├── TensorsMissing             409  tensors_missing
    │   └── FilesMissing               409  files_missing
    ├── Incompatible                   409  incompatible
    ├── Unauthorized                   401  unauthorized
    ├── Forbidden                      403  forbidden
    ├── TooLarge                       413  too_large
    ├── RangeNotSatisfiable            416  range_not_satisfiable
    ├── StorageError                   500  storage_error (the store holds something wrong)
    │   └── StorageUnavailable         503  storage_unavailable (try again later)
    ├── ShuttingDown                   503  shutting_down (this replica is draining)
    └── Misconfigured                  ---  internal: the server refuses to start (never sent)

A client that disconnects mid-request is answered 499 ``client_disconnected`` by
``service.app`` (nginx's "client closed request"): nobody receives it, and it stays out of
the 5xx counts and the error log.

Third-party exceptions (boto3, SQLAlchemy) are translated where they are caught, in
``service.storage``, chained with ``from exc``.
"""

from __future__ import annotations

from typing import Any


class StatehubError(Exception):
    code = "internal"
    status = 500

    def __init__(self, message: str, *, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail or {}


class InvalidRequest(StatehubError, ValueError):
    code = "invalid_request"
    status = 422


class InvalidName(InvalidRequest):
    code = "invalid_name"


class InvalidRef(InvalidRequest):
    code = "invalid_ref"


class InvalidSpec(InvalidRequest):
    code = "invalid_spec"


class InvalidAdapter(InvalidRequest):
    code = "invalid_adapter"


class RecipeParamsMissing(InvalidRequest):
    """A built-in recipe matches, but needs a model fact (``head_dim``) that neither the
    policy's ``params`` nor the version's config files give (``detail['missing']``)."""

    code = "recipe_params_missing"


class InvalidCheckpoint(InvalidRequest):
    code = "invalid_checkpoint"


class UnsafePickle(InvalidCheckpoint):
    code = "unsafe_pickle"


class NotFound(StatehubError, LookupError):
    code = "not_found"
    status = 404


class HubNotFound(NotFound):
    """A miss on the Hugging Face Hub protocol (``/hf``): ``hub_code`` (``RepoNotFound``,
    ``RevisionNotFound``, ``EntryNotFound``) is the ``X-Error-Code`` the Hub's clients turn
    into their own errors; ``commit`` lets them cache a missing file under its revision."""

    def __init__(
        self,
        message: str,
        *,
        hub_code: str,
        commit: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message, detail=detail)
        self.hub_code = hub_code
        self.commit = commit


class Conflict(StatehubError):
    code = "conflict"
    status = 409


class TensorsMissing(Conflict):
    """A composed push names tensor hashes the registry does not store (upload them)."""

    code = "tensors_missing"


class FilesMissing(Conflict):
    """A folder push names files the registry does not store (upload them, commit again)."""

    code = "files_missing"


class Incompatible(StatehubError):
    """The plan's verdict is not allowed by the policy; ``detail['plan']`` says why."""

    code = "incompatible"
    status = 409


class Unauthorized(StatehubError):
    code = "unauthorized"
    status = 401


class Forbidden(StatehubError):
    code = "forbidden"
    status = 403


class TooLarge(StatehubError):
    code = "too_large"
    status = 413


class RangeNotSatisfiable(StatehubError):
    code = "range_not_satisfiable"
    status = 416


class StorageError(StatehubError):
    """The store returned something wrong (missing or corrupted blob)."""

    code = "storage_error"
    status = 500


class StorageUnavailable(StorageError):
    """A dependency (database, blob store, spool disk) cannot be reached right now."""

    code = "storage_unavailable"
    status = 503


class ShuttingDown(StatehubError):
    """The process is draining after SIGTERM; another replica will answer."""

    code = "shutting_down"
    status = 503


class Misconfigured(StatehubError):
    """The configuration is unsafe or inconsistent: the server refuses to start.

    Raised before the server listens, so no client ever receives it: its code stays
    ``internal``.
    """
