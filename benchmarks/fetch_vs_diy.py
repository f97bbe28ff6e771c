"""statehub fetch and push against the do-it-yourself alternative, side by side.

Do-it-yourself: boto3 ``get_object`` of the same checkpoint (a ``torch.save`` file) from the
same S3-protocol server, ``torch.load(weights_only=True)``, and a hand-written fix-up.
statehub: ``Client.fetch(ref, target=model)`` from a server whose blobs live in that bucket.
Every result of both roads is compared, value by value, with the expected state_dict.

Cases: (a) the target needs nothing, (b) renames only (a DataParallel checkpoint),
(c) a head reset and a dtype cast (fp16 checkpoint with 1000 classes into an fp32 model with
30). Server variants over the same registry: ``streaming`` (the default settings) and
``presign`` (``STATEHUB_PRESIGN_FETCH=true``: exact fetches redirect to the bucket). The fit
cache is on in both (the default), so the first (c) fetch on the first server is cold.
These fetches run with the client cache off, so every one reaches the server; each case
is then fetched again through a client with its cache on (the default): the first of those
fills the cache, the repeats are answered ``304`` and loaded from it.
Push: ``Client.push`` of the state_dict against boto3 ``upload_file`` of the .pth, once each.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx
import torch

from benchmarks.harness import (
    MiB,
    PeakGrowth,
    Report,
    Stack,
    Timing,
    assert_state_dict,
    body_state_dict,
    layers_for,
    nbytes,
    seconds,
    table,
    target_net,
    timed,
    wait_idle,
)
from statehub import Client
from statehub._tensors import spec_of

VARIANTS: dict[str, dict[str, str]] = {
    "streaming": {"presign_fetch": "false"},
    "presign": {"presign_fetch": "true"},
}
CLASSES = 30  # the target's head
SOURCE_CLASSES = 1000  # the head of the (c) checkpoint
# DIY time / statehub time at least this: (a) and (b) >= 0.9x, (c) within 1.5x.
FETCH_TARGETS = {"a": 0.9, "b": 0.9, "c": 1 / 1.5}
CLIENT_CACHE_TARGET = 10.0  # a repeated fetch with the client cache: <= 0.1x DIY
PUSH_TARGET = 1 / 1.3
SERVER_GROWTH_LIMIT_MIB = 150


@dataclass
class Case:
    key: str  # a | b | c
    label: str
    source: dict[str, torch.Tensor]  # what is pushed and saved
    fix: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]  # the hand fix-up
    keys: list[str]  # the target's keys, in order
    expect: Callable[[str], torch.Tensor]  # the right value of each key

    def check(self, got: dict[str, torch.Tensor]) -> None:
        assert_state_dict(got, self.keys, self.expect)


@dataclass
class FetchRow:
    """One case on one server variant; holds numbers only, so the tensors can go."""

    key: str
    label: str
    size_mib: int  # the nominal size (--sizes)
    checkpoint_mib: float
    result_bytes: int
    variant: str
    diy: Timing
    hub: Timing
    server_mib: float  # the server's peak RSS above idle over these fetches
    served: str  # how the server answers the same fetch after the repeats (X-Statehub-Fetch-Mode)
    client_cached: Timing  # through a client with its cache: first fills it, repeats are 304s


@dataclass
class PushRow:
    size_mib: int
    hub_s: float
    diy_s: float
    server_mib: float


def build_cases(size: int, target: torch.nn.Module, which: str = "abc") -> list[Case]:
    plain = body_state_dict(size, torch.float32, CLASSES, seed=size * 10 + 1)
    own = {k: v for k, v in target.state_dict().items() if k.startswith("fc.")}
    keys = list(target.state_dict())
    cases = {
        "a": Case("a", "a exact", plain, lambda sd: sd, keys, plain.__getitem__),
        "b": Case(
            "b",
            "b renames",
            {f"module.{k}": v for k, v in plain.items()},
            lambda sd: {k.removeprefix("module."): v for k, v in sd.items()},
            keys,
            plain.__getitem__,
        ),
    }
    if "c" in which:
        half = body_state_dict(size, torch.float16, SOURCE_CLASSES, seed=size * 10 + 2)

        def head_and_cast(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: v.float() for k, v in sd.items() if not k.startswith("fc.")} | own

        def expect_c(key: str) -> torch.Tensor:
            return own[key] if key in own else half[key].float()

        cases["c"] = Case("c", "c head+cast", half, head_and_cast, keys, expect_c)
    return [cases[k] for k in which]


def model_name(key: str, size: int) -> str:
    return f"bench/{key}-{size}"


def diy_key(case: Case, size: int) -> str:
    return f"diy/{case.key}-{size}.pth"


def diy_fetch(stack: Stack, key: str, case: Case) -> dict[str, torch.Tensor]:
    body = stack.s3.get_object(Bucket=stack.bucket, Key=key)["Body"].read()
    return case.fix(torch.load(io.BytesIO(body), weights_only=True, map_location="cpu"))


def push(stack: Stack, hub: Client, server_pid: int, case: Case, size: int) -> PushRow:
    """Both pushes of ``case``, timed once: the bytes are new to the registry only once."""
    wait_idle(*stack.busy_pids)
    with PeakGrowth(server_pid) as growth:
        hub_s, _ = seconds(lambda: hub.push(model_name(case.key, size), case.source))
    return PushRow(size, hub_s, diy_upload(stack, case, size), growth.mib)


def diy_upload(stack: Stack, case: Case, size: int) -> float:
    """``torch.save`` (untimed) and boto3 ``upload_file`` (timed) of the case's checkpoint."""
    with tempfile.NamedTemporaryFile(suffix=".pth", dir=stack.data_dir) as handle:
        torch.save(case.source, handle.name)
        elapsed, _ = seconds(
            lambda: stack.s3.upload_file(handle.name, stack.bucket, diy_key(case, size))
        )
    return elapsed


def hub_fetch(
    stack: Stack,
    hub: Client,
    server_pid: int,
    case: Case,
    size: int,
    target: torch.nn.Module,
    repeats: int,
) -> tuple[Timing, float]:
    wait_idle(*stack.busy_pids)  # the previous case's background work is not this one's time
    with PeakGrowth(server_pid) as growth:
        timing = timed(
            lambda: hub.fetch(model_name(case.key, size), target=target),
            repeats,
            case.check,
            settle=lambda: wait_idle(*stack.busy_pids),
        )
    return timing, growth.mib


def served_as(url: str, case: Case, size: int, target: torch.nn.Module) -> str:
    """How the server makes this fetch's body now: its fetch mode, and whether it redirects.
    Only the headers are read."""
    path = f"/v1/models/{model_name(case.key, size)}/versions/latest/fetch"
    body = {"target": spec_of(target), "policy": {}}
    with httpx.Client(base_url=url, timeout=60) as http, http.stream("POST", path, json=body) as r:
        if r.status_code >= 400:
            r.raise_for_status()
        mode = r.headers.get("x-statehub-fetch-mode", "?")
        return f"{mode}, 303 to S3" if r.status_code == 303 else mode


@dataclass
class SizeResult:
    rows: list[FetchRow]
    push: PushRow  # case (a): fresh fp32 bytes, the push the issue compares
    failures: list[str]


def push_all(
    stack: Stack, hub: Client, server_pid: int, cases: Sequence[Case], size: int, repeats: int
) -> tuple[PushRow, dict[str, Timing]]:
    """Push every case both ways and time the do-it-yourself fetches (server-independent)."""
    with stack.unshaped():  # filling the registry is not what a shaped link measures
        pushes = [push(stack, hub, server_pid, case, size) for case in cases]
    wait_idle(*stack.busy_pids)
    diy = {
        case.key: timed(
            lambda case=case: diy_fetch(stack, diy_key(case, size), case), repeats, case.check
        )
        for case in cases
    }
    return pushes[0], diy


def measure_size(stack: Stack, size: int, repeats: int, which: str = "abc") -> SizeResult:
    """Push every case at ``size``, then fetch each both ways on every server variant.

    A fetch that fails or returns wrong values is recorded and the others still run.
    """
    target = target_net(layers_for(size), CLASSES)
    cases = build_cases(size, target, which)
    rows: list[FetchRow] = []
    failures: list[str] = []
    pushed: tuple[PushRow, dict[str, Timing]] | None = None
    for variant in VARIANTS:
        with stack.server(**VARIANTS[variant]) as server, Client(server.url, cache=False) as hub:
            pushed = pushed or push_all(stack, hub, server.pid, cases, size, repeats)
            for case in cases:
                try:
                    timing, growth = hub_fetch(stack, hub, server.pid, case, size, target, repeats)
                    served = served_as(server.url, case, size, target)
                    with (
                        tempfile.TemporaryDirectory() as cache_dir,
                        Client(server.url, cache=cache_dir) as cached_hub,
                    ):
                        cached, _ = hub_fetch(
                            stack, cached_hub, server.pid, case, size, target, repeats
                        )
                except Exception as exc:  # reported with the figures, fails the section
                    failures.append(
                        f"{case.label}, {size} MiB, {variant} server: {type(exc).__name__}: {exc}"
                    )
                    continue
                checkpoint_mib = nbytes(case.source) / MiB
                result_bytes = nbytes(target.state_dict())
                diy = pushed[1][case.key]
                rows.append(
                    FetchRow(
                        case.key, case.label, size, checkpoint_mib, result_bytes, variant,
                        diy, timing, growth, served, cached,
                    )
                )  # fmt: skip
    assert pushed is not None
    return SizeResult(rows, pushed[0], failures)


def _meets(value: float, target: float) -> str:
    return "yes" if value >= target else "**no**"


def fetch_table(rows: Sequence[FetchRow]) -> str:
    body = []
    for r in rows:
        goal = FETCH_TARGETS[r.key]
        first_ratio, median_ratio = r.diy.median / r.hub.first, r.diy.median / r.hub.median
        cache_ratio = r.diy.median / r.client_cached.median
        body.append(
            (
                r.label,
                r.checkpoint_mib,
                r.variant,
                r.diy.median,
                r.hub.first,
                r.hub.median,
                first_ratio,
                median_ratio,
                f">= {goal:.2f}",
                f"{_meets(first_ratio, goal)} / {_meets(median_ratio, goal)}",
                r.served,
                r.server_mib,
                r.client_cached.median,
                cache_ratio,
                _meets(cache_ratio, CLIENT_CACHE_TARGET),
            )
        )
    headers = (
        "case",
        "checkpoint MiB",
        "server",
        "DIY s (median)",
        "statehub first s",
        "statehub median s",
        "ratio first",
        "ratio median",
        "target",
        "meets (first / median)",
        "repeats served as",
        "server peak +MiB",
        "client cache repeat s (median)",
        "ratio client cache",
        f"meets >= {CLIENT_CACHE_TARGET:.0f}",
    )
    return table(headers, body)


def push_table(rows: Sequence[PushRow]) -> str:
    body = [
        (
            r.size_mib,
            r.diy_s,
            r.hub_s,
            r.diy_s / r.hub_s,
            f">= {PUSH_TARGET:.2f}",
            _meets(r.diy_s / r.hub_s, PUSH_TARGET),
            r.server_mib,
        )
        for r in rows
    ]
    headers = (
        "checkpoint MiB",
        "boto3 upload_file s",
        "statehub push s",
        "ratio",
        "target",
        "meets",
        "server peak +MiB",
    )
    return table(headers, body)


def report(
    rows: Sequence[FetchRow],
    pushes: Sequence[PushRow],
    repeats: int,
    failures: Sequence[str],
    *,
    link: dict[str, float] | None = None,
) -> Report:
    """The tables; with ``link`` (a ShapedProxy's settings) the shaped run's, fetches only."""
    if link is None:
        out = Report("fetch_vs_diy", "Fetch and push: statehub against do-it-yourself")
    else:
        out = Report(
            "fetch_vs_diy_shaped", "Fetch against do-it-yourself through a link shaped like S3"
        )
        out.add(
            f"Both roads reach the bucket through a proxy that models a real S3 endpoint: "
            f"{link['first_byte_s'] * 1000:.0f} ms before each request is forwarded (time to "
            f"first byte) and at most {link['rate'] / 1e6:.0f} MB/s per connection (one "
            "stream's bandwidth; requests in flight at once add up). The registry was filled "
            "at loopback speed. What concurrent reads buy where one stream is slow: the "
            "do-it-yourself road is one `get_object` stream."
        )
    out.add(
        "S3 protocol: moto's server on loopback; statehub on SQLite + a bucket on that server. "
        "Ratios are do-it-yourself time / statehub time: above 1 statehub is faster. "
        f"DIY: median of {repeats} fetches after a first one. statehub: `first` is the first "
        f"fetch on that server, `median` the median of the {repeats} after it.",
        "How to read (c): on the `streaming` server (the first one started) the first fetch is "
        "**cold**: the fit is computed (every tensor decoded and cast) and written to the fit "
        "cache; the repeats are **warm**, served from the cached blob. The `presign` server "
        "starts after it, so all its (c) fetches are warm. (a) needs no fit; (b) is a rewrite.",
        "Client cache: the same fetch repeated through a client with its cache on (the "
        "default), each repeat revalidated (`If-None-Match`, answered 304) and loaded from "
        "the cached body; its target is <= 0.1x do-it-yourself (a ratio of at least 10).",
        fetch_table(rows),
    )
    if link is None:
        out.add("## Push (case a: fp32 bytes new to the registry, timed once)", push_table(pushes))
    out.fail(failures)
    return out
