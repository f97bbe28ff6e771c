"""Checkpoints shaped like real ones: hundreds of tensors of mixed sizes, tiny BatchNorm
vectors and int64 counters between the convolutions (benchmarks of a few dozen equal 4 MiB
tensors hide per-tensor costs)."""

from __future__ import annotations

import torch

RESNET50_BLOCKS = (3, 4, 6, 3)


def resnet50_like(
    *, width: int = 64, classes: int = 1000, dtype: torch.dtype = torch.float32, seed: int = 0
) -> dict[str, torch.Tensor]:
    """ResNet-50's 320 state_dict entries in its order (torchvision's names and shapes at
    base ``width``; 64 is the real model, about 100 MB in fp32)."""
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}

    def conv(name: str, cout: int, cin: int, k: int) -> None:
        out[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=generator).to(dtype)

    def bn(name: str, n: int) -> None:
        for stat in ("weight", "bias", "running_mean", "running_var"):
            out[f"{name}.{stat}"] = torch.randn(n, generator=generator).to(dtype)
        out[f"{name}.num_batches_tracked"] = torch.tensor(7, dtype=torch.int64)

    conv("conv1", width, 3, 7)
    bn("bn1", width)
    cin = width
    for layer, blocks in enumerate(RESNET50_BLOCKS, start=1):
        mid = width * 2 ** (layer - 1)
        for block in range(blocks):
            name = f"layer{layer}.{block}"
            conv(f"{name}.conv1", mid, cin, 1)
            bn(f"{name}.bn1", mid)
            conv(f"{name}.conv2", mid, mid, 3)
            bn(f"{name}.bn2", mid)
            conv(f"{name}.conv3", mid * 4, mid, 1)
            bn(f"{name}.bn3", mid * 4)
            if block == 0:
                conv(f"{name}.downsample.0", mid * 4, cin, 1)
                bn(f"{name}.downsample.1", mid * 4)
            cin = mid * 4
    out["fc.weight"] = torch.randn(classes, cin, generator=generator).to(dtype)
    out["fc.bias"] = torch.randn(classes, generator=generator).to(dtype)
    assert len(out) == 320
    return out


def spec_json(state_dict: dict[str, torch.Tensor]) -> dict[str, object]:
    """A fetch target's spec for ``state_dict`` (fp32 for floating tensors: a cast target)."""
    codes = {torch.float32: "F32", torch.float16: "F16", torch.int64: "I64"}
    return {
        "tensors": [
            {"key": k, "shape": list(v.shape), "dtype": codes[v.dtype]}
            for k, v in state_dict.items()
        ],
        "tie_groups": [],
    }
