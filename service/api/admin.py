"""Operations on the whole store: garbage collection (``admin:*``)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from pydantic import Field

from service import gc
from service.api.bodies import AuthFirstRoute
from service.api.deps import BlobStoreDep, DatabaseDep, PrincipalDep, SettingsDep
from service.api.schemas import GcOut, GcRequest

router = APIRouter(prefix="/v1/admin", tags=["admin"], route_class=AuthFirstRoute)


class GcReportOut(GcOut):
    fit_cache_evicted: int = Field(
        default=0, description="fit cache entries unused for STATEHUB_FIT_CACHE_TTL_S, evicted"
    )
    composed_files_deleted: int = Field(
        default=0, description="composed files no version names, deleted (their blobs follow)"
    )


@router.post("/gc", response_model=GcReportOut)
async def collect_garbage(
    db: DatabaseDep,
    blobs: BlobStoreDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    body: GcRequest | None = None,
) -> GcReportOut:
    """Delete blobs no version references (soft-deleted versions keep theirs) and temp
    files of interrupted uploads, all older than the grace period; never a blob an upload
    in flight is about to reference (``service.gc``). Fit cache entries unused for
    ``STATEHUB_FIT_CACHE_TTL_S`` are evicted first, and their blobs collected with the rest."""
    principal.require_global("admin", object_type="store", object_ref="gc")
    body = body or GcRequest()
    grace_s = settings.gc_grace_s if body.grace_s is None else body.grace_s
    report = await run_in_threadpool(
        lambda: gc.collect(
            db=db,
            blobs=blobs,
            settings=settings,
            grace_s=grace_s,
            dry_run=body.dry_run,
            actor=principal.actor,
        )
    )
    return GcReportOut(**vars(report))
