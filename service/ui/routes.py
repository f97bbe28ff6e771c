"""The read-only web UI at /ui: server-rendered pages over the same use cases as the API.

Routes parse, call ``service.registry`` / ``service.fitting`` / the repository queries the
API routers call, turn the result into view data (``service.ui.views``) and render a Jinja2
template (autoescaped: tensor keys, metadata and descriptions are user data). Nothing here
writes: the only POSTs are the plan form (a plan is computed, not stored) and the login
form (a cookie in the browser).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import jinja2
from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import fitting, folders, registry
from service.api.deps import (
    BlobStoreDep,
    Caller,
    ModelNameDep,
    PrincipalDep,
    SessionDep,
    SettingsDep,
    VersionRefDep,
    get_principal,
)
from service.api.schemas import PolicyIn, SpecIn
from service.core.names import LATEST, ModelName, VersionRef, parse_ref
from service.core.plan import Policy
from service.core.spec import ArchSpec, validate_spec
from service.errors import Forbidden, InvalidRequest, InvalidSpec, StatehubError, Unauthorized
from service.settings import Settings
from service.storage import repositories as repo
from service.storage.blobs import BlobStore
from service.storage.models import Model, Version
from service.ui import views

log = logging.getLogger("statehub")

HERE = Path(__file__).parent
STATIC_DIR = HERE / "static"
TOKEN_COOKIE = "statehub_token"
MODELS_PER_PAGE = 25
TENSORS_PER_PAGE = 500
PLAN_ROWS_PER_PAGE = 500
MAX_TOKEN_CHARS = 512

# No inline script or style anywhere: a key that slips past escaping still cannot run.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        bytes=views.human_bytes,
        count=views.human_count,
        thousands=views.thousands,
        shape=views.shape_text,
        when=views.when,
        pretty=lambda value: json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False),
    )
    env.globals.update(kind_labels=views.KIND_LABELS, kinds=views.KINDS)
    return env


TEMPLATES = _environment()


def render(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    page = TEMPLATES.get_template(template).render(
        ui=f"{root}/ui",
        static=f"{root}/ui/static",
        request_id=getattr(request.state, "request_id", ""),
        signed_in="authorization" in request.headers,
        **context,
    )
    return HTMLResponse(page, status_code=status)


def error_page(request: Request, status: int, code: str, message: str) -> HTMLResponse:
    response = render(request, "error.html", status, status_code=status, code=code, message=message)
    response.headers["X-Error-Code"] = code
    return response


class UIRoute(APIRoute):
    """Errors become readable pages with the API's stable codes (not JSON), the token
    cookie is passed on as the caller's bearer token, and every page gets security headers."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def ui_handler(request: Request) -> Response:
            request = with_cookie_token(request)
            try:
                response = await handler(request)
            except StatehubError as exc:
                if exc.status >= 500:
                    log.error("%s: %s", exc.code, exc.message, exc_info=exc.__cause__ or exc)
                response = error_page(request, exc.status, exc.code, exc.message)
            except RequestValidationError as exc:
                response = error_page(request, 422, "invalid_request", _first_error(exc))
            except StarletteHTTPException as exc:
                code = "not_found" if exc.status_code == 404 else "invalid_request"
                response = error_page(request, exc.status_code, code, str(exc.detail))
            response.headers.update(SECURITY_HEADERS)
            return response

        return ui_handler


def _first_error(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "invalid request"
    where = ".".join(str(p) for p in errors[0].get("loc", ()))
    return f"{where}: {errors[0].get('msg', 'invalid')}"


def with_cookie_token(request: Request) -> Request:
    """The request as the handlers see it: the token cookie as ``Authorization: Bearer``.

    An explicit Authorization header wins. Whatever authenticates API callers (the
    principal dependency) then authenticates the UI's reader the same way.
    """
    token = request.cookies.get(TOKEN_COOKIE, "")
    if not valid_token(token) or "authorization" in request.headers:
        return request
    headers = [*request.scope["headers"], (b"authorization", f"Bearer {token}".encode())]
    return Request({**request.scope, "headers": headers}, request.receive)


def valid_token(token: str) -> bool:
    return (
        0 < len(token) <= MAX_TOKEN_CHARS
        and token.isascii()
        and token.isprintable()
        and (" " not in token and ";" not in token)
    )


router = APIRouter(prefix="/ui", route_class=UIRoute, include_in_schema=False)


# -- models -----------------------------------------------------------------------------


# -- models -----------------------------------------------------------------------------


@router.get("", response_class=HTMLResponse)
def models_page(
    request: Request,
    session: SessionDep,
    caller: PrincipalDep,
    q: str = Query(default="", max_length=200),
    namespace: str = Query(default="", max_length=96),
    tag: str = Query(default="", max_length=96),
    page: int = Query(default=1, ge=1, le=10**6),
) -> HTMLResponse:
    _no_nul(q=q, namespace=namespace, tag=tag)
    models, total = repo.list_models(
        session,
        query=q or None,
        namespace=namespace or None,
        tag=tag or None,
        arch_fp=None,
        limit=MODELS_PER_PAGE,
        offset=(page - 1) * MODELS_PER_PAGE,
        readable=caller.readable(),  # what the caller may not read is left out, as in the API
    )
    pages = views.paginate(total, page, MODELS_PER_PAGE)
    filters = {k: v for k, v in (("q", q), ("namespace", namespace), ("tag", tag)) if v}
    return render(
        request,
        "models.html",
        rows=[(m, _latest(m)) for m in models],
        pages=pages,
        q=q,
        namespace=namespace,
        tag=tag,
        page_query=lambda n: urlencode({**filters, "page": n}),
    )


def _no_nul(**params: str) -> None:
    """PostgreSQL refuses NUL in text (a 500 if it got there); no stored string has one."""
    for key, value in params.items():
        if "\x00" in value:
            raise InvalidRequest(f"{key} must not contain NUL characters")


def _latest(model: Model) -> Version | None:
    return next((a.version for a in model.aliases if a.name == LATEST), None)


@router.get("/models/{namespace}/{name}", response_class=HTMLResponse)
def model_page(
    request: Request,
    name: ModelNameDep,
    session: SessionDep,
    caller: PrincipalDep,
    settings: SettingsDep,
) -> HTMLResponse:
    caller.require("read", name)
    model = repo.get_model(session, name)
    versions = list(reversed(repo.list_versions(session, model)))  # newest first
    aliases = repo.aliases_by_version(session, model)
    named = {a for vs in aliases.values() for a in vs}
    return render(
        request,
        "model.html",
        model=model,
        name=name,
        versions=versions,
        aliases=aliases,
        summaries={v.id: views.ingest_summary(v.ingest or {}) for v in versions},
        snippet_ref=f"{name}@prod" if "prod" in named else str(name),
        # The configured address, never the request's Host header (which anyone can set,
        # and a cache or a pasted snippet would carry to others).
        base_url=settings.effective_public_url,
    )


# -- versions ---------------------------------------------------------------------------


@router.get("/models/{namespace}/{name}/versions/{ref}", response_class=HTMLResponse)
def version_page(
    request: Request,
    name: ModelNameDep,
    ref: VersionRefDep,
    session: SessionDep,
    caller: PrincipalDep,
    blobs: BlobStoreDep,
    q: str = Query(default="", max_length=1024),
    page: int = Query(default=1, ge=1, le=10**6),
) -> HTMLResponse:
    version = _readable_version(session, caller, name, ref)
    aliases = repo.aliases_by_version(session, version.model).get(version.id, [])
    files = repo.version_files(session, version)
    every = views.tensor_rows(version.spec["tensors"])
    shown = views.filter_rows(every, q)
    pages = views.paginate(len(shown), page, TENSORS_PER_PAGE)
    before = shown[pages.start - 1] if pages.start > 0 else None
    query = {"q": q} if q else {}
    return render(
        request,
        "version.html",
        name=name,
        version=version,
        aliases=aliases,
        groups=views.group_rows(shown[pages.start : pages.end], before=before),
        total_bytes=sum(r.nbytes for r in every),
        shown=len(shown),
        pages=pages,
        q=q,
        page_query=lambda n: urlencode({**query, "page": n}),
        summary=views.ingest_summary(version.ingest or {}),
        tie_groups=version.spec.get("tie_groups", []),
        files=files,
        previews=views.text_previews(
            files, folders.StoredFiles.of(session, blobs, (f.sha256 for f in files)).read_range
        ),
    )


def _readable_version(
    session: Session, caller: Caller, name: ModelName, ref: VersionRef
) -> Version:
    caller.require("read", name)  # before the lookup: a denial says nothing of existence
    return registry.get_version(session=session, name=name, ref=ref)


# -- plans ------------------------------------------------------------------------------


def _choice(fields: Mapping[str, Any], key: str, default: str) -> str:
    value = fields.get(key, default)
    return value if isinstance(value, str) else default


def policy_from(fields: Mapping[str, Any]) -> Policy:
    """The policy fields of a plan form (query string or form body), validated as the
    API validates its JSON policy."""
    adapters = [a.strip() for a in _choice(fields, "adapters", "").split(",") if a.strip()]
    try:
        return PolicyIn.model_validate(
            {
                "strict": _choice(fields, "strict", "") in ("1", "on", "true"),
                "allow_structural": _choice(fields, "structural", "allow") != "forbid",
                "head": _choice(fields, "head", "keep"),
                "embedding": _choice(fields, "embedding", "keep"),
                "on_missing": _choice(fields, "on_missing", "keep"),
                "adapters": adapters,
            }
        ).to_policy()
    except ValidationError as exc:
        raise InvalidRequest(f"policy {_pydantic_message(exc)}") from exc


def _pydantic_message(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "value"
    return f"{where}: {first['msg']}"


def parse_spec(text: str, settings: Settings) -> ArchSpec:
    """A pasted or uploaded spec: what ``statehub inspect --spec`` prints (or an API plan
    body holding one under ``target``), bounded like the API's."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidSpec(f"the spec is not valid JSON: {exc}") from exc
    if isinstance(data, dict) and "tensors" not in data and isinstance(data.get("target"), dict):
        data = data["target"]
    try:
        spec = SpecIn.model_validate(data).to_spec()
    except ValidationError as exc:
        raise InvalidSpec(
            f"not a spec ({_pydantic_message(exc)}); paste what `statehub inspect --spec` prints"
        ) from exc
    return validate_spec(
        spec,
        max_tensors=settings.max_tensors,
        max_rank=settings.max_rank,
        max_dim=settings.max_dim,
        max_key_length=settings.max_key_length,
    )


async def form_fields(request: Request) -> dict[str, str]:
    """The plan form's fields; an uploaded spec file becomes ``spec_json``."""
    async with request.form(max_files=1, max_fields=32) as form:
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        upload = form.get("spec_file")
        if isinstance(upload, UploadFile) and upload.filename:
            raw = await upload.read()
            try:
                fields["spec_json"] = raw.decode("utf-8-sig")
            except UnicodeDecodeError as exc:
                raise InvalidSpec(f"{upload.filename} is not a UTF-8 JSON file") from exc
            fields["spec_name"] = upload.filename
    return fields


def _plan_context(
    session: Session,
    blobs: BlobStore,
    *,
    source: Version,
    target: ArchSpec,
    target_label: str,
    fields: Mapping[str, Any],
    posted: bool = False,
) -> dict[str, Any]:
    """Plan ``source`` onto ``target`` with the API's use case, and lay it out as rows."""
    model = source.model
    version, plan = fitting.plan_version(
        session=session,
        name=ModelName(model.namespace, model.name),
        ref=VersionRef(number=source.number),  # the version shown, even if an alias moved
        target=target,
        policy=policy_from(fields),
        blobs=blobs,
    )
    rows = views.plan_rows(plan, fitting.source_spec(version), target)
    changes_only = _choice(fields, "show", "all") == "changes"
    listed = [r for r in rows if r.kind != "exact"] if changes_only else rows
    page = views.paginate(len(listed), _page_number(fields), PLAN_ROWS_PER_PAGE)
    return {
        "plan": plan,
        "version": version,
        "target_label": target_label,
        "target_count": len(target),
        "rows": listed[page.start : page.end],
        "row_pages": page,
        "counts": views.kind_counts(rows),
        "bars": views.coverage_bars(plan),
        "fields": fields,
        # Paging a posted spec posts the form again (the spec is not stored anywhere).
        "page_form": "spec-form" if posted else None,
        "page_query": lambda n: urlencode({**_without(fields, "page"), "page": n}),
    }


def _without(fields: Mapping[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if k != key}


def _page_number(fields: Mapping[str, Any]) -> int:
    value = _choice(fields, "page", "1")
    return int(value) if value.isdigit() and len(value) < 9 else 1


def _plan_form_context(
    session: Session, version: Version, fields: Mapping[str, Any]
) -> dict[str, Any]:
    model = version.model
    return {
        "name": ModelName(model.namespace, model.name),
        "source": version,
        "choices": [v.number for v in repo.list_versions(session, model) if v.id != version.id],
        "fields": fields,
    }


@router.get("/models/{namespace}/{name}/versions/{ref}/plan", response_class=HTMLResponse)
def plan_page(
    request: Request,
    name: ModelNameDep,
    ref: VersionRefDep,
    session: SessionDep,
    blobs: BlobStoreDep,
    caller: PrincipalDep,
    target: str = Query(default="", max_length=300),
) -> HTMLResponse:
    """The form, and with ``target=ns/name:N`` the plan onto that stored version's spec."""
    fields = dict(request.query_params)
    source = _readable_version(session, caller, name, ref)
    context = _plan_form_context(session, source, fields)
    if target:
        target_version = _stored_target(session, caller, target, default=name)
        context |= _plan_context(
            session,
            blobs,
            source=source,
            target=fitting.source_spec(target_version),
            target_label=_ref_text(target_version),
            fields=fields,
        )
    return render(request, "plan.html", **context)


@router.post("/models/{namespace}/{name}/versions/{ref}/plan", response_class=HTMLResponse)
def plan_submit(
    request: Request,
    name: ModelNameDep,
    ref: VersionRefDep,
    session: SessionDep,
    blobs: BlobStoreDep,
    settings: SettingsDep,
    caller: PrincipalDep,
    fields: dict[str, str] = Depends(form_fields),
) -> HTMLResponse:
    """The plan onto a pasted or uploaded spec JSON; computed, shown, not stored."""
    source = _readable_version(session, caller, name, ref)
    context = _plan_form_context(session, source, fields)
    text = fields.get("spec_json", "").strip()
    try:
        if not text:
            raise InvalidSpec("paste a spec JSON or choose a file (statehub inspect --spec)")
        context |= _plan_context(
            session,
            blobs,
            source=source,
            target=parse_spec(text, settings),
            target_label=fields.get("spec_name") or "pasted spec",
            fields=fields,
            posted=True,
        )
    except InvalidRequest as exc:  # the form again, with what to fix, under the same code
        response = render(request, "plan.html", exc.status, form_error=exc, **context)
        response.headers["X-Error-Code"] = exc.code
        return response
    return render(request, "plan.html", **context)


def _stored_target(session: Session, caller: Caller, text: str, *, default: ModelName) -> Version:
    """``3``, ``prod`` (this model) or ``ns/name:3`` / ``ns/name@prod`` (any model)."""
    text = text.strip()
    if "/" not in text and ":" not in text and "@" not in text:
        return _readable_version(session, caller, default, VersionRef.parse(text))
    model, ref = parse_ref(text)
    return _readable_version(session, caller, model, ref)


def _ref_text(version: Version) -> str:
    return f"{version.model.namespace}/{version.model.name}:{version.number}"


# -- diff -------------------------------------------------------------------------------


@router.get("/diff", response_class=HTMLResponse)
def diff_page(
    request: Request,
    session: SessionDep,
    blobs: BlobStoreDep,
    caller: PrincipalDep,
    a: str = Query(default="", max_length=300),
    b: str = Query(default="", max_length=300),
) -> HTMLResponse:
    """Two versions' architectures, and how the planner maps A's checkpoint onto B."""
    context: dict[str, Any] = {"a": a, "b": b}
    if a and b:
        version_a = _readable_version(session, caller, *parse_ref(a))
        version_b = _readable_version(session, caller, *parse_ref(b))
        spec_a, spec_b = fitting.source_spec(version_a), fitting.source_spec(version_b)
        context |= _plan_context(
            session,
            blobs,
            source=version_a,
            target=spec_b,
            target_label=_ref_text(version_b),
            fields=dict(request.query_params),
        )
        context |= {
            "version_a": version_a,
            "version_b": version_b,
            "diff": views.spec_diff(spec_a, spec_b),
        }
    return render(request, "diff.html", **context)


# -- token ------------------------------------------------------------------------------


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request) -> HTMLResponse:
    """Who the pages are read as; never refused, so that a bad stored token can be replaced."""
    try:
        reader, problem = get_principal(request).actor, ""
    except Unauthorized as exc:
        reader, problem = "", exc.message
    return render(request, "login.html", hint=_token_hint(request), reader=reader, problem=problem)


def _token_hint(request: Request) -> str:
    """The first characters of the token this page was read with (never the whole)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return f"{token[:8]}…" if scheme.lower() == "bearer" and token else ""


@router.post("/login")
async def login_submit(request: Request, settings: SettingsDep) -> Response:
    """Keep a pasted token in an HttpOnly, SameSite=Strict cookie (or forget it)."""
    _same_origin(request, settings)
    async with request.form(max_files=0, max_fields=8) as form:
        token = str(form.get("token", "")).strip()
        forget = form.get("action") == "forget"
    root = request.scope.get("root_path", "")
    response = RedirectResponse(f"{root}/ui/login", status_code=303)
    if forget:
        response.delete_cookie(TOKEN_COOKIE, path=f"{root}/ui", httponly=True, samesite="strict")
        return response
    if not valid_token(token):
        raise InvalidRequest("paste the whole token: printable characters, no spaces")
    response.set_cookie(
        TOKEN_COOKIE,
        token,
        max_age=30 * 24 * 3600,
        path=f"{root}/ui",
        secure=request.url.scheme == "https" or settings.public_url.startswith("https:"),
        httponly=True,
        samesite="strict",
    )
    return response


def _same_origin(request: Request, settings: Settings) -> None:
    """Refuse a login posted from another site (it would sign the reader in as someone
    else). Browsers send Origin with every form POST, so a missing one, or ``null`` (a
    sandboxed frame, a ``data:`` page, a redirect across sites), is refused too. Accepted:
    the origin the browser addressed (its Host header, which a page on another site cannot
    set) or the configured public URL's (behind a proxy that rewrites Host)."""
    origin = request.headers.get("origin", "")
    parts = urlsplit(origin)
    public = urlsplit(settings.public_url)
    same_host = bool(parts.netloc) and parts.netloc == request.headers.get("host", "")
    same_public = bool(settings.public_url) and (parts.scheme, parts.netloc) == (
        public.scheme,
        public.netloc,
    )
    if not origin or origin == "null" or parts.scheme not in ("http", "https"):
        raise Forbidden("the login form must be posted from this site (no usable Origin header)")
    if not (same_host or same_public):
        raise Forbidden("the login form was posted from another site")


# -- anything else under /ui ------------------------------------------------------------


@router.get("/{path:path}", response_class=HTMLResponse)
def not_found(request: Request, path: str) -> Response:
    if not path:  # /ui/ -> /ui
        return RedirectResponse(f"{request.scope.get('root_path', '')}/ui", status_code=308)
    raise StarletteHTTPException(404, f"no page at /ui/{path}")
