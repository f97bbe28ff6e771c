"""One fetch in a fresh process, reporting the client's peak RSS growth during it (JSON).

Run by tests/client/test_meta_targets.py: a process of its own, so memory freed by earlier
tests cannot be reused and hide a whole extra state_dict. Modes: ``in_place`` (a CPU model,
``load=True``), ``assign`` (a model built on ``meta``, ``load=True, assign=True``) and
``dict`` (a CPU model, ``load=False``, the returned dict kept).
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch
from torch import nn

from statehub import Client

LAYERS, WIDTH = 8, 2560  # 8 x 25 MiB fp32 weights: a 200 MiB model


def model() -> nn.Module:
    return nn.Sequential(*(nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(LAYERS)))


def status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/self/status")


def main(url: str, ref: str, mode: str) -> None:
    if mode == "assign":
        with torch.device("meta"):
            target = model()
    else:
        target = model()
    with Client(url, retries=1) as hub:
        hub.version(ref)  # the connection and imports warm before measuring
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
        baseline = status("VmRSS")
        result = hub.fetch(ref, target=target, load=mode != "dict", assign=mode == "assign")
        growth = status("VmHWM") - baseline
    weights = result.values() if mode == "dict" else target.state_dict().values()
    print(
        json.dumps(
            {
                "growth": growth,
                "checksum": float(sum(t.double().sum() for t in weights)),
                "on_meta": [n for n, p in target.named_parameters() if p.is_meta],
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
