"""Fitting use cases: plan, fetch (a streamed, adapted safetensors file) and search.

A fetch is laid out before a byte of weights is read: the header comes from the plan, so
the length is exact, and the body is a list of segments — literal header bytes, ranges of
the stored blob passed through untouched (coalesced where they are adjacent), and tensors
that must be decoded and transformed. Memory stays O(largest transformed tensor).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from sqlalchemy.orm import Session

from service import metrics
from service.core import layout as layout_rules
from service.core import ops
from service.core.access import Scope
from service.core.adapters import AdapterLimits, AdapterSpec
from service.core.layout import HeaderBytes, Segment, StoredRange, Transformed, append_stored
from service.core.names import ModelName, VersionRef
from service.core.plan import Plan, Policy
from service.core.planner import plan as make_plan
from service.core.safetensors_format import build_header
from service.core.spec import ArchSpec, TensorSpec
from service.errors import (
    Incompatible,
    InvalidAdapter,
    InvalidRequest,
    RangeNotSatisfiable,
    StorageError,
    TooLarge,
)
from service.ingest import tensor_bytes
from service.registry import adapter_spec
from service.settings import Settings
from service.storage import repositories as repo
from service.storage.blobs import BlobStore
from service.storage.models import Version
from service.storage.sources import ByteSource

log = logging.getLogger(__name__)

VERDICT_RANK = {"exact": 0, "adapted": 1, "partial": 2, "incompatible": 3}
# Room above max_fetch_expansion x the stored size: a small checkpoint's fetch may still
# resample a position embedding, re-initialise a head or cast to a wider dtype.
FETCH_EXPANSION_SLACK = 64 * 1024 * 1024
# Ops that keep a tensor made by a fill constant: such a fill streams without being built.
_CONSTANT_PRESERVING = frozenset({"cast", "reshape", "transpose"})


# -- planning ---------------------------------------------------------------------------


def source_spec(version: Version) -> ArchSpec:
    return ArchSpec.from_json(version.spec)


def applicable_adapters(
    session: Session, *, model: str, source: ArchSpec, target: ArchSpec, policy: Policy
) -> list[tuple[dict[str, Any], AdapterSpec]]:
    """Adapters whose scope matches, plus unscoped ones the policy names explicitly."""
    chosen = []
    latest = repo.latest_adapters(session)
    unknown = set(policy.adapters) - {a.name for a in latest}
    if unknown:
        raise InvalidRequest(f"unknown adapter(s) in policy: {sorted(unknown)}")
    source_fp, target_fp = source.arch_fp, target.arch_fp
    for adapter in latest:
        scope = (adapter.scope_model, adapter.scope_source_arch_fp, adapter.scope_target_arch_fp)
        scoped = any(s is not None for s in scope)
        matches = (
            adapter.scope_model in (None, model)
            and adapter.scope_source_arch_fp in (None, source_fp)
            and adapter.scope_target_arch_fp in (None, target_fp)
        )
        if (scoped and matches) or adapter.name in policy.adapters:
            chosen.append(
                ({"name": adapter.name, "version": adapter.version}, adapter_spec(adapter))
            )
    return chosen


def adapter_limits(settings: Settings | None) -> AdapterLimits:
    """What applying adapters may cost a plan (``service.core.adapters``)."""
    if settings is None:
        return AdapterLimits()
    return AdapterLimits(
        max_key_length=settings.max_key_length, steps_per_key=settings.adapter_steps_per_key
    )


def plan_for(
    session: Session,
    version: Version,
    target: ArchSpec,
    policy: Policy,
    limits: AdapterLimits = AdapterLimits(),
) -> Plan:
    source = source_spec(version)
    model = f"{version.model.namespace}/{version.model.name}"
    adapters = applicable_adapters(
        session, model=model, source=source, target=target, policy=policy
    )
    plan = make_plan(source, target, policy=policy, adapters=adapters, limits=limits)
    metrics.PLAN_VERDICTS.inc(plan.verdict)
    return plan


def plan_version(
    *,
    session: Session,
    name: ModelName,
    ref: VersionRef,
    target: ArchSpec,
    policy: Policy,
    settings: Settings | None = None,
) -> tuple[Version, Plan]:
    version = repo.resolve_version(session, repo.get_model(session, name), ref)
    return version, plan_for(session, version, target, policy, adapter_limits(settings))


# -- fetch ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FetchLayout:
    segments: tuple[Segment, ...]
    mode: str  # passthrough | rewrite | transform
    etag: str
    plan: Plan
    # Bytes of the body made from nothing: fills, and the rows a pad adds.
    synthesized: int = 0

    @property
    def length(self) -> int:
        return sum(s.length for s in self.segments)


def layout_fetch(version: Version, plan: Plan, target: ArchSpec, settings: Settings) -> FetchLayout:
    # The body names its source version (``statehub.source``): two versions with the same
    # bytes make different bodies, so the version is part of the ETag.
    source_ref = _fetch_metadata(version, plan)["statehub.source"]
    etag = hashlib.sha256(
        f"{version.digest}{plan.canonical_json()}{source_ref}".encode()
    ).hexdigest()
    if plan.verdict == "exact":
        return FetchLayout((StoredRange(0, version.size),), "passthrough", etag, plan)
    offsets = {t["key"]: t["offsets"] for t in version.spec["tensors"]}
    source = source_spec(version)
    loaded = plan.loaded
    _check_expansion(version, [target[e.target] for e in loaded], settings)
    synthesized = 0
    header = build_header([target[e.target] for e in loaded], _fetch_metadata(version, plan))
    segments: list[Segment] = [HeaderBytes(header)]
    for entry in loaded:
        target_tensor = target[entry.target]
        if entry.action == "copy":
            assert entry.source is not None
            begin, end = offsets[entry.source]
            append_stored(segments, version.data_start + begin, version.data_start + end)
            continue
        if target_tensor.nbytes > settings.max_transform_tensor_bytes:
            raise TooLarge(
                f"tensor {entry.target!r} needs {target_tensor.nbytes} bytes to transform; "
                f"the limit is {settings.max_transform_tensor_bytes}"
            )
        start = version.data_start + offsets[entry.source][0] if entry.source else 0
        spec = source[entry.source] if entry.source else None
        segments.append(Transformed(entry, spec, start, target_tensor))
        synthesized += _synthesized_bytes(entry.ops, spec, target_tensor)
    mode = "transform" if any(isinstance(s, Transformed) for s in segments) else "rewrite"
    return FetchLayout(tuple(segments), mode, etag, plan, synthesized)


def _check_expansion(version: Version, tensors: Sequence[TensorSpec], settings: Settings) -> None:
    """The target chooses shapes (a read token's choice): what the body carries is bounded
    by what is stored, so no target makes the server build or send far more than that."""
    wanted = sum(t.nbytes for t in tensors)
    limit = int(settings.max_fetch_expansion * version.size) + FETCH_EXPANSION_SLACK
    if wanted > limit:
        largest = max(tensors, key=lambda t: t.nbytes)
        raise TooLarge(
            f"this fetch would send {wanted} bytes of tensors (the largest, {largest.key!r}, "
            f"{largest.nbytes}) from a version of {version.size} bytes; the limit is "
            f"{settings.max_fetch_expansion:g} x its size + {FETCH_EXPANSION_SLACK} bytes "
            f"= {limit} (STATEHUB_MAX_FETCH_EXPANSION)",
            detail={"limit": "max_fetch_expansion", "max_bytes": limit, "bytes": wanted},
        )


def _synthesized_bytes(
    ops_: Sequence[dict[str, Any]], source: TensorSpec | None, target: TensorSpec
) -> int:
    """Bytes of ``target`` made from nothing: all of a fill, the rows a pad adds."""
    if source is None or any(op["op"] == "fill" for op in ops_):
        return target.nbytes
    if any(op["op"] == "pad" for op in ops_) and target.numel > source.numel:
        return target.nbytes - source.numel * (target.nbytes // max(target.numel, 1))
    return 0


def _constant_element(segment: Transformed) -> bytes | None:
    """The bytes of one element of a tensor made by a fill (then only cast, reshaped or
    transposed): every element is the same, so the body repeats them instead of building
    the tensor. None for any other chain."""
    ops_ = segment.entry.ops
    if (
        not ops_
        or ops_[0]["op"] != "fill"
        or any(op["op"] not in _CONSTANT_PRESERVING for op in ops_[1:])
    ):
        return None
    scalar = [{**ops_[0], "shape": []}, *(op for op in ops_[1:] if op["op"] == "cast")]
    element = bytes(tensor_bytes(ops.apply_chain(scalar, None)))
    if segment.target.numel and len(element) * segment.target.numel != segment.length:
        return None  # an inconsistent plan: let transform() refuse it
    return element


def _repeat(element: bytes, lo: int, hi: int, chunk: int) -> Iterator[memoryview]:
    """Bytes [lo, hi) of ``element`` repeated, in pieces of about ``chunk`` bytes."""
    if not element:
        return
    # No bigger than the range needs: a scalar fill must not allocate a whole chunk.
    count = max(1, min(chunk, hi - lo + len(element)) // len(element))
    block = memoryview(element * count)
    position = lo
    while position < hi:
        offset = position % len(element)
        piece = block[offset : offset + min(hi - position, len(block) - offset)]
        position += len(piece)
        yield piece


def _fetch_metadata(version: Version, plan: Plan) -> dict[str, str]:
    model = version.model
    return {
        "format": "pt",
        "statehub.source": f"{model.namespace}/{model.name}:{version.number}",
        "statehub.digest": version.digest,
        "statehub.plan": plan.canonical_json(),
        "statehub.keep_target": json.dumps(plan.keep_target),
        "statehub.tied": json.dumps(plan.tied, sort_keys=True),
    }


def parse_range(header: str | None, total: int) -> tuple[int, int] | None:
    """A single ``bytes=`` range as [start, end), or None (``service.core.layout``)."""
    try:
        return layout_rules.parse_range(header, total)
    except layout_rules.UnsatisfiableRange as exc:
        raise RangeNotSatisfiable(
            f"range {header!r} is outside the {total} bytes of this response",
            detail={"length": total},
        ) from exc


def iter_layout(
    layout: FetchLayout, blobs: ByteSource, digest: str, *, start: int, end: int, chunk: int
) -> Iterator[bytes | memoryview]:
    """The bytes [start, end) of the fetch body, produced segment by segment.

    Stored bytes are read forward through a ``SequentialReader``: segments whose sources are
    adjacent in the blob (the common case: a checkpoint read in its own order) share one
    ranged read instead of a request per tensor.
    """
    reader = SequentialReader(blobs, digest, chunk)
    run_ends = _run_ends(layout.segments)
    position = 0
    try:
        for segment, run_end in zip(layout.segments, run_ends, strict=True):
            seg_start, seg_end = position, position + segment.length
            position = seg_end
            if seg_end <= start or segment.length == 0:
                continue
            if seg_start >= end:
                break
            lo, hi = max(start, seg_start) - seg_start, min(end, seg_end) - seg_start
            if isinstance(segment, HeaderBytes):
                yield segment.data[lo:hi]
            elif isinstance(segment, StoredRange):
                yield from reader.chunks(segment.start + lo, segment.start + hi, run_end)
            elif (element := _constant_element(segment)) is not None:
                yield from _repeat(element, lo, hi, chunk)
            else:
                yield transform(segment, reader, run_end)[lo:hi]
            metrics.BYTES_FETCHED.inc(amount=min(end, seg_end) - max(start, seg_start))
    finally:
        reader.close()


def _source_span(segment: Segment) -> tuple[int, int] | None:
    if isinstance(segment, StoredRange):
        return segment.start, segment.end
    if isinstance(segment, Transformed) and segment.source is not None:
        return segment.source_start, segment.source_start + segment.source.nbytes
    return None


def _run_ends(segments: Sequence[Segment]) -> list[int]:
    """For each segment, where the run of blob-adjacent source spans it belongs to ends."""
    ends = [0] * len(segments)
    run_end, next_start = 0, -1
    for index in range(len(segments) - 1, -1, -1):
        span = _source_span(segments[index])
        if span is None:
            continue
        if span[1] != next_start:
            run_end = span[1]
        ends[index], next_start = run_end, span[0]
    return ends


class SequentialReader:
    """Forward reads of one blob: a read that starts where the previous one ended goes on
    with the same ranged read; any other opens a new one, up to the end of its run."""

    def __init__(self, blobs: ByteSource, digest: str, chunk: int) -> None:
        self._blobs = blobs
        self._digest = digest
        self._chunk = chunk
        self._stream: Iterator[bytes | memoryview] | None = None
        self._position = -1
        self._pending = memoryview(b"")

    def chunks(self, start: int, end: int, run_end: int) -> Iterator[memoryview]:
        if self._stream is None or start != self._position:
            self.close()
            ranged = self._blobs.iter_range(self._digest, start, run_end, self._chunk)
            self._stream, self._position = iter(ranged), start
        remaining = end - start
        while remaining:
            if not self._pending:
                piece = next(self._stream, None)
                if piece is None:
                    raise StorageError(f"blob {self._digest} ended before byte {end}")
                self._pending = memoryview(piece)
            taken = self._pending[:remaining]
            self._pending = self._pending[len(taken) :]
            self._position += len(taken)
            remaining -= len(taken)
            yield taken

    def read(self, start: int, size: int, run_end: int) -> bytearray:
        """Exactly ``size`` bytes from ``start``, in a buffer of their own."""
        out = bytearray(size)
        view, filled = memoryview(out), 0
        for piece in self.chunks(start, start + size, run_end):
            view[filled : filled + len(piece)] = piece
            filled += len(piece)
        return out

    def close(self) -> None:
        close = getattr(self._stream, "close", None)
        if close is not None:
            close()
        self._stream, self._pending = None, memoryview(b"")


def stream_fetch(
    result: FetchResult, blobs: ByteSource, *, chunk: int
) -> Iterator[bytes | memoryview]:
    """The body of a fetch response, counted in flight while it streams.

    A storage error here comes after the status line was sent: it is counted (the client
    sees a short body), since no error handler will see it.
    """
    metrics.FETCHES_IN_FLIGHT.inc()
    try:
        yield from iter_layout(
            result.layout,
            blobs,
            result.version.digest,
            start=result.start,
            end=result.end,
            chunk=chunk,
        )
    except StorageError as exc:
        metrics.STORAGE_ERRORS.inc(exc.code)
        raise
    finally:
        metrics.FETCHES_IN_FLIGHT.dec()


def transform(segment: Transformed, reader: SequentialReader, run_end: int) -> memoryview:
    """Decode one source tensor, apply its ops, return the target's raw bytes."""
    metrics.TENSORS_DECODED.inc()
    tensor = None
    if segment.source is not None:
        raw = reader.read(segment.source_start, segment.source.nbytes, run_end)
        tensor = decode(raw, segment.source)
    result = ops.apply_chain(segment.entry.ops, tensor)
    target = segment.target
    if tuple(result.shape) != target.shape or ops.dtype_code(result.dtype) != target.dtype:
        raise StorageError(  # the planner's inference and the ops disagree: never serve it
            f"transform of {target.key!r} produced {list(result.shape)} "
            f"{ops.dtype_code(result.dtype)}, expected {list(target.shape)} {target.dtype}"
        )
    return tensor_bytes(result)  # a view of the result: no copy on the way out


def decode(raw: bytearray, spec: TensorSpec) -> torch.Tensor:
    """A tensor over ``raw`` without a copy; ops build new tensors from it."""
    dtype = ops.TORCH_DTYPES[spec.dtype]
    if spec.numel == 0:
        return torch.empty(spec.shape, dtype=dtype)
    return torch.frombuffer(raw, dtype=dtype).reshape(spec.shape)


@dataclass(frozen=True)
class FetchResult:
    version: Version
    layout: FetchLayout
    start: int
    end: int
    partial: bool


def prepare_fetch(
    *,
    session: Session,
    blobs: BlobStore,
    settings: Settings,
    name: ModelName,
    ref: VersionRef,
    target: ArchSpec,
    policy: Policy,
    range_header: str | None,
    if_range: str | None,
) -> FetchResult:
    """Plan, refuse what the policy forbids, lay out the body and resolve the range."""
    version, plan = plan_version(
        session=session, name=name, ref=ref, target=target, policy=policy, settings=settings
    )
    if plan.verdict == "incompatible":
        raise Incompatible(
            "the checkpoint cannot be fitted to the target under this policy: "
            + "; ".join(plan.reasons[:5]),
            detail={"plan": plan.to_json()},
        )
    if version.extents is None and blobs.size(version.digest) != version.size:
        raise StorageError(f"stored blob {version.digest} has the wrong size")
    layout = layout_fetch(version, plan, target, settings)
    total = layout.length
    wanted = None if if_range and if_range.strip('"') != layout.etag else range_header
    byte_range = parse_range(wanted, total)
    start, end = byte_range or (0, total)
    log.debug(
        "fetch of %s:%s laid out",
        name,
        version.number,
        extra={"verdict": plan.verdict, "mode": layout.mode, "bytes": end - start},
    )
    return FetchResult(version, layout, start, end, partial=byte_range is not None)


# -- search -----------------------------------------------------------------------------


def search_compatible(
    *,
    session: Session,
    target: ArchSpec,
    policy: Policy,
    limit: int,
    pool: int = 200,
    readable: Sequence[Scope] | None = None,
    settings: Settings | None = None,
) -> list[tuple[Version, Plan]]:
    """Stored versions ranked by how well they fit ``target``.

    Versions with the target's ``arch_fp`` or ``shape_fp`` are planned first (they are the
    likely matches); the rest of the pool are the most recent versions. Only versions of
    models matching ``readable`` (None: every model) are considered. A version whose adapters
    cross their limits (``adapter_limits``) is left out: its own plan and fetch say why.
    """
    limits = adapter_limits(settings)
    candidates: Sequence[Version] = repo.candidate_versions(
        session, arch_fp=target.arch_fp, shape_fp=target.shape_fp, limit=pool, readable=readable
    )
    ranked = []
    for version in candidates:
        try:
            plan = plan_for(session, version, target, policy, limits)
        except InvalidAdapter as exc:
            log.info("search: version %s left out: %s", version.id, exc.message)
            continue
        if plan.verdict != "incompatible":
            ranked.append((version, plan))
    ranked.sort(
        key=lambda vp: (
            VERDICT_RANK[vp[1].verdict],
            -_loaded_fraction(vp[1]),
            -vp[0].created_at.timestamp(),
            vp[0].id,
        )
    )
    return ranked[:limit]


def _loaded_fraction(plan: Plan) -> float:
    total = plan.params.total
    return (plan.params.exact + plan.params.adapted) / total if total else 0.0
