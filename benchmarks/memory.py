"""Memory: the server's peak RSS above idle during the largest fetches and push (taken from
the fetch benchmark, which wraps each in ``PeakGrowth``), and the client's peak RSS during a
fetch, measured in a process of its own against the size of the state_dict it returns."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from benchmarks.fetch_vs_diy import (
    CLASSES,
    SERVER_GROWTH_LIMIT_MIB,
    FetchRow,
    PushRow,
    model_name,
)
from benchmarks.harness import MiB, Report, Stack, layers_for, table

CLIENT_LIMIT = 1.2  # peak growth / result size


@dataclass
class ClientRow:
    label: str
    result_mib: float
    growth_mib: float

    @property
    def ratio(self) -> float:
        return self.growth_mib / self.result_mib


def client_peaks(stack: Stack, rows: Sequence[FetchRow]) -> list[ClientRow]:
    """Fetch each row's case again, each from a fresh client process, on the default server."""
    with stack.server() as server:
        return [client_peak(server.url, row) for row in rows]


def client_peak(url: str, row: FetchRow) -> ClientRow:
    name = model_name(row.key, row.size_mib)
    probe = subprocess.run(
        [sys.executable, "-m", "benchmarks.client_probe", url, name,
         str(layers_for(row.size_mib)), str(CLASSES)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )  # fmt: skip
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    if found["result_bytes"] != row.result_bytes:
        raise AssertionError(f"the probe got {found['result_bytes']} bytes, not {row.result_bytes}")
    growth = (found["peak_kib"] - found["baseline_kib"]) / 1024
    return ClientRow(row.label, row.result_bytes / MiB, growth)


def report(fetches: Sequence[FetchRow], push: PushRow, clients: Sequence[ClientRow]) -> Report:
    limit = SERVER_GROWTH_LIMIT_MIB
    server_rows = [
        (f"fetch {r.label}", r.checkpoint_mib, r.server_mib, f"< {limit}") for r in fetches
    ]
    server_rows.append(("push a (fp32)", float(push.size_mib), push.server_mib, f"< {limit}"))
    out = Report("memory", "Memory: server and client peak RSS")
    out.add(
        "Server: peak RSS (VmHWM, reset through /proc/<pid>/clear_refs before each "
        "measurement) above the RSS it had idle just before, over the first fetch and the "
        "repeats of each case on the default (streaming) server, and over one push.",
        table(
            ("operation", "checkpoint MiB", "server peak above idle MiB", "limit MiB", "meets"),
            [(*r, "yes" if r[2] < limit else "**no**") for r in server_rows],
        ),
        "Client: `Client.fetch` alone in a fresh process (`benchmarks.client_probe`); its "
        "VmHWM after the fetch minus its RSS after the imports and the target (body on "
        "`meta`, so it takes no memory), against the bytes of the returned state_dict.",
        table(
            ("fetch", "result MiB", "client peak growth MiB", "growth / result", "limit", "meets"),
            [
                (
                    c.label,
                    c.result_mib,
                    c.growth_mib,
                    c.ratio,
                    f"< {CLIENT_LIMIT}",
                    "yes" if c.ratio < CLIENT_LIMIT else "**no**",
                )
                for c in clients
            ],
        ),
    )
    return out
