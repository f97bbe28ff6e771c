"""``statehub inspect`` on files that are not checkpoints (issue 17 item 10).

Random bytes, a header claiming 2^63 bytes, an empty file, and other malformed safetensors
headers: each is a ``ValueError`` naming the file and what is wrong (the CLI prints it as
``error: ...`` and exits 1), never a ``MemoryError`` or a traceback — and nothing is read
beyond the file's own size.
"""

from __future__ import annotations

import json
import random
import struct
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from statehub._inspect import inspect_checkpoint
from statehub._tensors import spec_of_file
from statehub.cli import main

NOT_A_CHECKPOINT = "not a safetensors or torch checkpoint"


def header_file(raw: bytes, *, claimed: int | None = None, tail: bytes = b"") -> bytes:
    return struct.pack("<Q", len(raw) if claimed is None else claimed) + raw + tail


def random_bytes(size: int, seed: int) -> bytes:
    data = bytearray(random.Random(seed).randbytes(size))
    data[0:1] = b"\x41"  # not a zip or pickle magic: read as a safetensors header
    return bytes(data)


CASES = {
    # The three: random bytes, a huge claimed length, an empty file.
    "random.bin": random_bytes(4096, 1),
    "huge-claim.safetensors": header_file(b"{}", claimed=2**63 + 12345),
    "empty.pth": b"",
    # And the neighbours: claims just past the file, beyond safetensors' 100 MB bound,
    # text, JSON that is not a header, deep nesting, bad entries.
    "one-past.safetensors": header_file(b"{}" + b" " * 6, claimed=9),
    "gigabyte-claim.safetensors": header_file(b"{}", claimed=2**30) + b"\0" * 64,
    "text.txt": b"hello, this is a README and not a checkpoint\n" * 20,
    "list.safetensors": header_file(b"[1, 2, 3]"),
    "deep.safetensors": header_file(b"[" * 100_000 + b"]" * 100_000),
    "bad-utf8.safetensors": header_file(b'{"\xff\xfe": 1}'),
    "bad-entry.safetensors": header_file(json.dumps({"w": 3}).encode()),
    "bad-shape.safetensors": header_file(
        json.dumps({"w": {"dtype": "F32", "shape": ["x"], "data_offsets": [0, 4]}}).encode(),
        tail=b"\0" * 4,
    ),
    "bad-offsets.safetensors": header_file(
        json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": "no"}}).encode()
    ),
    "short.safetensors": b"\x05\x00\x00",
}


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    paths = {}
    for name, data in CASES.items():
        path = tmp_path / name
        path.write_bytes(data)
        paths[name] = path
    return paths


@pytest.mark.parametrize("name", sorted(CASES))
def test_inspect_refuses_what_is_not_a_checkpoint(files: dict[str, Path], name: str) -> None:
    started = time.monotonic()
    with pytest.raises(ValueError) as refused:
        inspect_checkpoint(files[name])
    assert time.monotonic() - started < 5  # no 8 GiB read, no 100,000-deep parse in Python
    message = str(refused.value)
    assert str(files[name]) in message and NOT_A_CHECKPOINT in message, message


def test_a_claimed_length_beyond_the_file_names_both_sizes(files: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match=r"claim a 9223372036854788153-byte header.*has 10 bytes"):
        inspect_checkpoint(files["huge-claim.safetensors"])
    with pytest.raises(ValueError, match="fewer than a safetensors header needs"):
        inspect_checkpoint(files["empty.pth"])


@pytest.mark.parametrize("name", ["random.bin", "huge-claim.safetensors", "empty.pth"])
def test_the_cli_prints_an_error_not_a_traceback(files: dict[str, Path], name: str) -> None:
    result = CliRunner().invoke(main, ["inspect", str(files[name])])
    assert result.exit_code == 1, result.output
    assert f"error: {files[name]}: {NOT_A_CHECKPOINT}" in result.output
    assert "Traceback" not in result.output and "MemoryError" not in result.output
    assert "unexpected" not in result.output  # a ValueError, not the catch-all


# The files a target spec is read from (``--target FILE``, ``plan(ref, target=path)``) go
# through the same header check: a claimed length is never read before it is plausible.
HEADER_CASES = [
    "random.bin",
    "huge-claim.safetensors",
    "empty.pth",
    "one-past.safetensors",
    "gigabyte-claim.safetensors",
    "text.txt",
    "list.safetensors",
    "deep.safetensors",
    "bad-utf8.safetensors",
    "short.safetensors",
]


@pytest.mark.parametrize("name", HEADER_CASES)
def test_a_target_file_that_is_not_a_checkpoint_is_a_value_error(
    files: dict[str, Path], name: str
) -> None:
    with pytest.raises(ValueError, match="not a safetensors or torch checkpoint") as info:
        spec_of_file(files[name])
    assert str(files[name]) in str(info.value)
