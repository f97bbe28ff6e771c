"""Storage saved by tensor-level dedup: a backbone, then ten fine-tunes that change only the
head, each pushed as a model of its own into a bucket of its own. Logical bytes are what was
pushed; stored bytes the sum of the bucket's object sizes (boto3 ``list_objects_v2``)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from benchmarks.harness import (
    MiB,
    Report,
    Stack,
    assert_state_dict,
    body_state_dict,
    nbytes,
    seconds,
    table,
)
from statehub import Client

CLASSES = 1000


@dataclass
class DedupResult:
    backbone_mib: int
    pushes: int
    logical: int
    stored: int
    first_s: float
    tune_s: list[float]


def fine_tune(backbone: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The same backbone tensors with a new random head."""
    generator = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(v.shape, generator=generator) if k.startswith("fc.") else v
        for k, v in backbone.items()
    }


def measure(stack: Stack, backbone_mib: int, tunes: int = 10) -> DedupResult:
    backbone = body_state_dict(backbone_mib, torch.float32, CLASSES, seed=7)
    with stack.server() as server, Client(server.url, cache=False) as hub:
        first_s, _ = seconds(lambda: hub.push("ft/backbone", backbone))
        logical, times = nbytes(backbone), []
        for i in range(tunes):
            tuned = fine_tune(backbone, seed=100 + i)
            elapsed, _ = seconds(lambda tuned=tuned, i=i: hub.push(f"ft/tune-{i}", tuned))
            times.append(elapsed)
            logical += nbytes(tuned)
        stored = stack.stored_bytes()
        # Dedup must not cost correctness: the last fine-tune comes back as it was pushed.
        assert_state_dict(
            hub.fetch(f"ft/tune-{tunes - 1}", target=tuned), list(tuned), tuned.__getitem__
        )
    return DedupResult(backbone_mib, 1 + tunes, logical, stored, first_s, times)


def report(result: DedupResult) -> Report:
    r = result
    median_tune = statistics.median(r.tune_s)
    out = Report("dedup", "Storage saved by tensor-level dedup")
    out.add(
        f"A {r.backbone_mib} MiB fp32 backbone with a {CLASSES}-class head pushed as "
        f"`ft/backbone`, then {r.pushes - 1} fine-tunes (`ft/tune-i`: the same backbone "
        "tensors, a new random head). Stored bytes: every object in the registry's bucket. "
        "Without tensor-level dedup every push stores its whole checkpoint: 0% saved.",
        table(
            (
                "pushes",
                "logical MiB",
                "stored MiB",
                "saved",
                "first push s",
                "fine-tune push s (median)",
                "fine-tune / first",
            ),
            [
                (
                    r.pushes,
                    r.logical / MiB,
                    r.stored / MiB,
                    f"{1 - r.stored / r.logical:.0%}",
                    r.first_s,
                    median_tune,
                    median_tune / r.first_s,
                )
            ],
        ),
    )
    return out
