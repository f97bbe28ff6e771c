"""Where the time of an exact (a) and a rename-only (b) fetch, and of a push, goes.

First the CPU seconds each process spends (client, statehub server, moto), without
profilers, beside the do-it-yourself fetch: robust on a shared machine, where wall time is
not. Then client: cProfile (own time); server: ``py-spy`` (``pip install py-spy``; not a
project dependency) attached while the client works, summarised by own time.
Not part of ``benchmarks.run``: a tool for reading.

    python -m benchmarks.profile_fetch [--size 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import psutil
import torch

from benchmarks.fetch_vs_diy import (
    CLASSES,
    build_cases,
    diy_fetch,
    diy_key,
    diy_upload,
    model_name,
)
from benchmarks.harness import (
    Services,
    body_state_dict,
    layers_for,
    seconds,
    target_net,
    wait_idle,
)
from statehub import Client
from statehub._tensors import (
    StreamReader,
    iter_safetensors,
    read_safetensors_stream,
    safetensors_header,
)


def client_profile(fn: Callable[[], object]) -> str:
    profile = cProfile.Profile()
    profile.enable()
    fn()
    profile.disable()
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(12)
    return out.getvalue()


def server_profile(pid: int, output: Path) -> subprocess.Popen[bytes] | None:
    """py-spy sampling the server's busy threads until it gets SIGINT (then it writes)."""
    if shutil.which("py-spy") is None:
        return None
    spy = subprocess.Popen(
        ["py-spy", "record", "--pid", str(pid), "--format", "raw", "--output", str(output),
         "--rate", "200"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(1)  # attached before the fetches start
    return spy


def own_time(raw: Path, top: int = 15) -> str:
    """py-spy's collapsed stacks, summed by the innermost frame (own time) and by thread."""
    leaves: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        leaves[stack.split(";")[-1]] += int(count)
        total += int(count)
    return "\n".join(f"{n / total:6.1%}  {leaf}" for leaf, n in leaves.most_common(top))


def cpu_seconds(pids: Sequence[int]) -> list[float]:
    return [sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids]


def cpu_split(label: str, pids: dict[str, int], fn: Callable[[], object]) -> None:
    """CPU seconds of each process over ``fn``, and the wall time."""
    before = cpu_seconds(list(pids.values()))
    wall, _ = seconds(fn)
    spent = [b - a for a, b in zip(before, cpu_seconds(list(pids.values())), strict=True)]
    parts = ", ".join(f"{name} {cpu:.2f}" for name, cpu in zip(pids, spent, strict=True))
    print(f"== {label}: CPU s {parts}; total {sum(spent):.2f}; wall {wall:.2f}")


def profiled(label: str, server_pid: int, scratch: Path, fn: Callable[[], object]) -> None:
    """Run ``fn`` under cProfile here and py-spy on the server; print both summaries."""
    raw = scratch / f"{label.split()[0]}.txt"
    spy = server_profile(server_pid, raw)
    print(f"== {label}: client (cProfile, own time)")
    print(client_profile(fn))
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=60)
        print(f"== {label}: server (py-spy, own time of busy samples)")
        print(own_time(raw))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256, help="checkpoint MiB")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    target = target_net(layers_for(args.size), CLASSES)
    cases = build_cases(args.size, target, "ab")
    names = [model_name(case.key, args.size) for case in cases]
    with Services() as services, tempfile.TemporaryDirectory() as scratch:
        stack = services.stack()
        with stack.server() as server, Client(server.url, cache=False) as hub:
            pids = {"client": os.getpid(), "server": server.pid, "moto": stack.moto_pid}
            cpu_split("push a (new bytes)", pids, lambda: hub.push(names[0], cases[0].source))
            fresh = body_state_dict(args.size, torch.float32, CLASSES, seed=2**31 - 1)
            profiled("push (new bytes)", server.pid, Path(scratch), partial(hub.push, "p/x", fresh))
            cpu_split("DIY upload_file a", pids, lambda: diy_upload(stack, cases[0], args.size))
            hub.push(names[1], cases[1].source)
            for name in names:
                hub.fetch(name, target=target)  # warm-up: the rewrite is cached after it
            wait_idle(*stack.busy_pids)
            parse_only(cases[0].source)
            key = diy_key(cases[0], args.size)
            cpu_split(
                f"DIY a fetch x{args.repeats}",
                pids,
                lambda: [diy_fetch(stack, key, cases[0]) for _ in range(args.repeats)],
            )
            for case, name in zip(cases, names, strict=True):
                fetches = partial(_fetch_n, hub, name, target, args.repeats)
                cpu_split(f"statehub {case.label} fetch x{args.repeats}", pids, fetches)
                profiled(
                    f"statehub {case.label} fetch x{args.repeats}",
                    server.pid,
                    Path(scratch),
                    fetches,
                )


def parse_only(state_dict: dict[str, torch.Tensor], chunk: int = 64 * 1024) -> None:
    """The client's parser alone (``read_safetensors_stream``) over in-memory 64 KiB chunks,
    the size httpx hands it: what it costs apart from the network and the digest."""
    items = list(state_dict.items())
    blob = b"".join(iter_safetensors(items, safetensors_header(items)))
    chunks = [blob[i : i + chunk] for i in range(0, len(blob), chunk)]
    for attempt in ("fresh memory", "reused memory"):
        elapsed, _ = seconds(lambda: read_safetensors_stream(StreamReader(iter(chunks))))
        print(f"== client parser alone, {attempt}: {len(blob) / 2**20 / elapsed:,.0f} MiB/s")


def _fetch_n(hub: Client, name: str, target: torch.nn.Module, n: int) -> None:
    for _ in range(n):
        hub.fetch(name, target=target)


if __name__ == "__main__":
    main()
