"""What every benchmark shares: real services, checkpoints, timing, memory and reports.

Nothing is mocked: moto's S3 server over HTTP, ``python -m service`` processes on SQLite +
that bucket, the real client.
"""

from __future__ import annotations

import os
import platform
import socket
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import psutil
import torch

from service.storage.blobs import S3BlobStore
from tests._proxy import TcpProxy
from tests._server import ServerProcess, start_server
from tests._services import S3_TEST_KEYS, MotoServer, s3_settings, start_moto_server

MiB = 1024 * 1024
WIDTH = 1024  # columns of every body tensor: 4 MiB per 1024 rows in fp32


# -- checkpoints ------------------------------------------------------------------------


def layers_for(total_mib: int) -> int:
    return max(1, total_mib // 4)


def body_state_dict(
    total_mib: int, dtype: torch.dtype, classes: int, *, seed: int
) -> dict[str, torch.Tensor]:
    """1024x1024 linear layers until ``total_mib`` of fp32, plus a classifier head.

    ``seed`` differs per checkpoint so that no two share tensors by accident (dedup would
    otherwise make later pushes look cheap).
    """
    generator = torch.Generator().manual_seed(seed)
    state = {
        f"layers.{i}.weight": torch.randn(WIDTH, WIDTH, generator=generator).to(dtype)
        for i in range(layers_for(total_mib))
    }
    state["fc.weight"] = torch.randn(classes, WIDTH, generator=generator).to(dtype)
    state["fc.bias"] = torch.randn(classes, generator=generator).to(dtype)
    return state


class LinearNet(torch.nn.Module):
    def __init__(self, layers: int, classes: int) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(
            torch.nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(layers)
        )
        self.fc = torch.nn.Linear(WIDTH, classes)


def target_net(layers: int, classes: int) -> LinearNet:
    """The model that asks for the weights. Its body lives on ``meta`` (no memory: a fetch
    only reads the target's spec and the keys it keeps); its head is real, as a fetch that
    keeps the target's head copies those tensors."""
    with torch.device("meta"):
        net = LinearNet(layers, classes)
    net.fc = torch.nn.Linear(WIDTH, classes)
    return net


def nbytes(state_dict: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state_dict.values())


def assert_state_dict(
    got: dict[str, torch.Tensor], keys: Sequence[str], expect: Callable[[str], torch.Tensor]
) -> None:
    """``got`` has exactly ``keys`` in order, and every value equals ``expect(key)``."""
    if list(got) != list(keys):
        raise AssertionError(f"keys differ: got {list(got)[:3]}..., want {list(keys)[:3]}...")
    for key in keys:
        want = expect(key)
        if got[key].dtype != want.dtype or not torch.equal(got[key], want):
            raise AssertionError(f"{key}: the fetched tensor differs from the expected one")


# -- timing -----------------------------------------------------------------------------


@dataclass
class Timing:
    """The first call and the repeats after it, timed apart: the first may be cold."""

    first: float
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples or [self.first])


def seconds(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def timed(
    fn: Callable[[], Any],
    repeats: int,
    check: Callable[[Any], None],
    settle: Callable[[], None] = lambda: None,
) -> Timing:
    """Time ``fn`` once, then ``repeats`` more times; ``check`` every result and ``settle``
    after the first call, untimed."""
    first, result = seconds(fn)
    check(result)
    del result  # the next call must not have two results alive
    settle()
    timing = Timing(first)
    for _ in range(repeats):
        elapsed, result = seconds(fn)
        check(result)
        del result
        timing.samples.append(elapsed)
    return timing


# -- memory -----------------------------------------------------------------------------


def proc_status_kib(pid: int | str, name: str) -> int:
    """A ``/proc/<pid>/status`` field such as VmRSS or VmHWM (peak RSS), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1])
    raise KeyError(name)


def wait_idle(*pids: int, busy_percent: float = 10.0, timeout: float = 60.0) -> None:
    """Until the processes stop working in the background (the fit cache uploading what a
    fetch computed keeps the server and moto busy): a repeat must measure the warm path,
    not race the cold one's tail."""
    processes = [psutil.Process(pid) for pid in pids]
    for process in processes:
        process.cpu_percent()  # the first reading only starts the interval
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.25)
        if sum(p.cpu_percent() for p in processes) <= busy_percent:
            return


class PeakGrowth:
    """Peak RSS of a process above its RSS at the start, over a ``with`` block."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.mib = float("nan")

    def __enter__(self) -> PeakGrowth:
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
        self._start = proc_status_kib(self.pid, "VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        self.mib = (proc_status_kib(self.pid, "VmHWM") - self._start) / 1024


# -- services ---------------------------------------------------------------------------


class ShapedProxy(TcpProxy):
    """moto behind a link shaped like a real S3 endpoint's, for both roads alike: each
    request waits ``first_byte_s`` before it is forwarded (the time to first byte), and
    each connection's answers flow at most ``rate`` bytes/s (one stream's bandwidth), so
    requests in flight at once add up where one stream cannot. ``shaping`` off forwards
    as is (the pushes that fill the registry)."""

    def __init__(self, target: tuple[str, int], *, first_byte_s: float, rate: float) -> None:
        self.first_byte_s = first_byte_s
        self.rate = rate
        self.shaping = True
        self._requesting: set[socket.socket] = set()  # clients whose request is under way
        super().__init__(target)

    def _on_chunk(self, source: socket.socket, sink: socket.socket, data: bytes) -> None:
        try:
            request = sink.getpeername() == self.target  # client -> store
        except OSError:
            return
        if request:
            # The first chunk after an answer starts a request: it waits for its first byte.
            if self.shaping and source not in self._requesting:
                self._requesting.add(source)
                time.sleep(self.first_byte_s)
            return
        self._requesting.discard(sink)
        if self.shaping:
            time.sleep(len(data) / self.rate)


class Stack:
    """One S3 bucket on the shared moto server and one data dir: servers started on it
    one after another (with different settings) see the same registry. Through a
    ``ShapedProxy``, both statehub and the do-it-yourself road reach the bucket by it."""

    def __init__(self, moto: MotoServer, data_dir: Path, proxy: ShapedProxy | None = None) -> None:
        self.proxy = proxy
        self.endpoint = f"http://{proxy.address}" if proxy else moto.endpoint
        self.moto_pid = moto.process.pid
        self.busy_pids: tuple[int, ...] = (self.moto_pid,)  # and the server, once started
        self.bucket = f"bench-{uuid.uuid4().hex[:8]}"
        self.data_dir = data_dir
        S3BlobStore(s3_settings(self.endpoint, self.bucket)).ensure_bucket()
        self.s3 = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=S3_TEST_KEYS["s3_access_key_id"],
            aws_secret_access_key=S3_TEST_KEYS["s3_secret_access_key"],
        )

    @contextmanager
    def server(self, **settings: str) -> Iterator[ServerProcess]:
        """``python -m service`` on this stack; ``settings`` as STATEHUB_<NAME> variables."""
        env = {
            "STATEHUB_DATA_DIR": str(self.data_dir),
            "STATEHUB_S3_ENDPOINT": self.endpoint,
            "STATEHUB_S3_BUCKET": self.bucket,
            "STATEHUB_S3_ACCESS_KEY_ID": S3_TEST_KEYS["s3_access_key_id"],
            "STATEHUB_S3_SECRET_ACCESS_KEY": S3_TEST_KEYS["s3_secret_access_key"],
            **{f"STATEHUB_{k.upper()}": v for k, v in settings.items()},
        }
        process = start_server(env)
        self.busy_pids = (process.pid, self.moto_pid)
        try:
            yield process
        finally:
            process.stop()

    @contextmanager
    def unshaped(self) -> Iterator[None]:
        """The link at loopback speed for a while (filling the registry is not measured)."""
        if self.proxy is None:
            yield
            return
        self.proxy.shaping = False
        try:
            yield
        finally:
            self.proxy.shaping = True

    def stored_bytes(self, prefix: str = "") -> int:
        """Sum of the sizes of the bucket's objects: what the registry actually stores."""
        total = 0
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        for page in pages:
            total += sum(item["Size"] for item in page.get("Contents", []))
        return total


class Services:
    """moto's server and a scratch directory for the whole run; ``stack()`` adds buckets."""

    def __init__(self) -> None:
        self._exit = ExitStack()

    def __enter__(self) -> Services:
        self.scratch = Path(self._exit.enter_context(tempfile.TemporaryDirectory()))
        self.moto = start_moto_server()
        self._exit.callback(self.moto.stop)
        return self

    def __exit__(self, *exc: object) -> None:
        self._exit.close()

    def stack(self, shaped: dict[str, float] | None = None) -> Stack:
        """A bucket of its own; ``shaped`` (``first_byte_s``, ``rate``) puts a
        ``ShapedProxy`` between it and everything that reads it."""
        proxy = None
        if shaped is not None:
            host, port = self.moto.endpoint.removeprefix("http://").split(":")
            proxy = ShapedProxy((host, int(port)), **shaped)
            self._exit.callback(proxy.close)
        return Stack(self.moto, Path(tempfile.mkdtemp(dir=self.scratch)), proxy)


# -- reports ----------------------------------------------------------------------------


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{platform.system()} {platform.machine()} ({cpu}), {os.cpu_count()} cores, "
        f"{memory:.0f} GiB RAM, Python {platform.python_version()}, torch {torch.__version__}"
    )


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; numeric columns right-aligned."""
    numeric = [all(isinstance(r[i], int | float) for r in rows) for i in range(len(headers))]
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---:" if n else "---" for n in numeric) + "|",
    ]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


@dataclass
class Report:
    """One results file: a title, the tables, and notes that say how to read them."""

    name: str
    title: str
    body: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # any: the run exits non-zero

    def add(self, *blocks: str) -> None:
        self.body.extend(blocks)

    def fail(self, failures: Sequence[str]) -> None:
        if failures:
            self.failures.extend(failures)
            self.add("## Failures", "\n".join(f"- {f}" for f in failures))

    def render(self, *, machine_line: str, command: str) -> str:
        head = [f"# {self.title}", "", f"Machine: {machine_line}.", f"Command: `{command}`."]
        return "\n\n".join(["\n".join(head), *self.body]) + "\n"
