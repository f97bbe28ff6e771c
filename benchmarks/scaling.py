"""Scaling: exact-fetch time against checkpoint size (case a on the default server, with the
do-it-yourself road beside it) and plan time against tensor count, as tables and one PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from benchmarks.fetch_vs_diy import FetchRow, PushRow
from benchmarks.harness import Report, table
from benchmarks.plan_latency import PlanRow


def exact_streaming(rows: Sequence[FetchRow]) -> list[FetchRow]:
    """One row per size: case (a) on the streaming server, smallest first."""
    chosen = {r.size_mib: r for r in rows if r.key == "a" and r.variant == "streaming"}
    return [chosen[size] for size in sorted(chosen)]


def report(
    fetches: Sequence[FetchRow], pushes: Sequence[PushRow], plans: Sequence[PlanRow], image: str
) -> Report:
    out = Report("scaling", "Scaling: fetch time by size, plan time by tensor count")
    out.add(
        f"![fetch and plan scaling]({image})",
        "## Exact fetch (case a, streaming server, median after a first fetch)",
        table(
            ("checkpoint MiB", "DIY s", "statehub s", "statehub MiB/s", "ratio"),
            [
                (
                    r.checkpoint_mib,
                    r.diy.median,
                    r.hub.median,
                    r.checkpoint_mib / r.hub.median,
                    r.diy.median / r.hub.median,
                )
                for r in fetches
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


def plot(fetches: Sequence[FetchRow], plans: Sequence[PlanRow], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server or in CI
    from matplotlib import pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    sizes = [r.checkpoint_mib for r in fetches]
    left.plot(sizes, [r.hub.median for r in fetches], "o-", label="statehub fetch")
    left.plot(sizes, [r.diy.median for r in fetches], "s--", label="boto3 + torch.load")
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
