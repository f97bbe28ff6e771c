"""The benchmark script cannot rot: its smoke run (tiny sizes, one repeat) must finish, check
its own results (every fetched tensor against the expected values) and print every table.
Its timings are not asserted: machines are noisy."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

# Starts servers of its own (a statehub process, moto, a browser): not in the fast lane.
pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[2]
# Every section's title and the first header cell of each of its tables.
TABLES = {
    "Plan latency": ["tensors"],
    "Fetch and push: statehub against do-it-yourself": ["case", "checkpoint MiB"],
    "Fetch against do-it-yourself through a link shaped like S3": ["case"],
    "Scaling: fetch time by size, plan time by tensor count": ["checkpoint MiB", "tensors"],
    "Memory: server and client peak RSS": ["operation", "fetch"],
    "Storage saved by tensor-level dedup": ["pushes"],
    "Push: through the server, or straight to the store": ["link"],
    "Transformer scale: a Llama-shaped sharded repository": ["operation", "goal"],
}
NUMBER_ROW = re.compile(r"^\|.*\| [\d,]+(\.\d+)? \|", re.M)


def sections(output: str) -> dict[str, str]:
    """``# Title`` -> that section's text, as the run prints each results file."""
    parts = re.split(r"^# (.+)$", output, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_smoke_run_prints_every_table_with_numbers(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=420,  # the scale section starts 8 client processes (torch + transformers)
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    found = sections(done.stdout)
    for title, first_headers in TABLES.items():
        text = found.get(title)
        assert text is not None, f"no {title!r} section in:\n{done.stdout[-3000:]}"
        headers = re.findall(r"^\| (.+?) \|", text, re.M)
        for header in first_headers:
            assert header in headers, f"{title}: no table starting with {header!r}"
        assert NUMBER_ROW.search(text), f"{title}: no row of numbers"
    assert (tmp_path / "scaling.png").read_bytes().startswith(b"\x89PNG")
    assert {p.name for p in tmp_path.glob("*.md")} == {
        "plan_latency.md",
        "fetch_vs_diy.md",
        "fetch_vs_diy_shaped.md",
        "scaling.md",
        "memory.md",
        "dedup.md",
        "push_direct.md",
        "scale.md",
    }
