"""The safetensors container, names and refs, and fingerprints: pure logic, no server."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save as st_save

from service.core.names import ModelName, VersionRef, parse_ref
from service.core.safetensors_format import Limits, build_header, parse_header, read_header_length
from service.core.spec import ArchSpec, TensorSpec, validate_spec
from service.errors import InvalidCheckpoint, InvalidName, InvalidRef, InvalidSpec, TooLarge
from statehub import _tensors as client_tensors

LIMITS = Limits()


def parse(body: bytes, limits: Limits = LIMITS):  # type: ignore[no-untyped-def]
    length = read_header_length(body[:8], file_size=len(body), limits=limits)
    return parse_header(body[8 : 8 + length], file_size=len(body), limits=limits)


def test_header_of_a_safetensors_library_file() -> None:
    tensors = {
        "b": torch.zeros(2, 3),
        "a": torch.ones(4, dtype=torch.float16),
        "s": torch.tensor(1),
    }
    body = st_save(tensors, metadata={"k": "v"})
    header = parse(body)
    assert header.metadata == {"k": "v"}
    assert {t.key: (t.dtype, t.shape) for t in header.tensors} == {
        "b": ("F32", (2, 3)),
        "a": ("F16", (4,)),
        "s": ("I64", ()),
    }
    assert header.total_size == len(body)
    for t in header.tensors:  # offsets point at the right bytes
        raw = body[header.data_start + t.begin : header.data_start + t.end]
        assert raw == tensors[t.key].numpy().tobytes()


def test_build_header_round_trips_in_order() -> None:
    specs = [
        TensorSpec("z", (2,), "F32"),
        TensorSpec("a", (3, 1), "BF16"),
        TensorSpec("e", (0,), "I8"),
    ]
    header = build_header(specs, {"m": "1"})
    assert (len(header) - 8) % 8 == 0
    body = header + b"\0" * 8 + b"\0" * 6
    parsed = parse(body)
    assert [t.key for t in parsed.tensors] == ["z", "a", "e"]
    assert [(t.begin, t.end) for t in parsed.tensors] == [(0, 8), (8, 14), (14, 14)]


def _file(header: dict[str, object], data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize(
    ("header", "data", "fragment"),
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "needs 8 bytes"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "gap"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
            },
            b"\0" * 8,
            "overlaps",
        ),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 6, "trailing"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "truncated"),
        ({"a": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}, b"\0", "unknown dtype"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, b"", "out of range"),
        ({"a": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}, b"\0" * 4, "integers"),
        ({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "exactly"),
        ({"__metadata__": {"x": 1}}, b"", "__metadata__"),
        ({"a": {"dtype": "F32", "shape": [1] * 9, "data_offsets": [0, 4]}}, b"\0" * 4, "at most"),
    ],
)
def test_invalid_headers_are_refused(header: dict[str, object], data: bytes, fragment: str) -> None:
    with pytest.raises(InvalidCheckpoint, match=fragment):
        parse(_file(header, data))


def test_duplicate_keys_and_bounds() -> None:
    entry = b'"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}'
    raw = b"{" + entry + b"," + entry + b"}"
    with pytest.raises(InvalidCheckpoint, match="twice"):
        parse(struct.pack("<Q", len(raw)) + raw + b"\0")
    body = st_save({"a": torch.zeros(1)})
    with pytest.raises(TooLarge):
        parse(body, Limits(max_header_bytes=16))
    many = st_save({f"t{i}": torch.zeros(1) for i in range(5)})
    with pytest.raises(TooLarge):
        parse(many, Limits(max_tensors=4))
    with pytest.raises(InvalidCheckpoint, match="shorter"):
        read_header_length(b"\1\2", file_size=2, limits=LIMITS)
    with pytest.raises(InvalidCheckpoint, match="not a safetensors file"):
        read_header_length(b"hello wo", file_size=100, limits=LIMITS)


# Golden fingerprints, written down once from DESIGN section 4 with coreutils, never with the
# code under test: printf 'a.scale\t\nfc.bias\t10\nfc.weight\t10,4\n' | sha256sum, etc.
# A change of the formula (separator, order, dtype included, scalar spelling) breaks them, and
# with them every stored arch_fp and every adapter scoped by one.
SMALL = [("fc.weight", [10, 4], "F32"), ("a.scale", [], "F16"), ("fc.bias", [10], "F32")]
SMALL_ARCH_FP = "f305115888d6cef161ebb1d4ba7832fbff1a0d8ea153e81a2c6bf88d1b9ba828"
SMALL_SHAPE_FP = "439401c9edbeed57952476fb7d18ec8a31420fbeb3b6d17d164cfa4320293e57"
TIED = [("wte.weight", [32, 8], "F32"), ("lm_head.weight", [32, 8], "F32")]
TIED_ARCH_FP = "00219e8f8f6774f9342e442863b89e9ec0ba75721822d8fef999e3c4d28c5555"
TIED_SHAPE_FP = "50f0db8e785249bea477bdfffdb17d6899852c526aaea47fa9285686bfce5cf7"


def test_fingerprints_are_the_golden_digests_of_the_design() -> None:
    spec = ArchSpec.of(SMALL)
    assert (spec.arch_fp, spec.shape_fp) == (SMALL_ARCH_FP, SMALL_SHAPE_FP)
    tied = ArchSpec.of(TIED, [["wte.weight", "lm_head.weight"]])
    assert (tied.arch_fp, tied.shape_fp) == (TIED_ARCH_FP, TIED_SHAPE_FP)
    assert ArchSpec.of(TIED).arch_fp == TIED_ARCH_FP, "tie groups are not part of it"
    half = ArchSpec.of([(k, s, "BF16") for k, s, _ in reversed(SMALL)])
    assert half.arch_fp == SMALL_ARCH_FP, "neither dtype nor order is part of the architecture"
    renamed = ArchSpec.of([("w", [10, 4], "F32"), ("s", [], "F32"), ("b", [10], "F32")])
    assert renamed.shape_fp == SMALL_SHAPE_FP and renamed.arch_fp != SMALL_ARCH_FP
    assert spec.param_count == 51


def test_the_client_computes_the_same_golden_fingerprints() -> None:
    """A target's fingerprint is computed on both sides (the client's `inspect`, the server's
    search): both must give the digests above, from a real module with a tied weight."""
    module = torch.nn.Module()
    module.wte = torch.nn.Embedding(32, 8)
    module.lm_head = torch.nn.Linear(8, 32, bias=False)
    module.lm_head.weight = module.wte.weight  # tied, as GPT-2 does
    spec = client_tensors.spec_of(module)
    assert spec["tie_groups"] == [["wte.weight", "lm_head.weight"]]
    assert client_tensors.arch_fp(spec) == TIED_ARCH_FP
    assert client_tensors.shape_fp(spec) == TIED_SHAPE_FP
    assert ArchSpec.from_json(spec).arch_fp == TIED_ARCH_FP
    small = {"tensors": [{"key": k, "shape": s, "dtype": d} for k, s, d in SMALL]}
    assert (client_tensors.arch_fp(small), client_tensors.shape_fp(small)) == (
        SMALL_ARCH_FP,
        SMALL_SHAPE_FP,
    )


def test_validate_spec() -> None:
    bounds = {"max_tensors": 3, "max_rank": 4, "max_dim": 1000, "max_key_length": 20}
    ok = ArchSpec.of([("a", [2], "F32"), ("b", [2], "F32")], [["a", "b"]])
    assert validate_spec(ok, **bounds) is ok
    bad = {
        "duplicate": ArchSpec.of([("a", [1], "F32"), ("a", [1], "F32")]),
        "negative": ArchSpec.of([("a", [-1], "F32")]),
        "absurd": ArchSpec.of([("a", [10**6], "F32")]),
        "rank": ArchSpec.of([("a", [1] * 5, "F32")]),
        "dtype": ArchSpec.of([("a", [1], "float32")]),
        "key": ArchSpec.of([("k" * 21, [1], "F32")]),
        "tie unknown": ArchSpec.of([("a", [1], "F32")], [["a", "zz"]]),
        "tie shapes": ArchSpec.of([("a", [1], "F32"), ("b", [2], "F32")], [["a", "b"]]),
    }
    for case, spec in bad.items():
        with pytest.raises(InvalidSpec):
            validate_spec(spec, **bounds)
            pytest.fail(case)
    with pytest.raises(TooLarge):
        validate_spec(ArchSpec.of([(f"k{i}", [1], "F32") for i in range(4)]), **bounds)


def test_names_and_refs() -> None:
    assert str(ModelName.parse("vision/resnet50-rsp")) == "vision/resnet50-rsp"
    assert ModelName.parse("bert").namespace == "default"
    for bad in ["", "..", "a/../b", "x" * 97, "a b", "a\x00b", "/abs", "a/b/c", ".hidden", "é"]:
        with pytest.raises(InvalidName):
            ModelName.parse(bad)
    assert parse_ref("vision/r:3") == (ModelName("vision", "r"), VersionRef(number=3))
    assert parse_ref("vision/r@prod")[1] == VersionRef(alias="prod")
    assert parse_ref("r")[1] == VersionRef(alias="latest")
    digest = "ab" * 32
    assert parse_ref(f"r@sha256:{digest}")[1] == VersionRef(digest=digest)
    for bad in ["0", "sha256:zz", "a b", "../x", "9" * 13]:
        with pytest.raises(InvalidRef):
            VersionRef.parse(bad)
