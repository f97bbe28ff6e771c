"""Push through the server against a direct push to the store, beside boto3 ``upload_file``.

A checkpoint shaped like a real one (hundreds of tensors of mixed sizes: convolutions with
small normalisation vectors between them), new to the registry each time, pushed as a
``.safetensors`` file three ways on one SQLite + S3 (moto) stack: ``upload_file`` of the
file (the do-it-yourself road), ``Client.push`` through the server (``direct_push`` off),
and ``Client.push`` straight to the bucket (``direct_push`` on: presigned parts, then the
server reads the upload back to check its sha256 and copies it into place). Then the same
through a link shaped like S3 between everything and the bucket.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from benchmarks.harness import PeakGrowth, Report, Stack, seconds, table, wait_idle
from statehub import Client

MiB = 1024 * 1024


@dataclass
class PushTimes:
    link: str
    mib: float
    tensors: int
    diy_s: float
    proxied_s: float
    direct_s: float
    proxied_server_mib: float
    direct_server_mib: float


def checkpoint(total_mib: int, seed: int) -> dict[str, torch.Tensor]:
    """ResNet-like: 3x3 convolutions of growing width, each with its 4 norm vectors."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    budget, i = total_mib * MiB, 0
    while budget > 0:
        width = (64, 128, 256, 512)[i % 4]
        conv = torch.randn(width, width, 3, 3, generator=generator)
        state[f"layer{i}.conv.weight"] = conv
        for name in ("weight", "bias", "running_mean", "running_var"):
            state[f"layer{i}.bn.{name}"] = torch.randn(width, generator=generator)
        budget -= conv.nbytes + 4 * width * 4
        i += 1
    return state


def measure(stack: Stack, total_mib: int, *, link: str, seed: int) -> PushTimes:
    with tempfile.TemporaryDirectory(dir=stack.data_dir) as scratch:
        paths = []
        for offset in range(3):  # new bytes for each road: nothing deduplicated
            state = checkpoint(total_mib, seed + offset)
            paths.append(Path(scratch) / f"m{offset}.safetensors")
            save_file(state, paths[-1])
        wait_idle(*stack.busy_pids)
        diy_s, _ = seconds(lambda: stack.s3.upload_file(str(paths[0]), stack.bucket, "diy/m"))
        times, growth = [], []
        for road, path in (("false", paths[1]), ("true", paths[2])):
            with stack.server(direct_push=road) as server, Client(server.url, cache=False) as hub:
                wait_idle(*stack.busy_pids)
                with PeakGrowth(server.pid) as peak:
                    elapsed, _ = seconds(lambda: hub.push(f"bench/push-{road}", path))  # noqa: B023
                times.append(elapsed)
                growth.append(peak.mib)
        size = paths[0].stat().st_size / MiB
    return PushTimes(link, size, len(state), diy_s, *times, *growth)


def report(rows: list[PushTimes]) -> Report:
    out = Report("push_direct", "Push: through the server, or straight to the store")
    out.add(
        (__doc__ or "").split("\n\n", 1)[1].replace("\n", " ").strip(),
        "Ratios are statehub time / `upload_file` time (below 1 statehub is faster). Server "
        "peak: VmHWM growth of the server process during the push.",
        table(
            (
                "link",
                "MiB",
                "tensors",
                "upload_file s",
                "through server s",
                "direct s",
                "through server / DIY",
                "direct / DIY",
                "server peak +MiB (through / direct)",
            ),
            [
                (
                    r.link,
                    r.mib,
                    r.tensors,
                    r.diy_s,
                    r.proxied_s,
                    r.direct_s,
                    r.proxied_s / r.diy_s,
                    r.direct_s / r.diy_s,
                    f"{r.proxied_server_mib:.1f} / {r.direct_server_mib:.1f}",
                )
                for r in rows
            ],
        ),
    )
    return out
