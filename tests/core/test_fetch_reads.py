"""The fetch layout and its reads executed against a real LocalBlobStore (no mocks).

``service.fitting.layout_fetch`` lays out a body, ``iter_layout`` serves it from
``core.layout.read_plan``'s coalesced reads through a bounded pool. Every body here is loaded
with safetensors and compared value by value; every store read is counted by a thin
subclass of the real store.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from service.core.plan import Policy
from service.core.planner import plan as make_plan
from service.core.safetensors_format import Limits, parse_header, read_header_length
from service.core.spec import ArchSpec
from service.errors import StorageError
from service.fitting import FetchLayout, iter_layout, layout_fetch, source_spec
from service.integrity import BlobCorrupted, VerifiedBlob
from service.settings import Settings
from service.storage.blobs import LocalBlobStore
from service.storage.composed import STREAM_WINDOW, ComposedBlob, Extent
from service.storage.models import Model, Version
from tests._shapes import resnet50_like, spec_json

KiB = 1024


class CountingStore(LocalBlobStore):
    """The real local store, recording every read it is asked for (``read_range`` in
    ``reads``, ``iter_range`` in ``streams``) and how many streams overlap."""

    def __init__(self, root: Path, *, delay: float = 0.0) -> None:
        super().__init__(root)
        self.reads: list[tuple[int, int]] = []
        self.streams: list[tuple[int, int]] = []
        self.delay = delay  # per read: makes overlapping reads observable
        self.active = self.most_active = 0
        self._lock = threading.Lock()

    def read_range(self, digest: str, start: int, end: int) -> bytes:
        with self._lock:
            self.reads.append((start, end))
        return super().read_range(digest, start, end)

    def iter_range(self, digest: str, start: int, end: int, chunk_size: int) -> Any:
        with self._lock:
            self.streams.append((start, end))
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        if self.delay:
            time.sleep(self.delay)
        stream = super().iter_range(digest, start, end, chunk_size)

        def counted() -> Any:
            try:
                yield from stream
            finally:
                stream.close()
                with self._lock:
                    self.active -= 1

        return counted()

    @property
    def requests(self) -> int:
        return len(self.reads) + len(self.streams)


def stored_version(store: LocalBlobStore, tmp_path: Path, sd: dict[str, torch.Tensor]) -> Version:
    """``sd`` saved as safetensors into ``store``, described as the registry would."""
    raw = st_save(sd)
    digest = hashlib.sha256(raw).hexdigest()
    path = tmp_path / f"{digest}.upload"
    path.write_bytes(raw)
    store.put_file(digest, path)
    path.unlink(missing_ok=True)
    limits = Limits()
    length = read_header_length(raw[:8], file_size=len(raw), limits=limits)
    header = parse_header(raw[8 : 8 + length], file_size=len(raw), limits=limits)
    spec = {
        "tensors": [
            {"key": t.key, "shape": list(t.shape), "dtype": t.dtype, "offsets": [t.begin, t.end]}
            for t in header.tensors
        ],
        "tie_groups": [],
    }
    model = Model(namespace="ns", name="net")
    return Version(
        number=1,
        digest=digest,
        size=len(raw),
        data_start=header.data_start,
        spec=spec,
        model=model,
    )


def lay_out(version: Version, target: dict[str, object], **policy: Any) -> FetchLayout:
    target_spec = ArchSpec.from_json(target)
    plan = make_plan(source_spec(version), target_spec, policy=Policy(**policy))
    assert plan.verdict != "incompatible", plan.reasons
    return layout_fetch(version, plan, target_spec, Settings())


def body(
    layout: FetchLayout,
    source: Any,
    digest: str,
    start: int = 0,
    end: int | None = None,
    *,
    part: int = 64 * KiB,
    gap: int = 4 * KiB,
    in_flight: int = 4,
    chunk: int = 16 * KiB,
    in_parts: bool = False,
) -> bytes:
    end = layout.length if end is None else end
    pieces = iter_layout(
        layout,
        source,
        digest,
        start=start,
        end=end,
        chunk=chunk,
        gap=gap,
        part=part,
        in_flight=in_flight,
        in_parts=in_parts,
    )
    out = b"".join(bytes(p) for p in pieces)
    assert len(out) == end - start
    return out


def assert_tensors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(expected)
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype, key
        assert torch.equal(got[key], tensor), key


def data_bytes(version: Version) -> int:
    return version.size - version.data_start


@pytest.fixture
def store(tmp_path: Path) -> CountingStore:
    return CountingStore(tmp_path / "blobs")


# -- a checkpoint shaped like a real one ------------------------------------------------


def test_a_rename_only_fetch_of_320_tensors_reads_a_part_at_a_time(
    store: CountingStore, tmp_path: Path
) -> None:
    source = {f"module.{k}": v for k, v in resnet50_like(width=16).items()}
    version = stored_version(store, tmp_path, source)
    target = resnet50_like(width=16, seed=1)  # same shapes, the model's own order
    stored_order = [t["key"] for t in version.spec["tensors"]]
    assert stored_order != [f"module.{k}" for k in target]  # safetensors sorts: not body order
    layout = lay_out(version, spec_json(target))
    assert layout.mode == "rewrite"
    part = 256 * KiB

    got = st_load(body(layout, store, version.digest, part=part))

    assert_tensors(got, {k.removeprefix("module."): v for k, v in source.items()})
    assert data_bytes(version) > 8 * part  # several parts, so the bound below means something
    bound = math.ceil(data_bytes(version) / part) + 2
    assert store.requests <= bound, (store.requests, bound)
    # The stored bytes were read once each: nothing twice, nothing but the data.
    assert sum(e - s for s, e in store.streams) == data_bytes(version)


def test_a_head_reset_and_cast_fetch_decodes_from_the_parts_read(
    store: CountingStore, tmp_path: Path
) -> None:
    source = resnet50_like(width=16, dtype=torch.float16)
    version = stored_version(store, tmp_path, source)
    target = resnet50_like(width=16, classes=30)  # fp32, another head
    layout = lay_out(version, spec_json(target))
    assert layout.mode == "transform"
    part = 256 * KiB

    raw = body(layout, store, version.digest, part=part)
    got = st_load(raw)

    expected = {k: v.float() if v.is_floating_point() else v for k, v in source.items()}
    del expected["fc.weight"], expected["fc.bias"]  # the target keeps its own head
    assert_tensors(got, expected)
    # int64 counters are copied between the casts: a transform next to copies.
    assert got["bn1.num_batches_tracked"].dtype == torch.int64
    assert store.requests <= math.ceil(data_bytes(version) / part) + 2


def test_reads_overlap_up_to_in_flight_and_no_further(store: CountingStore, tmp_path: Path) -> None:
    version = stored_version(store, tmp_path, resnet50_like(width=16))
    layout = lay_out(version, spec_json({f"m.{k}": v for k, v in resnet50_like(width=16).items()}))
    store.delay = 0.02
    pieces = iter_layout(
        layout,
        store,
        version.digest,
        start=0,
        end=layout.length,
        chunk=16 * KiB,
        gap=4 * KiB,
        part=64 * KiB,
        in_flight=3,
    )
    next(pieces)  # the header
    next(pieces)  # the first stored bytes: the pool has started
    asked_early = len(store.streams)
    rest = b"".join(bytes(p) for p in pieces)

    assert rest
    assert 2 <= store.most_active <= 3
    # Bounded read-ahead: one part handed out, at most in_flight asked for.
    assert asked_early <= 3 < len(store.streams)


# -- ranges, resumes, edges -------------------------------------------------------------


def small_checkpoint() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return {
        "a.weight": torch.randn(64, 32, generator=generator).half(),  # 4 KiB
        "a.empty": torch.zeros(0, 8).half(),
        "a.count": torch.tensor(5, dtype=torch.int64),
        "b.weight": torch.randn(48, 32, generator=generator).half(),  # 3 KiB
        "z.last": torch.randn(100, generator=generator).half(),
        "z.zero": torch.zeros(0).half(),
    }


@pytest.fixture
def mixed(store: CountingStore, tmp_path: Path) -> tuple[Version, FetchLayout]:
    """Casts of some tensors (a.*), copies of others (b.*, the counter), empty tensors, and
    the last stored tensor cast at the body's very end."""
    sd = small_checkpoint()
    version = stored_version(store, tmp_path, sd)
    target = {
        "tensors": [
            {"key": "a.weight", "shape": [64, 32], "dtype": "F32"},
            {"key": "a.empty", "shape": [0, 8], "dtype": "F32"},
            {"key": "a.count", "shape": [], "dtype": "I64"},
            {"key": "b.weight", "shape": [48, 32], "dtype": "F16"},
            {"key": "z.last", "shape": [100], "dtype": "F32"},
            {"key": "z.zero", "shape": [0], "dtype": "F16"},
        ],
        "tie_groups": [],
    }
    layout = lay_out(version, target)
    assert layout.mode == "transform"
    return version, layout


def expected_mixed() -> dict[str, torch.Tensor]:
    sd = small_checkpoint()
    return {
        "a.weight": sd["a.weight"].float(),
        "a.empty": sd["a.empty"].float(),
        "a.count": sd["a.count"],
        "b.weight": sd["b.weight"],
        "z.last": sd["z.last"].float(),
        "z.zero": sd["z.zero"],
    }


@pytest.mark.parametrize("part", [1000, 4096, 1 << 20])  # 1000: boundaries inside tensors
def test_empty_tensors_a_tensor_at_the_end_and_parts_cut_inside_tensors(
    store: CountingStore, mixed: tuple[Version, FetchLayout], part: int
) -> None:
    version, layout = mixed
    got = st_load(body(layout, store, version.digest, part=part, gap=0, chunk=777))
    assert_tensors(got, expected_mixed())
    assert store.requests <= math.ceil(data_bytes(version) / part) + 2


def test_every_range_is_the_same_bytes_as_the_whole_body(
    store: CountingStore, mixed: tuple[Version, FetchLayout]
) -> None:
    version, layout = mixed
    whole = body(layout, store, version.digest, part=1000, gap=0)
    header = int.from_bytes(whole[:8], "little") + 8
    total = layout.length
    starts = [1, 7, header - 1, header, header + 1, header + 4095, header + 8191, total - 1]
    ends = [header + 3, header + 8192 + 5, total - 200, total]
    for start in starts:
        for end in ends:
            if end > start:
                got = body(layout, store, version.digest, start, end, part=1000, gap=0)
                assert got == whole[start:end], (start, end)


def test_a_resumed_fetch_completes_the_body(
    store: CountingStore, mixed: tuple[Version, FetchLayout]
) -> None:
    version, layout = mixed
    whole = body(layout, store, version.digest, part=1000)
    for cut in (100, layout.length // 2, layout.length - 3):
        resumed = body(layout, store, version.digest, 0, cut, part=1000) + body(
            layout, store, version.digest, cut, layout.length, part=1000
        )
        assert resumed == whole
    assert_tensors(st_load(whole), expected_mixed())


def test_a_range_inside_one_tensor_reads_only_its_part(
    store: CountingStore, mixed: tuple[Version, FetchLayout]
) -> None:
    version, layout = mixed
    header = len(layout.segments[0].data)  # type: ignore[union-attr]
    # The body's copied b.weight follows a.weight (8 KiB as fp32) and a.count (8 bytes).
    start = header + 8192 + 8 + 100
    body(layout, store, version.digest, start, start + 50, part=1000, gap=0)
    assert len(store.streams) == 1 and store.streams[0][1] - store.streams[0][0] == 50


def test_a_passthrough_is_one_stream_of_the_range(store: CountingStore, tmp_path: Path) -> None:
    sd = resnet50_like(width=8)
    version = stored_version(store, tmp_path, sd)
    layout = lay_out(version, spec_json(sd))
    assert layout.mode == "passthrough"
    raw = body(layout, store, version.digest, 10, version.size, part=1000)
    assert store.streams == [(10, version.size)] and store.reads == []
    assert raw == store.read_range(version.digest, 10, version.size)


def test_a_passthrough_for_a_client_that_verifies_is_read_as_parts_in_flight(
    store: CountingStore, tmp_path: Path
) -> None:
    sd = resnet50_like(width=8)
    version = stored_version(store, tmp_path, sd)
    layout = lay_out(version, spec_json(sd))
    part = 64 * KiB
    raw = body(layout, store, version.digest, 10, version.size, part=part, in_parts=True)
    assert raw == store.read_range(version.digest, 10, version.size)
    store.reads.pop()  # the comparison's own read
    covered = sorted(store.reads + store.streams)  # parts, however the reader asks for them
    assert covered[0][0] == 10 and covered[-1][1] == version.size
    assert all(a[1] == b[0] for a, b in itertools.pairwise(covered))  # each byte read once
    assert len(covered) == math.ceil((version.size - 10) / part)
    assert max(hi - lo for lo, hi in covered) <= part


# -- failures -------------------------------------------------------------------------------


def test_a_transforming_fetch_of_a_corrupted_blob_is_refused_before_a_byte(
    store: CountingStore, mixed: tuple[Version, FetchLayout]
) -> None:
    version, layout = mixed
    # Intact: the small blob is read whole once and checked, and the body served from it.
    verified = VerifiedBlob(
        store, version.digest, version.size, buffer_limit=1 << 20, whole_in_order=False
    )
    assert_tensors(st_load(body(layout, verified, version.digest, part=1000)), expected_mixed())
    assert store.reads == [(0, version.size)] and store.streams == []
    path = next(p for p in (store.root).rglob(version.digest))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    with pytest.raises(BlobCorrupted):
        VerifiedBlob(
            store, version.digest, version.size, buffer_limit=1 << 20, whole_in_order=False
        )


def test_a_blob_cut_short_is_a_storage_error_not_a_short_body(
    store: CountingStore, mixed: tuple[Version, FetchLayout]
) -> None:
    version, layout = mixed
    path = next(p for p in (store.root).rglob(version.digest))
    path.chmod(0o644)
    path.write_bytes(path.read_bytes()[:-150])
    with pytest.raises(StorageError):
        body(layout, store, version.digest, part=1000)


# -- a deduplicated (composed) version --------------------------------------------------------


def test_a_composed_version_is_read_with_a_request_per_blob_not_per_extent(
    store: CountingStore, tmp_path: Path
) -> None:
    """A deduplicated push alternates between its own blob (header, tiny tensors) and the
    blob it shares large tensors with: 80 extents, read as 2 requests."""
    generator = torch.Generator().manual_seed(5)
    shared = bytes(torch.randint(0, 256, (200_000,), generator=generator, dtype=torch.uint8))
    own = bytes(torch.randint(0, 256, (8_000,), generator=generator, dtype=torch.uint8))
    digests = []
    for number, data in enumerate((shared, own)):
        path = tmp_path / f"blob{number}"
        path.write_bytes(data)
        digests.append(hashlib.sha256(data).hexdigest())
        store.put_file(digests[-1], path)
    extents, expected = [], b""
    for i in range(40):  # own 100 bytes, then 2,000 shared bytes 48 bytes past the last
        extents.append(Extent(digests[1], i * 100, i * 100 + 100))
        extents.append(Extent(digests[0], i * 2048, i * 2048 + 2000))
        expected += own[i * 100 : i * 100 + 100] + shared[i * 2048 : i * 2048 + 2000]
    composed = ComposedBlob(store, "composed", extents)

    assert composed.read_range("composed", 0, composed.size) == expected
    assert len(store.reads) == 2
    assert composed.read_range("composed", 150, 5000) == expected[150:5000]
    streamed = b"".join(composed.iter_range("composed", 10, composed.size, 999))
    assert streamed == expected[10:]
    assert store.requests == 6  # two per range asked for


def test_a_folder_version_streams_each_shard_once_and_windows_the_small_pieces(
    store: CountingStore, tmp_path: Path
) -> None:
    """An exact fetch of a sharded folder version streams its logical bytes: a header
    (small, its own blob), then each shard's tensor bytes (a piece of STREAM_WINDOW or more).
    Each large piece is one stream of its shard, whatever the window; before, every 8 MiB
    window was a request of its own (320 for a 2 GiB repository on S3)."""
    generator = torch.Generator().manual_seed(6)
    big = STREAM_WINDOW + 12_345
    datas = [
        bytes(torch.randint(0, 256, (size,), generator=generator, dtype=torch.uint8))
        for size in (big, 2 * big, 3_000, big)
    ]
    digests = []
    for number, data in enumerate(datas):
        path = tmp_path / f"shard{number}"
        path.write_bytes(data)
        digests.append(hashlib.sha256(data).hexdigest())
        store.put_file(digests[-1], path)
    # header piece, shard 0 minus its first 8 bytes, two small pieces, shards 1 and 3 whole
    extents = [
        Extent(digests[2], 0, 1_000),
        Extent(digests[0], 8, big),
        Extent(digests[2], 1_000, 1_500),
        Extent(digests[2], 2_000, 3_000),
        Extent(digests[1], 0, 2 * big),
        Extent(digests[3], 0, big),
    ]
    expected = b"".join(datas[digests.index(e.blob)][e.start : e.end] for e in extents)
    composed = ComposedBlob(store, "composed", extents)

    streamed = b"".join(composed.iter_range("composed", 0, composed.size, 1 << 20))
    assert streamed == expected
    shard_streams = [r for r in store.streams if r[1] - r[0] >= STREAM_WINDOW]
    assert sorted(shard_streams) == sorted([(8, big), (0, 2 * big), (0, big)])
    assert len(store.streams) == 3
    assert len(store.reads) == 2  # the header piece; the two small pieces as one read
    # A range starting inside a shard and ending inside another.
    store.reads.clear()
    store.streams.clear()
    lo, hi = 1_000 + 5_000, composed.size - 77
    assert b"".join(composed.iter_range("composed", lo, hi, 4096)) == expected[lo:hi]
    assert store.requests == 4


def test_a_fetch_dropped_early_stops_reading_and_leaves_no_threads(
    store: CountingStore, tmp_path: Path
) -> None:
    version = stored_version(store, tmp_path, resnet50_like(width=16))
    layout = lay_out(version, spec_json({f"m.{k}": v for k, v in resnet50_like(width=16).items()}))
    pieces = iter_layout(
        layout,
        store,
        version.digest,
        start=0,
        end=layout.length,
        chunk=16 * KiB,
        gap=0,
        part=64 * KiB,
        in_flight=4,
    )
    for _ in range(3):
        next(pieces)
    pieces.close()  # what the server does when the client goes away
    workers = [t for t in threading.enumerate() if t.name.startswith("fetch-read")]
    for worker in workers:
        worker.join(timeout=10)
    assert not [t for t in workers if t.is_alive()]
    total = math.ceil(data_bytes(version) / (64 * KiB))
    assert len(store.streams) <= 4 + 1 < total  # what was in flight, not the whole body
    assert store.active == 0  # every stream it opened was closed
