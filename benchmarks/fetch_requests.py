"""S3 requests and time of a fetch of a checkpoint shaped like a real one, against DIY.

    python -m benchmarks.fetch_requests                 # ResNet-50 (320 tensors, ~98 MiB fp32)
    python -m benchmarks.fetch_requests --width 16 --repeats 1   # a quick look
    python -m benchmarks.fetch_requests --delay-ms 2    # every forwarded chunk delayed

Both sides read the same moto server through one counting loopback proxy, which sees every
request: statehub's server (SQLite + the bucket, fit cache off so every fetch computes its
body) and boto3 ``get_object`` + ``safetensors.torch.load`` + the fix-up by hand. Cases:
exact, rename-only (a DataParallel ``module.`` checkpoint) and head reset + fp16 -> fp32 (1000
classes into 30). Every fetched tensor is compared with the expected one. Printed as markdown;
``--out`` writes it to a file too.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import boto3
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from benchmarks.harness import MiB, machine, table
from service.storage.blobs import S3BlobStore
from statehub import Client
from tests._counting import CountingProxy
from tests._server import start_server
from tests._services import S3_TEST_KEYS, s3_settings, start_moto_server
from tests._shapes import resnet50_like

DEFAULT_PART = 8 * MiB  # STATEHUB_FETCH_READ_PART's default


@dataclass
class Case:
    name: str
    source: dict[str, torch.Tensor]  # what is stored
    target: dict[str, torch.Tensor]  # the model's state_dict (what fetch is given)
    expected: dict[str, torch.Tensor]
    fix: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]  # the hand fix-up


def cases(width: int) -> list[Case]:
    model = resnet50_like(width=width, seed=1)
    renamed = resnet50_like(width=width, seed=4)  # not the exact case's bytes: no dedup
    half = resnet50_like(width=width, dtype=torch.float16, seed=2)
    small_head = resnet50_like(width=width, classes=30, seed=3)
    cast = {k: v.float() if v.is_floating_point() else v for k, v in half.items()}
    cast |= {k: small_head[k] for k in ("fc.weight", "fc.bias")}

    def head_and_cast(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
        return out | {k: small_head[k] for k in ("fc.weight", "fc.bias")}

    return [
        Case("exact", model, model, model, lambda sd: sd),
        Case(
            "rename-only",
            {f"module.{k}": v for k, v in renamed.items()},
            renamed,
            renamed,
            lambda sd: {k.removeprefix("module."): v for k, v in sd.items()},
        ),
        Case("head reset + cast", half, small_head, cast, head_and_cast),
    ]


def check(got: dict[str, torch.Tensor], case: Case) -> None:
    if set(got) != set(case.expected):
        raise AssertionError(f"{case.name}: keys differ")
    for key, want in case.expected.items():
        if got[key].dtype != want.dtype or not torch.equal(got[key], want):
            raise AssertionError(f"{case.name}: {key} differs from the expected tensor")


def timed(fn: Callable[[], dict[str, torch.Tensor]], case: Case, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        got = fn()
        samples.append(time.perf_counter() - started)
        check(got, case)
        del got
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=64, help="ResNet-50 base width (64: real)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--part", type=int, default=DEFAULT_PART, help="bytes per read part")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="per forwarded chunk")
    parser.add_argument("--out", type=Path, default=None)
    opts = parser.parse_args(argv)

    moto = start_moto_server()
    host, port = moto.endpoint.removeprefix("http://").split(":")
    proxy = CountingProxy((host, int(port)))
    endpoint = f"http://{proxy.address}"
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    S3BlobStore(s3_settings(endpoint, bucket)).ensure_bucket()
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=S3_TEST_KEYS["s3_access_key_id"],
        aws_secret_access_key=S3_TEST_KEYS["s3_secret_access_key"],
    )
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        server = start_server(
            {
                "STATEHUB_DATA_DIR": scratch,
                "STATEHUB_S3_ENDPOINT": endpoint,
                "STATEHUB_S3_BUCKET": bucket,
                "STATEHUB_S3_ACCESS_KEY_ID": S3_TEST_KEYS["s3_access_key_id"],
                "STATEHUB_S3_SECRET_ACCESS_KEY": S3_TEST_KEYS["s3_secret_access_key"],
                "STATEHUB_FIT_CACHE": "false",
                "STATEHUB_FETCH_READ_PART": str(opts.part),
            }
        )
        try:
            with Client(server.url, cache=False) as hub:
                for number, case in enumerate(cases(opts.width)):
                    raw = st_save(case.source)
                    path = Path(scratch) / f"case{number}.safetensors"
                    path.write_bytes(raw)
                    ref = f"bench/case{number}"
                    hub.push(ref, path)
                    key = f"diy/case{number}.safetensors"
                    s3.put_object(Bucket=bucket, Key=key, Body=raw)
                    del raw
                    proxy.delay = opts.delay_ms / 1000

                    def diy(key: str = key, case: Case = case) -> dict[str, torch.Tensor]:
                        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
                        return case.fix(st_load(body))

                    def statehub(ref: str = ref, case: Case = case) -> dict[str, torch.Tensor]:
                        return hub.fetch(ref, target=case.target)

                    before = len(proxy.requests("/blobs/")), len(proxy.requests(key))
                    diy_s = timed(diy, case, opts.repeats)
                    hub_s = timed(statehub, case, opts.repeats)
                    hub_requests = (len(proxy.requests("/blobs/")) - before[0]) / opts.repeats
                    diy_requests = (len(proxy.requests(key)) - before[1]) / opts.repeats
                    proxy.delay = 0.0
                    stored = path.stat().st_size
                    rows.append(
                        (
                            case.name,
                            len(case.source),
                            stored / MiB,
                            hub_requests,
                            math.ceil(stored / opts.part) + 2,
                            diy_requests,
                            hub_s,
                            diy_s,
                            hub_s / diy_s,
                        )
                    )
                    path.unlink()
        finally:
            server.stop()
            proxy.close()
            moto.stop()
    headers = (
        "case",
        "tensors",
        "checkpoint MiB",
        "statehub S3 requests / fetch",
        "bound ceil(bytes/part)+2",
        "DIY S3 requests",
        "statehub s (median)",
        "DIY s (median)",
        "statehub / DIY",
    )
    text = "\n\n".join(
        [
            "# Fetch of a ResNet-50-shaped checkpoint: S3 requests and time",
            f"Machine: {machine()}.",
            f"Command: `python -m benchmarks.fetch_requests {' '.join(sys.argv[1:])}`. "
            f"Width {opts.width}, part {opts.part / MiB:g} MiB, delay {opts.delay_ms:g} ms per "
            f"forwarded chunk, median of {opts.repeats}; the fit cache is off.",
            table(headers, rows),
        ]
    )
    print(text)
    if opts.out is not None:
        opts.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
