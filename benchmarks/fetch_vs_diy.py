"""statehub fetch and push against the do-it-yourself alternative, side by side in one run.

Do-it-yourself: boto3 ``get_object`` of the same checkpoint (a ``torch.save`` file) from the
same S3-protocol server, ``torch.load(weights_only=True)``, and a hand-written fix-up.
statehub: ``Client.fetch(ref, target=model)`` from a server whose blobs live in that S3
server. Both end with a state_dict that loads strictly into the target.

Cases: (a) the target needs nothing, (b) renames only (a DataParallel checkpoint),
(c) a head reset and a dtype cast (fp16 checkpoint with 1000 classes into an fp32 model with
30). Push: ``Client.push`` of the state_dict against boto3 ``upload_file`` of the .pth.

    python -m benchmarks.fetch_vs_diy [--sizes 100,1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import boto3
import httpx
import torch

from service.storage.blobs import S3BlobStore
from statehub import Client
from tests._services import S3_TEST_KEYS, free_port, s3_settings, start_moto_server

MiB = 1024 * 1024
RESULTS = Path(__file__).parent / "results" / "fetch_vs_diy.md"
WIDTH = 1024  # columns of every body tensor: 4 MiB per 1024 rows in fp32


def body_state_dict(total_mib: int, dtype: torch.dtype, classes: int) -> dict[str, torch.Tensor]:
    """Linear layers of 1024x1024 until ``total_mib`` of fp32, plus a classifier head."""
    generator = torch.Generator().manual_seed(0)
    layers = max(1, total_mib // 4)
    state = {
        f"layers.{i}.weight": torch.randn(WIDTH, WIDTH, generator=generator).to(dtype)
        for i in range(layers)
    }
    state["fc.weight"] = torch.randn(classes, WIDTH, generator=generator).to(dtype)
    state["fc.bias"] = torch.zeros(classes, dtype=dtype)
    return state


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: connection pools, page cache, allocator
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def once_seconds(fn: Callable[[], object]) -> float:
    """A push is timed once: a second identical push is deduplicated, so not comparable."""
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def start_statehub(env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    full = {**os.environ, **env, "STATEHUB_PORT": str(port)}
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "--log-level", "warning"], env=full
    )
    for _ in range(300):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    process.kill()
    raise RuntimeError("statehub did not start")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def current_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Bench:
    def __init__(self, endpoint: str, bucket: str, hub: Client, server_pid: int) -> None:
        self.s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id=S3_TEST_KEYS["s3_access_key_id"],
            aws_secret_access_key=S3_TEST_KEYS["s3_secret_access_key"],
        )
        self.bucket = bucket
        self.hub = hub
        self.server_pid = server_pid

    def diy_fetch(self, key: str, fix: Callable[[dict[str, torch.Tensor]], dict]) -> dict:
        body = self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        return fix(torch.load(io.BytesIO(body), weights_only=True, map_location="cpu"))

    def case(
        self, label: str, size: int, source: dict, target: torch.nn.Module, fix, repeats: int
    ) -> dict[str, object]:
        name = f"bench/{label.split()[0]}-{size}-{uuid.uuid4().hex[:6]}"
        key = f"diy/{name}.pth"
        with tempfile.NamedTemporaryFile(suffix=".pth") as handle:
            torch.save(source, handle.name)
            push_statehub = median_seconds(lambda: self.hub.push(name, source), 1)
            push_diy = median_seconds(lambda: self.s3.upload_file(handle.name, self.bucket, key), 1)
            nbytes = os.path.getsize(handle.name)
        expected = self.diy_fetch(key, fix)
        fitted = self.hub.fetch(name, target=target)
        assert list(fitted) == list(target.state_dict())
        for k in expected:  # both roads lead to the same weights
            assert torch.equal(fitted[k], expected[k].to(fitted[k].dtype)), k
        diy = median_seconds(lambda: self.diy_fetch(key, fix), repeats)
        baseline = current_rss_mib(self.server_pid)
        reset_peak(self.server_pid)
        ours = median_seconds(lambda: self.hub.fetch(name, target=target), repeats)
        server_growth = peak_rss_mib(self.server_pid) - baseline
        return {
            "case": label,
            "size_mib": nbytes / MiB,
            "diy_s": diy,
            "statehub_s": ours,
            "fetch_ratio": diy / ours,
            "push_ratio": push_diy / push_statehub,
            "server_growth_mib": server_growth,
        }


class LinearNet(torch.nn.Module):
    def __init__(self, layers: int, classes: int) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(
            torch.nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(layers)
        )
        self.fc = torch.nn.Linear(WIDTH, classes)


def run(sizes: list[int], repeats: int) -> list[dict[str, object]]:
    moto = start_moto_server()
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    S3BlobStore(s3_settings(moto.endpoint, bucket)).ensure_bucket()
    port = free_port()
    with tempfile.TemporaryDirectory() as data_dir:
        env = {
            "STATEHUB_DATA_DIR": data_dir,
            "STATEHUB_S3_ENDPOINT": moto.endpoint,
            "STATEHUB_S3_BUCKET": bucket,
            "STATEHUB_S3_ACCESS_KEY_ID": S3_TEST_KEYS["s3_access_key_id"],
            "STATEHUB_S3_SECRET_ACCESS_KEY": S3_TEST_KEYS["s3_secret_access_key"],
        }
        server = start_statehub(env, port)
        rows = []
        try:
            with Client(f"http://127.0.0.1:{port}") as hub:
                bench = Bench(moto.endpoint, bucket, hub, server.pid)
                for size in sizes:
                    layers = max(1, size // 4)
                    plain = body_state_dict(size, torch.float32, 30)
                    target = LinearNet(layers, 30)
                    rows.append(bench.case("a exact", size, plain, target, lambda sd: sd, repeats))
                    wrapped = {f"module.{k}": v for k, v in plain.items()}
                    rows.append(
                        bench.case(
                            "b renames",
                            size,
                            wrapped,
                            target,
                            lambda sd: {k.removeprefix("module."): v for k, v in sd.items()},
                            repeats,
                        )
                    )
                    half = body_state_dict(size, torch.float16, 1000)
                    own = target.state_dict()

                    def head_and_cast(sd: dict, own: dict = own) -> dict:
                        fixed = {k: v.float() for k, v in sd.items() if not k.startswith("fc.")}
                        return fixed | {k: v for k, v in own.items() if k.startswith("fc.")}

                    rows.append(
                        bench.case("c head+cast", size, half, target, head_and_cast, repeats)
                    )
                    del plain, wrapped, half
        finally:
            server.terminate()
            server.wait()
            moto.stop()
    return rows


def report(rows: list[dict[str, object]], repeats: int) -> str:
    lines = [
        "# Fetch and push: statehub against do-it-yourself",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, torch {torch.__version__}; S3 protocol: moto's server "
        "on loopback; statehub on SQLite + that S3 bucket. Median of "
        f"{repeats} fetches after a warm-up; one push each.",
        "Command: `python -m benchmarks.fetch_vs_diy`.",
        "",
        "Ratios are do-it-yourself time / statehub time: above 1 statehub is faster.",
        "",
        "| case | checkpoint MiB | DIY fetch s | statehub fetch s | fetch ratio | push ratio "
        "| server peak growth MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['size_mib']:.0f} | {r['diy_s']:.2f} | {r['statehub_s']:.2f} "
            f"| {r['fetch_ratio']:.2f} | {r['push_ratio']:.2f} | {r['server_growth_mib']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="100,1000", help="checkpoint sizes in MiB")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = run([int(s) for s in args.sizes.split(",")], args.repeats)
    text = report(rows, args.repeats)
    RESULTS.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
