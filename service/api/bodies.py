"""Which routes take a raw body (tensor or file bytes) instead of JSON.

The app's BodyLimitMiddleware bounds every other POST/PUT/PATCH body by
``max_spec_bytes``; a route marked here is bounded by ``max_upload_bytes`` where it
spools the body (``spool_request``). Marking is per route, so a new upload route is one
decorator, not a path pattern.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from starlette.routing import Match
from starlette.types import Scope

RAW_BODY_ATTR = "__statehub_raw_body__"
F = TypeVar("F", bound=Callable[..., Any])


def raw_body(endpoint: F) -> F:
    """Mark a route's endpoint as taking a raw upload body (put it below ``@router.put``)."""
    setattr(endpoint, RAW_BODY_ATTR, True)
    return endpoint


def takes_raw_body(scope: Scope) -> bool:
    """Whether the route this request matches (method and path) is marked ``raw_body``."""
    return _marked(getattr(getattr(scope.get("app"), "router", None), "routes", ()), scope)


def _marked(routes: Iterable[Any], scope: Scope) -> bool:
    for route in routes:
        # FastAPI keeps an included router whole; its routes carry their full paths
        # (this app includes routers without an extra prefix).
        inner = getattr(route, "original_router", None)
        if inner is not None:
            if _marked(inner.routes, scope):
                return True
            continue
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return bool(getattr(getattr(route, "endpoint", None), RAW_BODY_ATTR, False))
    return False
