"""How request bodies are read: raw uploads, and JSON only after authentication.

The app's BodyLimitMiddleware bounds every POST/PUT/PATCH body by ``max_spec_bytes``; a
route marked ``raw_body`` here is bounded by ``max_upload_bytes`` where it spools the body
(``spool_request``). Marking is per route, so a new upload route is one decorator, not a
path pattern.

FastAPI parses a JSON body before it solves a route's dependencies, authentication
included. ``AuthFirstRoute`` (the route class of every /v1 router) authenticates first and
then parses the body itself, in a worker thread and within a budget of JSON values
(``service.core.jsondata``); FastAPI is handed the parsed value.
"""

from __future__ import annotations

import email.message
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, TypeVar

from fastapi import Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.routing import APIRoute
from starlette.routing import Match
from starlette.types import Scope

from service.api.deps import authenticate_first
from service.core.jsondata import body_value_budget, parse_body
from service.settings import Settings

RAW_BODY_ATTR = "__statehub_raw_body__"
# JSON bodies up to this size are parsed on the event loop (a few ms at most).
INLINE_PARSE_BYTES = 256 * 1024
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


class ParsedJsonRequest(Request):
    """The request with its body already read and parsed: FastAPI asks for both."""

    def __init__(self, request: Request, body: bytes, value: Any) -> None:
        super().__init__(request.scope, request.receive)
        self._raw = body
        self._value = value

    async def body(self) -> bytes:
        return self._raw

    async def json(self) -> Any:
        return self._value


class AuthFirstRoute(APIRoute):
    """A route whose JSON body is read only once the caller is authenticated, and parsed
    within ``body_value_budget`` (413 ``too_large``), strictly (422 for what JSON or the
    stores cannot hold: NaN, NUL, unpaired surrogates, integers of thousands of digits)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:  # no body to parse: authenticated by its dependency
            return handler

        async def authenticated_then_parsed(request: Request) -> Response:
            await authenticate_first(request)
            body = await request.body()  # bounded by BodyLimitMiddleware (413, chunked too)
            if not body or not _is_json(request.headers.get("content-type")):
                return await handler(request)  # FastAPI refuses it without parsing JSON
            settings: Settings = request.app.state.settings
            budget = body_value_budget(max_tensors=settings.max_tensors, max_rank=settings.max_rank)
            if len(body) <= INLINE_PARSE_BYTES:  # microseconds: cheaper than a thread hop
                value = parse_body(body, max_values=budget)
            else:  # off the event loop: a large spec takes a while; /healthz does not wait
                value = await run_in_threadpool(parse_body, body, max_values=budget)
            return await handler(ParsedJsonRequest(request, body, value))

        return authenticated_then_parsed


def _is_json(content_type: str | None) -> bool:
    """What FastAPI parses as JSON: application/json or application/*+json."""
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )
