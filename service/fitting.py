"""Fitting use cases: plan, fetch (a streamed, adapted safetensors file) and search.

A fetch is laid out before a byte of weights is read: the header comes from the plan, so
the length is exact, and the body is a list of segments — literal header bytes, ranges of
the stored blob passed through untouched, and tensors that must be decoded and transformed.
The stored bytes are read as ``core.layout.read_plan`` says: a few large parts, several in
flight. Memory stays O(largest transformed tensor + in_flight x part).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import mmap
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
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
from service.core.recipes import matching_recipes, params_from_config
from service.core.safetensors_format import build_header
from service.core.spec import DTYPE_SIZES, ArchSpec, TensorSpec
from service.errors import (
    Incompatible,
    InvalidAdapter,
    InvalidRequest,
    RangeNotSatisfiable,
    RecipeParamsMissing,
    StorageError,
    TooLarge,
)
from service.ingest import tensor_bytes
from service.recipes import builtin_recipes
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
# Part of the ETag: a body laid out differently (here: tensors in stored order) is another
# body, so no resumed range mixes bytes of two layouts.
BODY_LAYOUT = "stored-order"
# Pieces in which one part is read into its buffer.
_PART_CHUNK = 1024 * 1024


# -- planning ---------------------------------------------------------------------------


def source_spec(version: Version) -> ArchSpec:
    return ArchSpec.from_json(version.spec)


# The config files a version may carry that tell recipes the model's facts (head_dim), in
# the order they are read; bigger ones are not configs.
CONFIG_FILES = ("config.json", "params.json")
MAX_CONFIG_BYTES = 1024 * 1024


def version_params(session: Session, blobs: BlobStore | None, version: Version) -> dict[str, int]:
    """What the version's ``config.json`` (transformers) or ``params.json`` (Meta) says
    about the model, for recipes that need it; {} without files (or a store to read)."""
    if blobs is None:
        return {}
    files = {f.path: f for f in repo.version_files(session, version)}
    found: dict[str, int] = {}
    for path in CONFIG_FILES:
        entry = files.get(path)
        if entry is None or entry.size > MAX_CONFIG_BYTES:
            continue
        try:
            config = json.loads(blobs.read_range(entry.sha256, 0, entry.size))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue  # not a config statehub can read: the policy must say
        if isinstance(config, dict):
            found = params_from_config(config) | found
    return found


def applicable_adapters(
    session: Session,
    *,
    model: str,
    source: ArchSpec,
    target: ArchSpec,
    policy: Policy,
    version_facts: Callable[[], Mapping[str, int]] = dict,
) -> list[tuple[dict[str, Any], AdapterSpec]]:
    """Adapters whose scope matches, plus unscoped ones the policy names explicitly, and
    the built-in recipes whose layout signature matches (unless the policy turns them
    off) or that the policy names. A recipe that needs model facts takes them from the
    policy's ``params``, else from ``version_facts()`` (read only then)."""
    chosen = []
    latest = repo.latest_adapters(session)
    recipes = builtin_recipes()
    unknown = set(policy.adapters) - {a.name for a in latest} - {r.name for r in recipes}
    if unknown:
        raise InvalidRequest(
            f"unknown adapter(s) in policy: {sorted(unknown)} (built-in recipes: "
            f"{', '.join(r.name for r in recipes)})"
        )
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
    facts: dict[str, int] | None = None
    for recipe in matching_recipes(recipes, source, target, policy.adapters):
        if not (policy.builtin or recipe.name in policy.adapters):
            continue
        if not recipe.params:
            chosen.append((recipe.meta, recipe.adapter))
            continue
        if facts is None:
            facts = dict(version_facts()) | dict(policy.target_facts) | dict(policy.params)
        used = {p: facts[p] for p in recipe.params if p in facts}
        # The plan records the facts the recipe was filled with, beside its name and version.
        chosen.append((recipe.meta | {"params": used}, recipe.adapter_for(facts)))
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
    blobs: BlobStore | None = None,
) -> Plan:
    """The plan; ``blobs`` lets recipes read model facts from the version's config files."""
    source = source_spec(version)
    model = f"{version.model.namespace}/{version.model.name}"
    adapters = applicable_adapters(
        session,
        model=model,
        source=source,
        target=target,
        policy=policy,
        version_facts=lambda: version_params(session, blobs, version),
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
    blobs: BlobStore | None = None,
) -> tuple[Version, Plan]:
    version = repo.resolve_version(session, repo.get_model(session, name), ref)
    return version, plan_for(
        session, version, target, policy, adapter_limits(settings), blobs=blobs
    )


# -- fetch ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FetchLayout:
    segments: tuple[Segment, ...]
    mode: str  # passthrough | rewrite | transform
    etag: str
    plan: Plan
    plan_id: str  # sha256 of the plan's canonical JSON, serialized once per request
    # Bytes of the body made from nothing: fills, and the rows a pad adds.
    synthesized: int = 0

    @property
    def length(self) -> int:
        return sum(s.length for s in self.segments)


def layout_fetch(version: Version, plan: Plan, target: ArchSpec, settings: Settings) -> FetchLayout:
    # The body names its source version (``statehub.source``): two versions with the same
    # bytes make different bodies, so the version is part of the ETag.
    # A plan of 10,000 entries is megabytes of JSON: serialized once, for the ETag, the
    # plan id and the header's metadata.
    plan_json = plan.canonical_json()
    plan_id = hashlib.sha256(plan_json.encode()).hexdigest()
    metadata = _fetch_metadata(version, plan, plan_json)
    etag = hashlib.sha256(
        f"{version.digest}{plan_json}{metadata['statehub.source']}{BODY_LAYOUT}".encode()
    ).hexdigest()
    if plan.verdict == "exact":
        return FetchLayout((StoredRange(0, version.size),), "passthrough", etag, plan, plan_id)
    offsets = {t["key"]: t["offsets"] for t in version.spec["tensors"]}
    source = source_spec(version)
    # Tensors go in the order they are stored (fills last), whatever the target's order:
    # the header says where each is, and the stored bytes are then read front to back as a
    # few large ranges (a target in another order would make a read per tensor).
    loaded = sorted(
        plan.loaded,
        key=lambda e: (e.source is None, min((offsets[k][0] for k in e.inputs), default=0)),
    )
    _check_expansion(version, [target[e.target] for e in loaded], settings)
    synthesized = 0
    header = build_header([target[e.target] for e in loaded], metadata)
    segments: list[Segment] = [HeaderBytes(header)]
    for entry in loaded:
        target_tensor = target[entry.target]
        if entry.action == "copy":
            assert entry.source is not None
            begin, end = offsets[entry.source]
            append_stored(segments, version.data_start + begin, version.data_start + end)
            continue
        stored = [(source[k], version.data_start + offsets[k][0]) for k in entry.inputs]
        if (pieces := layout_rules.stored_pieces(entry.ops, stored)) is not None:
            for begin, end in pieces:  # bytes as stored: no decode, no size limit
                append_stored(segments, begin, end)
            continue
        if target_tensor.nbytes > settings.max_transform_tensor_bytes:
            raise TooLarge(
                f"tensor {entry.target!r} needs {target_tensor.nbytes} bytes to transform "
                f"({', '.join(op['op'] for op in entry.ops)}); the limit is "
                f"{settings.max_transform_tensor_bytes} (STATEHUB_MAX_TRANSFORM_TENSOR_BYTES)",
                detail={
                    "limit": "max_transform_tensor_bytes",
                    "max_bytes": settings.max_transform_tensor_bytes,
                    "bytes": target_tensor.nbytes,
                },
            )
        start = version.data_start + offsets[entry.source][0] if entry.source else 0
        spec = source[entry.source] if entry.source else None
        more = tuple(
            (source[key], version.data_start + offsets[key][0]) for key in entry.inputs[1:]
        )
        segment = Transformed(entry, spec, start, target_tensor, more)
        if more and (hull := segment.input_span[1] - segment.input_span[0]) > (
            settings.max_transform_tensor_bytes
        ):
            raise TooLarge(
                f"tensor {entry.target!r} joins checkpoint tensors {hull} bytes apart; the "
                f"limit is {settings.max_transform_tensor_bytes} (STATEHUB_MAX_TRANSFORM_"
                "TENSOR_BYTES): the pieces must lie closer together in the stored file"
            )
        segments.append(segment)
        synthesized += _synthesized_bytes(entry.ops, spec, target_tensor)
    mode = "transform" if any(isinstance(s, Transformed) for s in segments) else "rewrite"
    return FetchLayout(tuple(segments), mode, etag, plan, plan_id, synthesized)


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


def _fetch_metadata(version: Version, plan: Plan, plan_json: str) -> dict[str, str]:
    model = version.model
    return {
        "format": "pt",
        "statehub.source": f"{model.namespace}/{model.name}:{version.number}",
        "statehub.digest": version.digest,
        "statehub.plan": plan_json,
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
    layout: FetchLayout,
    blobs: ByteSource,
    digest: str,
    *,
    start: int,
    end: int,
    chunk: int,
    gap: int = 1024 * 1024,
    part: int = 8 * 1024 * 1024,
    in_flight: int = 4,
    in_parts: bool = False,
) -> Iterator[bytes | memoryview]:
    """The bytes [start, end) of the fetch body, in body order.

    A passthrough body is one ``iter_range`` of the stored bytes (a ``VerifiedBlob`` then
    hashes the whole blob while it streams), unless ``in_parts`` (the client checks the
    body's digest itself). Any other body, and a passthrough in parts, is served from
    ``layout.read_plan``: the stored bytes it needs are read as a few large ranges, up to
    ``in_flight`` at once (``PartReader``), and each slice is cut from them. On a store
    where one stream is slow (S3: tens of MB/s per connection) parts in flight add up.
    """
    if layout.mode == "passthrough" and not in_parts:
        stream = blobs.iter_range(digest, start, end, chunk)
        try:
            for data in stream:
                metrics.BYTES_FETCHED.inc(amount=len(data))
                yield data
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        return
    plan = layout_rules.read_plan(layout.segments, start, end, gap=gap, part=part)
    reader = PartReader(blobs, digest, plan.reads, in_flight)
    # Reads below the next slice's first read are no longer needed once a slice is done
    # (first reads never decrease along the body: ``read_plan`` starts a new run instead).
    keep_from = [len(plan.reads)] * len(plan.slices)
    lowest = len(plan.reads)
    for index in range(len(plan.slices) - 1, -1, -1):
        keep_from[index] = lowest
        if plan.slices[index].first_read >= 0:
            lowest = plan.slices[index].first_read
    try:
        for piece, keep in zip(plan.slices, keep_from, strict=True):
            segment = piece.segment
            if isinstance(segment, HeaderBytes):
                yield segment.data[piece.lo : piece.hi]
            elif isinstance(segment, StoredRange):
                yield from reader.chunks(piece, chunk, keep)
            elif (element := _constant_element(segment)) is not None:
                yield from _repeat(element, piece.lo, piece.hi, chunk)
            elif segment.elementwise:
                yield from transform_elementwise(
                    segment, piece.lo, piece.hi, reader.chunks(piece, chunk, keep), chunk
                )
            else:
                out = transform(segment, reader.gather(piece))
                reader.release(keep)
                yield from _pieces(out[piece.lo : piece.hi], chunk)
            reader.release(keep)
            metrics.BYTES_FETCHED.inc(amount=piece.length)
    finally:
        reader.close()


def _pieces(view: memoryview, chunk: int) -> Iterator[memoryview]:
    for offset in range(0, len(view), chunk):
        yield view[offset : offset + chunk]


class PartReader:
    """The reads of a ``ReadPlan``, each one ``read_range``, fetched ahead by a bounded
    thread pool: while one part is sent the next ``in_flight - 1`` are on their way.
    Memory: about ``in_flight`` parts, plus the parts of the tensor being transformed."""

    def __init__(
        self, blobs: ByteSource, digest: str, reads: Sequence[layout_rules.Read], in_flight: int
    ) -> None:
        self._blobs = blobs
        self._digest = digest
        self._reads = reads
        self._in_flight = max(1, in_flight)
        self._pool: ThreadPoolExecutor | None = None
        self._parts: dict[int, Future[memoryview]] = {}
        self._submitted = 0  # reads [0, submitted) were asked for
        self._released = 0  # reads below this were dropped

    def _read(self, index: int) -> memoryview:
        """One ranged read streamed into an anonymous map of its own: writable, so a tensor
        decodes from it without a copy, and unmapped as soon as its last view goes."""
        read = self._reads[index]
        buffer = memoryview(mmap.mmap(-1, read.length))
        filled = 0
        stream = self._blobs.iter_range(self._digest, read.start, read.end, _PART_CHUNK)
        with contextlib.closing(stream):  # type: ignore[type-var]
            for piece in stream:
                if filled + len(piece) > read.length:
                    break
                buffer[filled : filled + len(piece)] = piece
                filled += len(piece)
        if filled != read.length:
            raise StorageError(f"blob {self._digest} ended before byte {read.end}")
        return buffer

    def part(self, index: int) -> memoryview:
        """Read ``index``'s bytes, once it has arrived; later reads are asked for."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._in_flight, thread_name_prefix="fetch-read")
        ahead = min(index + self._in_flight, len(self._reads))
        while self._submitted < max(ahead, index + 1):
            self._parts[self._submitted] = self._pool.submit(self._read, self._submitted)
            self._submitted += 1
        return self._parts[index].result()

    def chunks(self, piece: layout_rules.Slice, chunk: int, keep: int) -> Iterator[memoryview]:
        """The stored bytes of ``piece``, part by part (parts it is done with are dropped)."""
        span = piece.span
        assert span is not None
        for index in range(piece.first_read, piece.last_read + 1):
            read = self._reads[index]
            lo, hi = max(span[0], read.start), min(span[1], read.end)
            yield from _pieces(self.part(index)[lo - read.start : hi - read.start], chunk)
            self.release(min(index + 1, keep))

    def gather(self, piece: layout_rules.Slice) -> bytearray | memoryview:
        """The whole source tensor of a transformed slice: a view of its part when it lies
        in one, else a buffer of its own."""
        span = piece.span
        if span is None:
            return bytearray()
        if piece.first_read == piece.last_read:
            read = self._reads[piece.first_read]
            return self.part(piece.first_read)[span[0] - read.start : span[1] - read.start]
        out = bytearray(span[1] - span[0])
        for index in range(piece.first_read, piece.last_read + 1):
            read = self._reads[index]
            lo, hi = max(span[0], read.start), min(span[1], read.end)
            out[lo - span[0] : hi - span[0]] = self.part(index)[lo - read.start : hi - read.start]
        return out

    def release(self, below: int) -> None:
        """Drop the parts of reads before ``below``."""
        while self._released < min(below, self._submitted):
            future = self._parts.pop(self._released, None)
            if future is not None:
                future.cancel()
            self._released += 1

    def close(self) -> None:
        for future in self._parts.values():
            future.cancel()
        self._parts.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def stream_fetch(
    result: FetchResult, blobs: ByteSource, *, chunk: int, in_parts: bool = False
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
            gap=result.read_gap,
            part=result.read_part,
            in_flight=result.reads_in_flight,
            in_parts=in_parts,
        )
    except StorageError as exc:
        metrics.STORAGE_ERRORS.inc(exc.code)
        raise
    finally:
        metrics.FETCHES_IN_FLIGHT.dec()


def transform(segment: Transformed, raw: bytearray | memoryview) -> memoryview:
    """Decode the source tensor(s) from their stored bytes, apply the ops, return the
    target's raw bytes."""
    metrics.TENSORS_DECODED.inc()
    if segment.more:  # several inputs within ``raw``, which starts at the first of them
        base = segment.input_span[0]
        inputs = [decode(raw[at - base : at - base + t.nbytes], t) for t, at in segment.inputs]
        result = ops.apply_inputs(segment.entry.ops, inputs)
    else:
        tensor = decode(raw, segment.source) if segment.source is not None else None
        result = ops.apply_chain(segment.entry.ops, tensor)
    target = segment.target
    if tuple(result.shape) != target.shape or ops.dtype_code(result.dtype) != target.dtype:
        raise StorageError(  # the planner's inference and the ops disagree: never serve it
            f"transform of {target.key!r} produced {list(result.shape)} "
            f"{ops.dtype_code(result.dtype)}, expected {list(target.shape)} {target.dtype}"
        )
    return tensor_bytes(result)  # a view of the result: no copy on the way out


def transform_elementwise(
    segment: Transformed,
    lo: int,
    hi: int,
    source: Iterator[memoryview],
    chunk: int,
) -> Iterator[memoryview]:
    """Target bytes ``[lo, hi)`` of an elementwise segment (a cast, say), computed from the
    source bytes of the elements they cover (``source``, in order) a piece at a time: the
    server holds a piece and its cast, never the whole tensor and its copy."""
    assert segment.source is not None
    metrics.TENSORS_DECODED.inc()
    source_dtype = ops.TORCH_DTYPES[segment.source.dtype]
    source_size = DTYPE_SIZES[segment.source.dtype]
    casts = [op for op in segment.entry.ops if op.get("op") == "cast"]  # reshapes move nothing
    first, _ = segment.elements(lo, hi)
    skip = lo - first * DTYPE_SIZES[segment.target.dtype]  # bytes of the first element before lo
    remaining = hi - lo
    carry = bytearray()  # a source element split between two pieces
    for data in source:
        if carry:
            carry += data
            data, carry = memoryview(carry), bytearray()
        whole = len(data) - len(data) % source_size
        carry = bytearray(data[whole:])
        if whole == 0 or remaining == 0:
            continue
        result = ops.apply_chain(casts, torch.frombuffer(data[:whole], dtype=source_dtype))
        out = tensor_bytes(result)[skip : skip + remaining]
        skip = 0
        remaining -= len(out)
        yield from _pieces(out, chunk)
    if remaining or carry:
        raise StorageError(  # the layout and the stored bytes disagree: never serve it
            f"elementwise transform of {segment.target.key!r} ran out of source bytes"
        )


def decode(raw: bytearray | memoryview, spec: TensorSpec) -> torch.Tensor:
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
    # The client holds this body already (``If-None-Match`` named its ETag): send none.
    not_modified: bool = False
    # How the body's stored bytes are read (``iter_layout``; the fetch_read_* settings).
    read_gap: int = 1024 * 1024
    read_part: int = 8 * 1024 * 1024
    reads_in_flight: int = 4


@dataclass(frozen=True)
class FetchRequest:
    """What a fetch asks: the version and target, the policy, and its HTTP conditions."""

    name: ModelName
    ref: VersionRef
    target: ArchSpec
    policy: Policy
    range_header: str | None = None
    if_range: str | None = None
    if_none_match: str | None = None


def prepare_fetch(
    *, session: Session, blobs: BlobStore, settings: Settings, request: FetchRequest
) -> FetchResult:
    """Plan, refuse what the policy forbids, lay out the body and resolve the range; a
    body the client already holds (``If-None-Match``) is not modified, and no store is read."""
    name, if_range, if_none_match = request.name, request.if_range, request.if_none_match
    version, plan = plan_version(
        session=session,
        name=name,
        ref=request.ref,
        target=request.target,
        policy=request.policy,
        settings=settings,
        blobs=blobs,
    )
    if plan.verdict == "incompatible":
        raise Incompatible(
            "the checkpoint cannot be fitted to the target under this policy: "
            + "; ".join(plan.reasons[:5]),
            detail={"plan": plan.to_json()},
        )
    layout = layout_fetch(version, plan, request.target, settings)
    total = layout.length
    if layout_rules.etag_matches(if_none_match, layout.etag):
        return FetchResult(version, layout, 0, total, partial=False, not_modified=True)
    if version.extents is None and blobs.size(version.digest) != version.size:
        raise StorageError(f"stored blob {version.digest} has the wrong size")
    wanted = request.range_header if layout_rules.range_applies(if_range, layout.etag) else None
    byte_range = parse_range(wanted, total)
    start, end = byte_range or (0, total)
    log.debug(
        "fetch of %s:%s laid out",
        name,
        version.number,
        extra={"verdict": plan.verdict, "mode": layout.mode, "bytes": end - start},
    )
    return FetchResult(
        version,
        layout,
        start,
        end,
        partial=byte_range is not None,
        read_gap=settings.fetch_read_gap,
        read_part=settings.fetch_read_part,
        reads_in_flight=settings.fetch_reads_in_flight,
    )


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
        except (InvalidAdapter, RecipeParamsMissing) as exc:
            # A recipe's model facts come from the policy here (no config file is read
            # for each candidate); the version's own plan reads them.
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
