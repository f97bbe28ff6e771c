"""benchmarks/fetch_requests.py cannot rot: a tiny run (ResNet-50 at width 4, one repeat)
finishes, checks every fetched tensor itself, and stays within its request bound. Timings
are not asserted: machines are noisy."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

# Starts servers of its own (moto, a statehub process): not in the fast lane.
pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[2]
ROW = re.compile(
    r"^\| (exact|rename-only|head reset \+ cast) \| 320 \| [\d.]+ \| ([\d.]+) \| (\d+) \|", re.M
)


def test_the_request_benchmark_runs_and_stays_within_its_bound() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.fetch_requests", "--width", "4", "--repeats", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {m.group(1): (float(m.group(2)), int(m.group(3))) for m in ROW.finditer(done.stdout)}
    assert set(rows) == {"exact", "rename-only", "head reset + cast"}, done.stdout
    for case, (requests, bound) in rows.items():
        assert 0 < requests <= bound, (case, requests, bound)
