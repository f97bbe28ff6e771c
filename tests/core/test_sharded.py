"""Sharded safetensors uploads: tar members, the index, the merge order (pure)."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import torch
from safetensors.torch import save as st_save

from service.core.safetensors_format import Limits, parse_header, read_header_length
from service.core.sharded import (
    TarMember,
    common_metadata,
    find_index,
    is_tar,
    merge_order,
    parse_index,
    read_tar_members,
    safe_member_name,
)
from service.errors import InvalidCheckpoint, TooLarge

LIMITS = Limits()


def tar_of(files: dict[str, bytes], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def members_of(data: bytes, **kwargs: int) -> list[TarMember]:
    return read_tar_members(lambda offset, size: data[offset : offset + size], len(data), **kwargs)


LONG = "very/" * 30 + "deep.safetensors"  # beyond ustar's 100 + 155 name bytes


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_members_and_their_bytes(fmt: int) -> None:
    files = {"./a.json": b"{}", "dir/b.safetensors": b"x" * 1000, "c": b""}
    if fmt != tarfile.USTAR_FORMAT:
        files[LONG] = b"long name"
    data = tar_of(files, fmt)
    assert is_tar(data)
    members = members_of(data)
    assert [m.name for m in members] == [safe_member_name(n) for n in files]
    for member, content in zip(members, files.values(), strict=True):
        assert data[member.offset : member.offset + member.size] == content


@pytest.mark.parametrize("name", ["../evil.safetensors", "a/../../evil", "/etc/passwd", "a\\b"])
def test_names_that_leave_the_archive_are_refused(name: str) -> None:
    with pytest.raises(InvalidCheckpoint):
        members_of(tar_of({name: b"x"}, tarfile.GNU_FORMAT))


def test_links_and_devices_are_refused() -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        link = tarfile.TarInfo("model.safetensors")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        archive.addfile(link)
    with pytest.raises(InvalidCheckpoint, match="only regular files"):
        members_of(buffer.getvalue())


def test_damage_is_detected() -> None:
    data = bytearray(tar_of({"a.json": b"{}"}))
    data[10] ^= 0x01  # inside the first header: its checksum no longer matches
    with pytest.raises(InvalidCheckpoint, match="checksum"):
        members_of(bytes(data))
    whole = tar_of({"a.json": b"x" * 2000})
    with pytest.raises(InvalidCheckpoint, match="truncated"):
        members_of(whole[:1000])


def test_member_count_is_bounded() -> None:
    data = tar_of({f"f{i}": b"" for i in range(11)})
    with pytest.raises(TooLarge):
        members_of(data, max_members=10)


def shard(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    return st_save(tensors, metadata=metadata)


def header_of(data: bytes):  # type: ignore[no-untyped-def]
    length = read_header_length(data[:8], file_size=len(data), limits=LIMITS)
    return parse_header(data[8 : 8 + length], file_size=len(data), limits=LIMITS)


def index_json(weight_map: dict[str, str]) -> bytes:
    return json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}).encode()


def test_the_merge_lays_the_shards_out_one_after_another_as_they_lie() -> None:
    index = parse_index(
        "repo/model.safetensors.index.json",
        index_json({"a": "m-2.safetensors", "b": "m-1.safetensors", "c": "m-1.safetensors"}),
        limits=LIMITS,
    )
    assert index.shards == ["repo/m-2.safetensors", "repo/m-1.safetensors"]
    one = header_of(shard({"c": torch.ones(2, dtype=torch.float64), "b": torch.ones(3)}))
    headers = {
        "repo/m-2.safetensors": header_of(shard({"a": torch.ones(1)})),
        "repo/m-1.safetensors": one,
    }
    assert [t.key for t in one.tensors] == ["c", "b"]  # safetensors: wider dtypes first
    merged = merge_order(index, headers)
    # m-1 before m-2 (names, not the index's first mention), each shard in its byte order:
    # a version composed of them reads each shard as one run.
    assert [(k, s) for k, s, _ in merged] == [
        ("c", "repo/m-1.safetensors"),
        ("b", "repo/m-1.safetensors"),
        ("a", "repo/m-2.safetensors"),
    ]
    assert [stored.begin for _, s, stored in merged if s.endswith("m-1.safetensors")] == [0, 16]


def test_index_and_shards_must_agree() -> None:
    index = parse_index(
        "i.safetensors.index.json", index_json({"a": "s.safetensors"}), limits=LIMITS
    )
    with pytest.raises(InvalidCheckpoint, match="does not hold it"):
        merge_order(index, {"s.safetensors": header_of(shard({"b": torch.ones(1)}))})
    both = header_of(shard({"a": torch.ones(1), "extra": torch.ones(1)}))
    with pytest.raises(InvalidCheckpoint, match="does not put there"):
        merge_order(index, {"s.safetensors": both})


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[]",
        b'{"weight_map": {}}',
        b'{"weight_map": {"a": "../up.safetensors"}}',
        b'{"weight_map": {"a": "s.bin"}}',
        b'{"weight_map": {"a": "s.safetensors"}, "metadata": {"x": NaN}}',
    ],
)
def test_bad_indexes_are_refused(raw: bytes) -> None:
    with pytest.raises(InvalidCheckpoint):
        parse_index("model.safetensors.index.json", raw, limits=LIMITS)


def test_exactly_one_index() -> None:
    with pytest.raises(InvalidCheckpoint, match="no"):
        find_index([TarMember("a.safetensors", 0, 1)])
    two = [TarMember("a.safetensors.index.json", 0, 1), TarMember("b.safetensors.index.json", 0, 1)]
    with pytest.raises(InvalidCheckpoint, match="more than one"):
        find_index(two)


def test_common_metadata_keeps_what_every_shard_says() -> None:
    headers = [
        header_of(shard({"a": torch.ones(1)}, {"format": "pt", "shard": "1"})),
        header_of(shard({"b": torch.ones(1)}, {"format": "pt", "shard": "2"})),
    ]
    assert common_metadata(headers) == {"format": "pt"}
