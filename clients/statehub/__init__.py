"""statehub: push PyTorch checkpoints once, fetch them fitted to any model.

>>> from statehub import Client
>>> hub = Client()
>>> hub.push("vision/resnet50-rsp", model, alias="prod")
>>> sd = hub.fetch("vision/resnet50-rsp@prod", target=my_model)
>>> my_model.load_state_dict(sd)
"""

from statehub._client import Client, Progress, split_ref
from statehub._errors import (
    Conflict,
    ConnectionFailed,
    FilesMissing,
    Forbidden,
    Incompatible,
    IntegrityError,
    InvalidAdapter,
    InvalidCheckpoint,
    InvalidName,
    InvalidRef,
    InvalidRequest,
    InvalidSpec,
    NotCached,
    NotFound,
    RangeNotSatisfiable,
    RecipeParamsMissing,
    ShuttingDown,
    StatehubError,
    StatehubWarning,
    StorageError,
    StorageUnavailable,
    TensorsMissing,
    TooLarge,
    Unauthorized,
    UnsafePickle,
)
from statehub._models import FetchedStateDict, Plan, PlanEntry, Version
from statehub._tensors import spec_of

__all__ = [
    "Client",
    "Conflict",
    "ConnectionFailed",
    "FetchedStateDict",
    "FilesMissing",
    "Forbidden",
    "Incompatible",
    "IntegrityError",
    "InvalidAdapter",
    "InvalidCheckpoint",
    "InvalidName",
    "InvalidRef",
    "InvalidRequest",
    "InvalidSpec",
    "NotCached",
    "NotFound",
    "Plan",
    "PlanEntry",
    "Progress",
    "RangeNotSatisfiable",
    "RecipeParamsMissing",
    "ShuttingDown",
    "StatehubError",
    "StatehubWarning",
    "StorageError",
    "StorageUnavailable",
    "TensorsMissing",
    "TooLarge",
    "Unauthorized",
    "UnsafePickle",
    "Version",
    "spec_of",
    "split_ref",
]
