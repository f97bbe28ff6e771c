"""The restricted unpickler and the torch containers, on bytes alone: no server, no torch.load."""

from __future__ import annotations

import argparse
import io
import os
import pickle
import struct
import subprocess
import sys
import uuid
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch

from service.core.safetensors_format import Limits
from service.core.torch_format import (
    MAX_PICKLE_BYTES,
    read_record,
    read_torch_legacy,
    read_torch_zip,
)
from service.core.unpickle import (
    DTYPES,
    Placeholder,
    StorageRef,
    TensorRef,
    TypedStorage,
    UnpickleReport,
    checked_view,
    is_denied,
    normalize_global,
    unpickle,
)
from service.errors import InvalidCheckpoint, TooLarge, UnsafePickle
from tests._zips import rebuild_zip

LIMITS = Limits()


def load(data: bytes, report: UnpickleReport | None = None) -> Any:
    return unpickle(data, limits=LIMITS, persistent_load=lambda pid: pid, report=report)


def saved(obj: Any, *, legacy: bool = False) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


# -- plain data reads as pickle reads it ---------------------------------------------------

PLAIN = {
    "numbers": [0, -1, 255, 65536, -(2**31), 2**63 + 5, -(2**100), 1.5, float("inf")],
    "text": ["", "ascii", "ünïcödé ✓", "x" * 300],
    "bytes": [b"", b"\x00\xff" * 200, bytearray(b"abc")],
    "containers": [(), (1,), (1, 2), (1, 2, 3), (1, (2, (3, 4))), [], {"k": {}}],
    "sets": [set(), {1, 2, 3}, frozenset({"a", "b"})],
    "ordered": OrderedDict([("b", 1), ("a", 2)]),
    "misc": [None, True, False, complex(1.5, -2), slice(1, 10, 2)],
}


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_plain_data_reads_as_pickle_reads_it(protocol: int) -> None:
    data = pickle.dumps(PLAIN, protocol=protocol)
    assert load(data) == pickle.loads(data)


def test_shared_references_stay_shared() -> None:
    inner = [1, 2]
    value = load(pickle.dumps({"a": inner, "b": inner}, protocol=2))
    assert value["a"] is value["b"]


def test_python2_spellings_are_normalised() -> None:
    # protocol 2 as Python 2 wrote it: __builtin__.set, copy_reg._reconstructor.
    data = b"\x80\x02c__builtin__\nset\nq\x00]q\x01K\x07a\x85q\x02Rq\x03."
    assert load(data) == {7}
    assert normalize_global("__builtin__", "eval") == ("builtins", "eval")
    assert normalize_global("copy_reg", "_reconstructor") == ("copyreg", "_reconstructor")
    assert normalize_global("commands", "getoutput")[0] == "subprocess"


# -- unknown globals become placeholders, never imported --------------------------------------


class TrainConfig:
    def __init__(self) -> None:
        self.lr = 0.1
        self.layers = [64, 128]


class Slotted:
    __slots__ = ("width",)

    def __init__(self) -> None:
        self.width = 7


def test_unknown_classes_become_inert_placeholders() -> None:
    report = UnpickleReport()
    value = load(
        pickle.dumps(
            {"cfg": TrainConfig(), "args": argparse.Namespace(seed=3), "slots": Slotted()},
            protocol=2,
        ),
        report,
    )
    cfg, args, slots = value["cfg"], value["args"], value["slots"]
    assert isinstance(cfg, Placeholder) and cfg.name == f"{__name__}.TrainConfig"
    assert cfg.attributes == {"lr": 0.1, "layers": [64, 128]}
    assert args.name == "argparse.Namespace" and args.attributes == {"seed": 3}
    assert slots.attributes == {"width": 7}
    assert report.placeholders == {
        f"{__name__}.TrainConfig",
        f"{__name__}.Slotted",
        "argparse.Namespace",
    }
    assert report.denied == set()


def test_a_placeholder_module_is_never_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = f"statehub_canary_{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "imported"
    (tmp_path / f"{module}.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nclass Config:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    data = f"c{module}\nConfig\n(I1\nI2\ntR.".encode()  # protocol 0: Config(1, 2)
    value = load(data)
    assert isinstance(value, Placeholder)
    assert (value.name, value.args) == (f"{module}.Config", (1, 2))
    assert module not in sys.modules
    assert not marker.exists()


# -- denied globals refuse the file, naming every one ---------------------------------------


class RunsSystem:
    def __reduce__(self) -> Any:
        return (os.system, ("touch /tmp/statehub-never",))


class RunsPopen:
    def __reduce__(self) -> Any:
        return (subprocess.Popen, (["touch", "/tmp/statehub-never"],))


class RunsEval:
    def __reduce__(self) -> Any:
        return (eval, ("1 + 1",))


class RunsExec:
    def __reduce__(self) -> Any:
        return (exec, ("x = 1",))


HOSTILE = {
    RunsSystem: [f"{os.system.__module__}.system"],
    RunsPopen: ["subprocess.Popen"],
    RunsEval: ["builtins.eval"],
    RunsExec: ["builtins.exec"],
}


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("hostile", list(HOSTILE), ids=lambda c: c.__name__)
def test_reduce_tricks_are_refused_naming_the_globals(hostile: type, protocol: int) -> None:
    data = pickle.dumps({"weights": [1.0], "payload": hostile()}, protocol=protocol)
    with pytest.raises(UnsafePickle) as caught:
        load(data)
    assert caught.value.detail["globals"] == HOSTILE[hostile]
    assert HOSTILE[hostile][0] in caught.value.message


HAND_BUILT = {
    # protocol 0, Python 2 spelling of builtins
    "builtin eval": (b"c__builtin__\neval\n(V1+1\ntR.", ["builtins.eval"]),
    # STACK_GLOBAL with a dotted name reaching os.system through an innocent module
    "dotted path": (
        b"\x80\x04\x8c\tposixpath\x94\x8c\tos.system\x94\x93\x94\x8c\x04true\x94\x85\x94R\x94.",
        ["posixpath.os.system"],
    ),
    # getattr(object, "__subclasses__"): the start of many sandbox escapes
    "getattr chain": (
        b"cbuiltins\ngetattr\n(cbuiltins\nobject\nV__subclasses__\ntR.",
        ["builtins.getattr"],
    ),
    "two at once": (
        b"(cposix\nsystem\nVid\n\x85Rcsubprocess\ncheck_output\nVid\n\x85Rl.",
        ["posix.system", "subprocess.check_output"],
    ),
    # refused even when the rest of the pickle is garbage
    "then corrupt": (b"\x80\x02cnt\nsystem\n\xff\xff", ["nt.system"]),
    "importlib": (b"\x80\x02cimportlib\nimport_module\nVos\n\x85R.", ["importlib.import_module"]),
}


@pytest.mark.parametrize("case", sorted(HAND_BUILT))
def test_hand_built_hostile_pickles_are_refused(case: str) -> None:
    data, names = HAND_BUILT[case]
    with pytest.raises(UnsafePickle) as caught:
        load(data)
    assert caught.value.detail["globals"] == names


@pytest.mark.parametrize(
    ("module", "name", "denied"),
    [
        ("os", "system", True),
        ("posix", "system", True),
        ("subprocess", "Popen", True),
        ("builtins", "eval", True),
        ("builtins", "__import__", True),
        ("torch", "load", True),
        ("torch.hub", "load", True),
        ("numpy.testing._private.utils", "runstring", True),
        ("mymodule", "Config.__init__", True),
        ("argparse", "Namespace", False),
        ("numpy._core.multiarray", "scalar", False),
        ("torch.nn.modules.linear", "Linear", False),
        ("__main__", "Net", False),
        ("pathlib", "PosixPath", False),
        ("functools", "partial", False),
    ],
)
def test_the_deny_list(module: str, name: str, denied: bool) -> None:
    assert is_denied(module, name) is denied


# -- corrupt pickles are invalid, never a crash ------------------------------------------------

CORRUPT = {
    "truncated": pickle.dumps({"a": [1, 2, 3]}, protocol=2)[:-4],
    "empty": b"",
    "unknown opcode": b"\x80\x02\xff.",
    "stack underflow": b"\x80\x02R.",
    "missing mark": b"\x80\x02K\x01t.",
    "missing memo": b"\x80\x02h\x05.",
    "unhashable key": b"\x80\x02}q\x00]q\x01K\x01s.",
    "setitem on a list": b"\x80\x02]K\x01K\x02s.",
    "bad protocol": b"\x80\x09N.",
    "negative long4": b"\x80\x02\x8b\xff\xff\xff\xff.",
    "huge decimal": b"I" + b"9" * 5000 + b"\n.",
    "bytes of a size": b"\x80\x02c__builtin__\nbytes\n\x8a\x05\x00\x10\xa5\xd4\xe8\x85R.",
    "extension code": b"\x80\x02\x82\x01.",
    "persistent id where none can be": b"\x80\x02K\x01Q.",
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_pickles_are_invalid(case: str) -> None:
    data = CORRUPT[case]
    with pytest.raises(InvalidCheckpoint) as caught:
        unpickle(data, limits=LIMITS)
    assert not isinstance(caught.value, UnsafePickle)


def test_a_deeply_nested_key_cannot_exhaust_the_stack() -> None:
    # A 200,000-deep tuple used as a dict key: hashing it would recurse in C.
    data = b"\x80\x02}(" + b")" + b"\x85" * 200_000 + b"K\x01u."
    with pytest.raises(InvalidCheckpoint, match="dict key"):
        load(data)


# -- tensor views are bounded by their storage -----------------------------------------------


def storage(nbytes: int, dtype: str = "float32") -> TypedStorage:
    return TypedStorage(StorageRef("0", nbytes, "cpu", DTYPES[dtype].itemsize), DTYPES[dtype])


@pytest.mark.parametrize(
    ("offset", "size", "stride"),
    [
        (0, (10,), (1,)),
        (2, (2, 4), (4, 1)),
        (0, (5, 2), (1, 5)),  # transposed
        (0, (1000,), (0,)),  # expanded
        (0, (0, 10**9), (1, 1)),  # empty: addresses nothing
        (9, (), ()),  # 0-d
    ],
)
def test_views_inside_their_storage_are_accepted(offset: int, size: tuple, stride: tuple) -> None:
    ref = checked_view(storage(40), DTYPES["float32"], offset, size, stride, limits=LIMITS)
    assert (ref.shape, ref.stride, ref.byte_offset) == (size, stride, offset * 4)


@pytest.mark.parametrize(
    ("offset", "size", "stride"),
    [
        (0, (11,), (1,)),
        (1, (10,), (1,)),
        (0, (5, 2), (3, 1)),
        (-1, (1,), (1,)),
        (0, (2,), (-1,)),
        (0, (2, 2), (1,)),
        (0, (1,) * 9, (1,) * 9),
        (0, (1.5,), (1,)),
        (0, "ab", (1,)),
    ],
)
def test_views_outside_their_storage_are_refused(offset: Any, size: Any, stride: Any) -> None:
    with pytest.raises(InvalidCheckpoint):
        checked_view(storage(40), DTYPES["float32"], offset, size, stride, limits=LIMITS)


# -- the torch containers ----------------------------------------------------------------------


def tensors_in(value: Any) -> dict[str, TensorRef]:
    return {k: v for k, v in value.items() if isinstance(v, TensorRef)}


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_torch_files_yield_the_views_torch_saved(legacy: bool) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {
        "base": base,
        "alias": base,
        "transposed": base.t(),
        "strided": base[:, ::2],
        "row": base[2],
        "expanded": torch.zeros(1).expand(5),
        "scalar": torch.tensor(3, dtype=torch.int8),
        "empty": torch.empty(0, 3),
        "half": torch.ones(3, dtype=torch.float16),
        "bf16": torch.ones(2, dtype=torch.bfloat16),
        "flags": torch.tensor([True, False]),
        "u16": torch.tensor([1, 2, 3], dtype=torch.uint16),  # saved as untyped storage + dtype (v3)
    }
    data = saved(state, legacy=legacy)
    checkpoint = (read_torch_legacy if legacy else read_torch_zip)(data, limits=LIMITS)
    refs = tensors_in(checkpoint.root)
    assert list(refs) == list(state)
    for key, tensor in state.items():
        ref = refs[key]
        assert ref.shape == tuple(tensor.shape), key
        assert ref.stride == tensor.stride(), key
        assert ref.byte_offset == tensor.storage_offset() * tensor.element_size(), key
        assert ref.dtype.name == str(tensor.dtype).removeprefix("torch."), key
    assert refs["alias"].identity == refs["base"].identity
    assert refs["row"].storage is refs["base"].storage
    for key, record in checkpoint.records.items():
        assert len(read_record(data, record)) == checkpoint.storages[key].nbytes


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_any_pickle_protocol_torch_save_writes(protocol: int) -> None:
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(2, 3), "epoch": 4}, buffer, pickle_protocol=protocol)
    root = read_torch_zip(buffer.getvalue(), limits=LIMITS).root
    assert root["epoch"] == 4 and root["w"].shape == (2, 3)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_cuda_locations_are_read_as_data(legacy: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:1")
    data = saved({"w": torch.ones(2)}, legacy=legacy)
    checkpoint = (read_torch_legacy if legacy else read_torch_zip)(data, limits=LIMITS)
    assert checkpoint.root["w"].storage.location == "cuda:1"


def test_a_record_shorter_than_its_storage_is_refused() -> None:
    # torch.load(mmap=True) reads such a record past its end; statehub refuses it.
    data = saved({"w": torch.arange(10, dtype=torch.float32)})
    short = rebuild_zip(data, {"/data/0": struct.pack("<9f", *range(9))})
    with pytest.raises(InvalidCheckpoint, match="holds 36 bytes but the pickle says"):
        read_torch_zip(short, limits=LIMITS)


def test_a_missing_record_is_refused() -> None:
    data = rebuild_zip(saved({"w": torch.ones(3)}), {"/data/0": None})
    with pytest.raises(InvalidCheckpoint, match="no data/0"):
        read_torch_zip(data, limits=LIMITS)


def test_a_damaged_record_fails_its_checksum() -> None:
    data = bytearray(saved({"w": torch.zeros(1000)}))
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
    data[info.header_offset + 30 + len(info.filename) + len(info.extra) + 100] ^= 0xFF
    checkpoint = read_torch_zip(bytes(data), limits=LIMITS)
    with pytest.raises(InvalidCheckpoint, match="checksum"):
        read_record(bytes(data), checkpoint.records["0"])


def test_a_compressed_pickle_that_inflates_past_the_limit_is_refused() -> None:
    data = saved({"w": torch.ones(2)})
    bomb = rebuild_zip(
        data,
        {"/data.pkl": b"\x80\x02N" + b"\x00" * (MAX_PICKLE_BYTES + 1)},
        compress_type=zipfile.ZIP_DEFLATED,
    )
    assert len(bomb) < 1024 * 1024
    with pytest.raises(TooLarge):
        read_torch_zip(bomb, limits=LIMITS)


def test_torchscript_archives_are_named() -> None:
    # torch.jit.save's layout: data.pkl beside constants.pkl and code/
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in ("data.pkl", "constants.pkl", "code/__torch__.py", "version"):
            archive.writestr(f"net/{name}", b"\x80\x02N.")
    with pytest.raises(InvalidCheckpoint, match="TorchScript"):
        read_torch_zip(buffer.getvalue(), limits=LIMITS)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda data: data + b"\x00" * 8,
        lambda data: data[:-3],
        lambda data: data[: len(data) // 2],
    ],
    ids=["trailing bytes", "truncated storage", "truncated pickle"],
)
def test_legacy_files_must_end_with_their_last_storage(mutate: Any) -> None:
    data = saved({"w": torch.ones(4)}, legacy=True)
    with pytest.raises(InvalidCheckpoint):
        read_torch_legacy(mutate(data), limits=LIMITS)


def test_a_plain_pickle_is_not_a_legacy_checkpoint() -> None:
    with pytest.raises(InvalidCheckpoint, match="magic number"):
        read_torch_legacy(pickle.dumps({"w": [1.0]}, protocol=2), limits=LIMITS)


# -- memory bounds: what a pickle may build, not only how many steps it takes -------------

from service.core import unpickle as unpickle_module  # noqa: E402


def _deflated_zip(pickle_bytes: bytes) -> bytes:
    """A torch zip whose data.pkl is ``pickle_bytes``, deflated (tiny on the wire)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", pickle_bytes, compress_type=zipfile.ZIP_DEFLATED)
        archive.writestr("archive/byteorder", b"little")
        archive.writestr("archive/version", b"3\n")
    return buffer.getvalue()


AMPLIFIERS = {
    # ~216 heap bytes per pickle byte: the 10 KB upload that held 2.2 GiB
    "empty_sets": b"\x80\x02" + b"\x8f" * 9_900_000 + b".",
    # 4M memo entries of one value: heap grows by the memo, not the stack
    "memo": b"\x80\x02N" + b"\x94" * 4_000_000 + b".",
    # nested lists: each ']' then 'a' later, so nesting lives on the stack
    "nested_lists": b"\x80\x02" + b"]" * 4_900_000 + b"a" * 4_899_999 + b".",
    # nested marks: MARK ... LIST opened a million times
    "nested_marks": b"\x80\x02" + b"(" * 1_000_000 + b"l" * 1_000_000 + b".",
}


@pytest.mark.parametrize("case", list(AMPLIFIERS))
def test_a_pickle_that_builds_too_much_is_too_large(case: str) -> None:
    with pytest.raises(TooLarge) as caught:
        load(AMPLIFIERS[case])
    assert caught.value.code == "too_large"
    assert caught.value.detail["limit"] in {"max_built_bytes", "max_stack"}


def test_an_amplifying_torch_zip_is_refused_before_it_builds_gigabytes() -> None:
    upload = _deflated_zip(AMPLIFIERS["empty_sets"])
    assert len(upload) < 64 * 1024  # the attack is small on the wire
    with pytest.raises(TooLarge) as caught:
        read_torch_zip(upload, limits=LIMITS)
    assert caught.value.detail["limit"] in {"max_built_bytes", "max_stack"}


def test_the_built_bytes_bound_is_charged_per_object() -> None:
    # 1,000 empty sets are well inside; the charge counts them (about 216 bytes each).
    reader = unpickle_module.RestrictedUnpickler(
        b"\x80\x02(" + b"\x8f" * 1000 + b"l.", limits=LIMITS
    )
    value = reader.load()
    assert value == [set()] * 1000
    assert 1000 * sys.getsizeof(set()) <= reader.built < 2 * 1000 * sys.getsizeof(set()) + 65536


@pytest.mark.slow
def test_a_training_snapshot_with_10000_tensors_and_optimizer_state_still_loads() -> None:
    model = OrderedDict((f"layer{i}.weight", torch.full((2,), float(i))) for i in range(10_000))
    snapshot = {
        "epoch": 90,
        "state_dict": model,
        "optimizer": {
            "state": {
                i: {
                    "step": torch.tensor(5.0),
                    "exp_avg": torch.zeros(2),
                    "exp_avg_sq": torch.ones(2),
                }
                for i in range(10_000)
            },
            "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": list(range(10_000))}],
        },
        "config": argparse.Namespace(lr=0.1, arch="resnet"),
    }
    checkpoint = read_torch_zip(saved(snapshot), limits=LIMITS)
    root = checkpoint.root
    weights = tensors_in(root["state_dict"])
    assert len(weights) == 10_000
    assert len(root["optimizer"]["state"]) == 10_000
    assert weights["layer9999.weight"].shape == (2,)
