"""Scaling: exact-fetch time against checkpoint size (case a on the streaming and presign
servers, the do-it-yourself road beside them) and plan time against tensor count, as
tables and one PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from benchmarks.fetch_vs_diy import FetchRow, PushRow
from benchmarks.harness import Report, table
from benchmarks.plan_latency import PlanRow


def exact(rows: Sequence[FetchRow], variant: str) -> dict[int, FetchRow]:
    """Case (a) on ``variant``, by nominal size."""
    return {r.size_mib: r for r in rows if r.key == "a" and r.variant == variant}


def pairs(rows: Sequence[FetchRow]) -> list[tuple[FetchRow, FetchRow]]:
    """(streaming, presign) rows of case (a) for every size measured both ways."""
    streaming, presign = exact(rows, "streaming"), exact(rows, "presign")
    return [(streaming[s], presign[s]) for s in sorted(streaming.keys() & presign.keys())]


def report(
    fetches: Sequence[tuple[FetchRow, FetchRow]],
    pushes: Sequence[PushRow],
    plans: Sequence[PlanRow],
    image: str,
) -> Report:
    out = Report("scaling", "Scaling: fetch time by size, plan time by tensor count")
    out.add(
        f"![fetch and plan scaling]({image})",
        "## Exact fetch (case a, median of the repeats after a first fetch: `--repeats` of "
        "them at the `--sizes` sizes, `--scale-repeats` at the others)",
        table(
            (
                "checkpoint MiB",
                "DIY s",
                "streaming s",
                "streaming MiB/s",
                "streaming ratio",
                "presign s",
                "presign ratio",
            ),
            [
                (
                    s.checkpoint_mib,
                    s.diy.median,
                    s.hub.median,
                    s.checkpoint_mib / s.hub.median,
                    s.diy.median / s.hub.median,
                    p.hub.median,
                    p.diy.median / p.hub.median,
                )
                for s, p in fetches
            ],
        ),
        "## Push (case a, fp32, once each)",
        table(
            ("checkpoint MiB", "boto3 upload_file s", "statehub push s", "statehub MiB/s"),
            [(p.size_mib, p.diy_s, p.hub_s, p.size_mib / p.hub_s) for p in pushes],
        ),
        "## Plan (HTTP round trip and server-side planner)",
        table(
            ("tensors", "planner ms", "HTTP round trip ms"),
            [(p.tensors, p.planner_ms, p.http_ms) for p in plans],
        ),
    )
    return out


def plot(
    fetches: Sequence[tuple[FetchRow, FetchRow]], plans: Sequence[PlanRow], path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server or in CI
    from matplotlib import pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    sizes = [s.checkpoint_mib for s, _ in fetches]
    left.plot(sizes, [s.hub.median for s, _ in fetches], "o-", label="statehub, streaming")
    left.plot(sizes, [p.hub.median for _, p in fetches], "^-", label="statehub, presign")
    left.plot(sizes, [s.diy.median for s, _ in fetches], "s--", label="boto3 + torch.load")
    left.set(xlabel="checkpoint MiB", ylabel="seconds", title="Exact fetch")
    left.legend()
    counts = [p.tensors for p in plans]
    right.loglog(counts, [p.http_ms for p in plans], "o-", label="HTTP round trip")
    right.loglog(counts, [p.planner_ms for p in plans], "s--", label="planner (server-side)")
    right.set(xlabel="tensors", ylabel="milliseconds", title="Plan")
    right.legend()
    for axis in (left, right):
        axis.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
