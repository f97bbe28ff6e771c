"""Plan latency for 100, 1,000 and 10,000-tensor specs: server-side and HTTP round trip.

The source is a ResNet-like checkpoint saved through DataParallel in fp16 with a 1000-class
head; the target is the plain fp32 model with 30 classes, so every plan runs the prefix
search, exact matching, a head decision and dtype casts — the common real case.

    python -m benchmarks.plan_latency            # prints a table, writes results/plan_latency.md
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import httpx
import torch

from service.core.plan import Policy
from service.core.planner import plan
from service.core.spec import ArchSpec

SIZES = (100, 1_000, 10_000)
TARGETS_MS = {100: 20, 1_000: 100, 10_000: 1_000}
RESULTS = Path(__file__).parent / "results" / "plan_latency.md"


def resnet_like(tensors: int, *, prefix: str, dtype: str, classes: int) -> ArchSpec:
    """Blocks of conv + BatchNorm (weight, bias, running stats, counter) until ``tensors``."""
    entries: list[tuple[str, list[int], str]] = [(f"{prefix}conv1.weight", [64, 3, 7, 7], dtype)]
    block = 0
    while len(entries) < tensors - 2:
        base = f"{prefix}layer{block // 8}.{block % 8}"
        entries.append((f"{base}.conv.weight", [64, 64, 3, 3], dtype))
        for stat in ("weight", "bias", "running_mean", "running_var"):
            entries.append((f"{base}.bn.{stat}", [64], dtype))
        entries.append((f"{base}.bn.num_batches_tracked", [], "I64"))
        block += 1
    entries = entries[: tensors - 2]
    entries += [
        (f"{prefix}fc.weight", [classes, 64], dtype),
        (f"{prefix}fc.bias", [classes], dtype),
    ]
    return ArchSpec.of(entries)


def median_ms(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def start_server(data_dir: str, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "STATEHUB_DATA_DIR": data_dir, "STATEHUB_PORT": str(port)}
    process = subprocess.Popen([sys.executable, "-m", "service", "--log-level", "warning"], env=env)
    for _ in range(300):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("server did not start")


def push_spec(url: str, name: str, spec: ArchSpec) -> None:
    from statehub import Client

    dtypes = {"F16": torch.float16, "I64": torch.int64, "F32": torch.float32}
    state_dict = {t.key: torch.zeros(t.shape, dtype=dtypes[t.dtype]) for t in spec.tensors}
    with Client(url) as hub:
        hub.push(name, state_dict)


def main() -> None:
    port = 18731
    rows = []
    with tempfile.TemporaryDirectory() as data_dir:
        server = start_server(data_dir, port)
        url = f"http://127.0.0.1:{port}"
        try:
            for size in SIZES:
                source = resnet_like(size, prefix="module.", dtype="F16", classes=1000)
                target = resnet_like(size, prefix="", dtype="F32", classes=30)
                repeats = 50 if size <= 1_000 else 10
                in_process = median_ms(partial(plan, source, target, policy=Policy()), repeats)
                push_spec(url, f"bench/plan-{size}", source)
                body = {"target": target.to_json(), "policy": {}}
                with httpx.Client(base_url=url, timeout=60) as http:
                    path = f"/v1/models/bench/plan-{size}/versions/latest/plan"
                    verdict = http.post(path, json=body).json()["plan"]["verdict"]
                    round_trip = median_ms(partial(http.post, path, json=body), repeats)
                rows.append((size, in_process, round_trip, TARGETS_MS[size], verdict))
        finally:
            server.terminate()
            server.wait()
    lines = [
        "# Plan latency",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, torch {torch.__version__}. "
        "Median of repeated runs (10-50), one warm-up each.",
        "Command: `python -m benchmarks.plan_latency`.",
        "",
        "| tensors | planner (server-side) ms | HTTP round trip ms | target ms | verdict |",
        "|---:|---:|---:|---:|---|",
    ]
    lines += [f"| {s:,} | {p:.1f} | {r:.1f} | < {t:,} | {v} |" for s, p, r, t, v in rows]
    text = "\n".join(lines) + "\n"
    RESULTS.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
