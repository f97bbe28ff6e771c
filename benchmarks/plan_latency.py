"""Plan latency for 100, 1,000 and 10,000-tensor specs: server-side and HTTP round trip.

The source is a ResNet-like checkpoint saved through DataParallel in fp16 with a 1000-class
head; the target is the plain fp32 model with 30 classes, so every plan runs the prefix
search, exact matching, a head decision and dtype casts: the common real case.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import httpx
import torch

from benchmarks.harness import Report, Stack, table, timed
from service.core.plan import Policy
from service.core.planner import plan
from service.core.spec import ArchSpec
from statehub import Client

SIZES = (100, 1_000, 10_000)
TARGETS_MS = {100: 20, 1_000: 100, 10_000: 1_000}
DTYPES = {"F16": torch.float16, "I64": torch.int64, "F32": torch.float32}
EXPECTED_VERDICT = "partial"  # the head is reset: anything else means the plan went wrong


@dataclass
class PlanRow:
    tensors: int
    planner_ms: float
    http_ms: float

    @property
    def target_ms(self) -> int:
        return TARGETS_MS.get(self.tensors, TARGETS_MS[min(TARGETS_MS)])


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


def _check_verdict(response: httpx.Response) -> None:
    verdict = response.raise_for_status().json()["plan"]["verdict"]
    if verdict != EXPECTED_VERDICT:
        raise AssertionError(f"plan verdict {verdict!r}, expected {EXPECTED_VERDICT!r}")


def measure(stack: Stack, sizes: Sequence[int], repeats: int | None = None) -> list[PlanRow]:
    """Median of repeats (50, or 10 for 10,000 tensors) after a first, untimed-in-median run."""
    rows = []
    with (
        stack.server() as server,
        Client(server.url, cache=False) as hub,
        httpx.Client(base_url=server.url, timeout=120) as http,
    ):
        for size in sizes:
            count = repeats or (50 if size <= 1_000 else 10)
            source = resnet_like(size, prefix="module.", dtype="F16", classes=1000)
            target = resnet_like(size, prefix="", dtype="F32", classes=30)
            in_process = timed(partial(plan, source, target, policy=Policy()), count, _no_check)
            zeros = {t.key: torch.zeros(t.shape, dtype=DTYPES[t.dtype]) for t in source.tensors}
            hub.push(f"bench/plan-{size}", zeros)
            path = f"/v1/models/bench/plan-{size}/versions/latest/plan"
            body = {"target": target.to_json(), "policy": {}}
            round_trip = timed(partial(http.post, path, json=body), count, _check_verdict)
            rows.append(PlanRow(size, in_process.median * 1000, round_trip.median * 1000))
    return rows


def _no_check(_: object) -> None:
    pass


def report(rows: Sequence[PlanRow]) -> Report:
    out = Report("plan_latency", "Plan latency")
    out.add(
        "A DataParallel fp16 ResNet-like checkpoint with a 1000-class head planned onto the "
        "plain fp32 model with 30 classes. Median of repeated runs (50; 10 at 10,000 "
        "tensors) after a first one. Every HTTP answer is checked (verdict `partial`).",
        table(
            ("tensors", "planner (server-side) ms", "HTTP round trip ms", "target ms", "meets"),
            [
                (
                    r.tensors,
                    r.planner_ms,
                    r.http_ms,
                    f"< {r.target_ms:,}",
                    "yes" if r.http_ms < r.target_ms else "**no**",
                )
                for r in rows
            ],
        ),
    )
    return out
