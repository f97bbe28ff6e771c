"""Load: concurrent fetches, plans and pushes against one server on PostgreSQL + S3 protocol.

A bounded asyncio script on loopback only. It starts moto's S3 server, a fresh PostgreSQL
schema (``STATEHUB_TEST_DATABASE_URL``, as the tests do) and one ``python -m service``;
seeds a few 16 MiB checkpoints; then ``--concurrency`` workers run a fixed mix for
``--duration`` seconds:

    fetch-exact      50%  the stored blob passed through (verified while streaming)
    fetch-transform  15%  every tensor cast to fp16 on the server
    plan             25%  a 10-class head onto a 1000-class checkpoint
    push             10%  a new 1 MiB version of one model (distinct bytes each time)

Every request must succeed; the server's RSS is sampled throughout.

    python -m benchmarks.load                       # 32 workers, 30 s
    python -m benchmarks.load --concurrency 64 --duration 60
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import tempfile
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import torch
from safetensors.torch import save as st_save

from tests._server import ServerProcess, create_pg_schema, drop_pg_schema, start_server
from tests._services import S3_TEST_KEYS, s3_settings, start_moto_server

RESULTS = Path(__file__).parent / "results" / "load.md"
MiB = 1024 * 1024
MODELS = 4
MIX = (("fetch-exact", 50), ("fetch-transform", 15), ("plan", 25), ("push", 10))


def checkpoint(seed: int, *, tensors: int, rows: int, classes: int = 1000) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    state = {
        f"layer{i}.weight": torch.randn(rows, 512, generator=generator) for i in range(tensors)
    }
    state["fc.weight"] = torch.randn(classes, 16, generator=generator)
    return st_save(state)


def spec(tensors: int, rows: int, dtype: str, classes: int) -> dict[str, Any]:
    entries = [
        {"key": f"layer{i}.weight", "shape": [rows, 512], "dtype": dtype} for i in range(tensors)
    ]
    entries.append({"key": "fc.weight", "shape": [classes, 16], "dtype": dtype})
    return {"tensors": entries}


SEED_SHAPE = {"tensors": 16, "rows": 512}  # 16 MiB of fp32
PUSH_SHAPE = {"tensors": 1, "rows": 512}  # 1 MiB


@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    bytes_in: int = 0
    bytes_out: int = 0
    rss: list[int] = field(default_factory=list)


async def fetch(http: httpx.AsyncClient, model: str, target: dict[str, Any], stats: Stats) -> None:
    url = f"/v1/models/{model}/versions/1/fetch"
    async with http.stream("POST", url, json={"target": target}) as response:
        response.raise_for_status()
        received = 0
        async for chunk in response.aiter_raw():
            received += len(chunk)
        if received != int(response.headers["content-length"]):
            raise RuntimeError(f"short fetch: {received} bytes")
        stats.bytes_in += received


async def operation(kind: str, http: httpx.AsyncClient, stats: Stats, rng: random.Random) -> None:
    model = f"load/m{rng.randrange(MODELS)}"
    if kind == "fetch-exact":
        await fetch(http, model, spec(**SEED_SHAPE, dtype="F32", classes=1000), stats)
    elif kind == "fetch-transform":
        await fetch(http, model, spec(**SEED_SHAPE, dtype="F16", classes=1000), stats)
    elif kind == "plan":
        target = spec(**SEED_SHAPE, dtype="F32", classes=10)
        response = await http.post(f"/v1/models/{model}/versions/1/plan", json={"target": target})
        response.raise_for_status()
    else:
        body = checkpoint(rng.randrange(2**31), **PUSH_SHAPE)
        response = await http.post(
            f"/v1/models/load/pushed{rng.randrange(4)}/versions", content=body
        )
        response.raise_for_status()
        stats.bytes_out += len(body)


async def worker(url: str, deadline: float, stats: Stats, seed: int) -> None:
    rng = random.Random(seed)
    kinds, weights = zip(*MIX, strict=True)
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        while time.monotonic() < deadline:
            kind = rng.choices(kinds, weights)[0]
            started = time.perf_counter()
            try:
                await operation(kind, http, stats, rng)
            except (httpx.HTTPError, RuntimeError) as exc:
                stats.errors[f"{kind}: {type(exc).__name__}"] += 1
                continue
            stats.latencies[kind].append((time.perf_counter() - started) * 1000)


async def sample_rss(pid: int, stats: Stats, stop: asyncio.Event) -> None:
    process = psutil.Process(pid)
    while not stop.is_set():
        stats.rss.append(process.memory_info().rss)
        await asyncio.sleep(0.25)


async def run_load(server: ServerProcess, concurrency: int, duration: float) -> tuple[Stats, float]:
    stats = Stats()
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_rss(server.pid, stats, stop))
    started = time.monotonic()
    deadline = started + duration
    await asyncio.gather(*(worker(server.url, deadline, stats, i) for i in range(concurrency)))
    elapsed = time.monotonic() - started
    stop.set()
    await sampler
    return stats, elapsed


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def report(stats: Stats, elapsed: float, args: argparse.Namespace, baseline_rss: int) -> str:
    total = sum(len(v) for v in stats.latencies.values())
    lines = [
        "# Load",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, torch {torch.__version__}. One server process "
        "(`python -m service`) on PostgreSQL (local cluster) + moto's S3 server, all on "
        f"loopback. {args.concurrency} concurrent workers for {elapsed:.0f} s; seeded with "
        f"{MODELS} checkpoints of 16 MiB (fp32).",
        f"Command: `python -m benchmarks.load --concurrency {args.concurrency} "
        f"--duration {args.duration:g}`.",
        "",
        "| operation | requests | per second | p50 ms | p90 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, _ in MIX:
        values = stats.latencies.get(kind, [])
        if not values:
            continue
        lines.append(
            f"| {kind} | {len(values)} | {len(values) / elapsed:.1f} | "
            f"{statistics.median(values):.0f} | {percentile(values, 0.9):.0f} | "
            f"{percentile(values, 0.99):.0f} | {max(values):.0f} |"
        )
    errors = sum(stats.errors.values())
    peak = max(stats.rss, default=0)
    lines += [
        f"| all | {total} | {total / elapsed:.1f} | | | | |",
        "",
        f"Fetched {stats.bytes_in / MiB / elapsed:.0f} MiB/s, pushed "
        f"{stats.bytes_out / MiB / elapsed:.1f} MiB/s. Errors: {errors}"
        + (f" ({dict(stats.errors)})" if errors else "")
        + ".",
        f"Server RSS: {baseline_rss / MiB:.0f} MiB after seeding, peak {peak / MiB:.0f} MiB, "
        f"{stats.rss[-1] / MiB if stats.rss else 0:.0f} MiB at the end "
        f"(first half's peak {max(stats.rss[: len(stats.rss) // 2], default=0) / MiB:.0f} MiB, "
        f"second half's {max(stats.rss[len(stats.rss) // 2 :], default=0) / MiB:.0f} MiB).",
    ]
    return "\n".join(lines) + "\n"


def seed(url: str) -> None:
    with httpx.Client(base_url=url, timeout=300) as http:
        for i in range(MODELS):
            response = http.post(
                f"/v1/models/load/m{i}/versions", content=checkpoint(i, **SEED_SHAPE)
            )
            response.raise_for_status()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--no-write", action="store_true", help="do not write results/load.md")
    args = parser.parse_args()
    moto = start_moto_server()
    schema, database_url = create_pg_schema()
    bucket = f"load-{uuid.uuid4().hex[:8]}"
    from service.storage.blobs import S3BlobStore

    S3BlobStore(s3_settings(moto.endpoint, bucket)).ensure_bucket()
    try:
        with tempfile.TemporaryDirectory() as data_dir:
            env = {
                "STATEHUB_DATA_DIR": data_dir,
                "STATEHUB_DATABASE_URL": database_url,
                "STATEHUB_S3_ENDPOINT": moto.endpoint,
                "STATEHUB_S3_BUCKET": bucket,
                "STATEHUB_S3_ACCESS_KEY_ID": S3_TEST_KEYS["s3_access_key_id"],
                "STATEHUB_S3_SECRET_ACCESS_KEY": S3_TEST_KEYS["s3_secret_access_key"],
            }
            server = start_server(env)
            try:
                seed(server.url)
                baseline = server.rss_bytes()
                stats, elapsed = asyncio.run(run_load(server, args.concurrency, args.duration))
            finally:
                server.stop()
    finally:
        drop_pg_schema(schema)
        moto.stop()
    text = report(stats, elapsed, args, baseline)
    if not args.no_write:
        RESULTS.write_text(text)
    print(text)
    if stats.errors:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
