"""Every benchmark in one run; writes ``benchmarks/results/*.md`` and ``scaling.png``.

    python -m benchmarks.run                  # the recorded figures (about 15 minutes)
    python -m benchmarks.run --smoke          # tiny sizes into a temp dir: CI's rot check
    python -m benchmarks.run --sizes 100 --scale-sizes 100,500 --only fetch,scaling

Sections: plan, fetch (fetch and push vs do-it-yourself), scaling, memory, dedup, push
(through the server or straight to the store: --push-mib), scale
(a Llama-shaped sharded repository: --scale-gb, --scale-s3-gb). A section
that fails (a fetched tensor that differs from the expected one included) is reported and
the others still run; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks import dedup, fetch_vs_diy, memory, plan_latency, push_direct, scale, scaling
from benchmarks.fetch_vs_diy import FetchRow, PushRow
from benchmarks.harness import Report, Services, machine
from benchmarks.plan_latency import PlanRow

RESULTS = Path(__file__).parent / "results"
SECTIONS = ("plan", "fetch", "shaped", "scaling", "memory", "dedup", "push", "scale")
# The link the shaped section models (issue 14): real S3's time to first byte and a single
# stream's bandwidth, applied to statehub and to the do-it-yourself road alike.
SHAPED_LINK = {"first_byte_s": 0.02, "rate": 80e6}
PLOT = "scaling.png"


@dataclass
class Options:
    sizes: list[int]  # MiB: every case, every server variant
    scale_sizes: list[int]  # MiB: case (a) only, for the scaling table
    repeats: int
    scale_repeats: int  # the extra scaling sizes: fewer, they are the largest
    plan_sizes: list[int]
    plan_repeats: int | None
    dedup_mib: int
    push_mib: int
    scale_gib: dict[str, float]  # the scale section: backend -> GiB (0 skips it)
    out: Path
    note: str


def mib_list(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s]


def options(argv: list[str]) -> tuple[Options, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 repeat, temp dir")
    parser.add_argument("--sizes", type=mib_list, default=[100, 1000])
    parser.add_argument("--scale-sizes", type=mib_list, default=[100, 500, 1000, 2000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scale-repeats", type=int, default=3)
    parser.add_argument("--dedup-mib", type=int, default=100)
    parser.add_argument("--push-mib", type=int, default=512, help="push: checkpoint MiB")
    parser.add_argument("--scale-gb", type=float, default=6.0, help="scale: GiB, SQLite + local")
    parser.add_argument("--scale-s3-gb", type=float, default=2.0, help="scale: GiB, PG + S3")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    parser.add_argument("--note", default="", help="said under the machine line")
    args = parser.parse_args(argv)
    if args.smoke:  # a few MiB, one repeat, the 100-tensor plan: seconds, not minutes
        args.sizes, args.scale_sizes, args.repeats, args.scale_repeats = [4], [4, 8], 1, 1
        args.dedup_mib, args.push_mib, args.note = 4, 8, args.note or "smoke run"
        args.scale_gb = args.scale_s3_gb = 0.04
        args.out = args.out or Path(tempfile.mkdtemp(prefix="statehub-bench-"))
    opts = Options(
        sizes=args.sizes,
        scale_sizes=args.scale_sizes,
        repeats=args.repeats,
        scale_repeats=args.scale_repeats,
        plan_sizes=[100] if args.smoke else list(plan_latency.SIZES),
        plan_repeats=3 if args.smoke else None,
        dedup_mib=args.dedup_mib,
        push_mib=args.push_mib,
        scale_gib={"local": args.scale_gb, "s3": args.scale_s3_gb},
        out=args.out or RESULTS,
        note=args.note,
    )
    only = [s for s in args.only.split(",") if s]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {sorted(unknown)}")
    return opts, only


class Run:
    """The sections, sharing one moto server and the fetch benchmark's registry."""

    def __init__(self, services: Services, opts: Options) -> None:
        self.services = services
        self.opts = opts
        self.stack = services.stack()
        self.fetches: list[FetchRow] = []
        self.pushes: list[PushRow] = []
        self.plans: list[PlanRow] = []

    def plan(self) -> Report:
        self.plans = plan_latency.measure(
            self.services.stack(), self.opts.plan_sizes, self.opts.plan_repeats
        )
        return plan_latency.report(self.plans)

    def _measure(self, size: int, which: str, repeats: int) -> list[str]:
        """Measure ``size`` on every server variant and keep its rows; returns the failures."""
        result = fetch_vs_diy.measure_size(self.stack, size, repeats, which)
        self.fetches += result.rows
        self.pushes.append(result.push)
        return result.failures

    def fetch(self) -> Report:
        failures = [
            f for size in self.opts.sizes for f in self._measure(size, "abc", self.opts.repeats)
        ]
        return fetch_vs_diy.report(self.fetches, self.pushes, self.opts.repeats, failures)

    def shaped(self) -> Report:
        """The fetch table again, at the smallest --sizes, through a ShapedProxy."""
        stack = self.services.stack(shaped=SHAPED_LINK)
        result = fetch_vs_diy.measure_size(stack, min(self.opts.sizes), self.opts.repeats)
        return fetch_vs_diy.report(
            result.rows, [result.push], self.opts.repeats, result.failures, link=SHAPED_LINK
        )

    def scaling(self) -> Report:
        measured = {s.size_mib for s, _ in scaling.pairs(self.fetches)}
        failures = [
            f
            for size in self.opts.scale_sizes
            if size not in measured
            for f in self._measure(size, "a", self.opts.scale_repeats)
        ]
        wanted = set(self.opts.scale_sizes)
        rows = [(s, p) for s, p in scaling.pairs(self.fetches) if s.size_mib in wanted]
        pushes = sorted((p for p in self.pushes if p.size_mib in wanted), key=lambda p: p.size_mib)
        scaling.plot(rows, self.plans, self.opts.out / PLOT)
        report = scaling.report(rows, pushes, self.plans, PLOT)
        report.fail(failures)
        return report

    def memory(self) -> Report:
        """At the largest --sizes checkpoint: the fetch section's server figures, and the
        client's own in a fresh process for (a) and (c)."""
        size = max(self.opts.sizes)
        fetches = [r for r in self.fetches if r.size_mib == size and r.variant == "streaming"]
        pushes = [p for p in self.pushes if p.size_mib == size]
        if not fetches or not pushes:
            raise RuntimeError("the memory section needs the fetch section's measurements")
        clients = memory.client_peaks(self.stack, [r for r in fetches if r.key in ("a", "c")])
        return memory.report(fetches, pushes[0], clients)

    def dedup(self) -> Report:
        return dedup.report(dedup.measure(self.services.stack(), self.opts.dedup_mib))

    def push(self) -> Report:
        """Through the server and straight to the store, on loopback and a shaped link."""
        mib = self.opts.push_mib
        rows = [
            push_direct.measure(self.services.stack(), mib, link="loopback", seed=71),
            push_direct.measure(
                self.services.stack(shaped=SHAPED_LINK), mib, link="shaped like S3", seed=81
            ),
        ]
        return push_direct.report(rows)

    def scale(self) -> Report:
        return scale.run(self.services, self.opts.scale_gib)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    opts, only = options(argv)
    command = shlex.join(["python", "-m", "benchmarks.run", *argv])
    opts.out.mkdir(parents=True, exist_ok=True)
    machine_line = machine() + (f"; {opts.note}" if opts.note else "")
    failed = []
    with Services() as services:
        run = Run(services, opts)
        for name in only:
            section: Callable[[], Report] = getattr(run, name)
            print(f"== {name}", flush=True)
            try:
                report = section()
            except Exception:  # one broken section must not hide the others' figures
                traceback.print_exc()
                failed.append(name)
                continue
            text = report.render(machine_line=machine_line, command=command)
            (opts.out / f"{report.name}.md").write_text(text)
            print(text, flush=True)
            if report.failures:
                failed.append(name)
    print(f"results in {opts.out}; failed sections: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
