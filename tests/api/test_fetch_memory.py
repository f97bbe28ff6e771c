"""A fetch streams: the server's memory grows by O(largest tensor), not O(checkpoint)."""

from __future__ import annotations

from pathlib import Path

import torch

from statehub import Client
from tests._server import ServerProcess

MiB = 1024 * 1024
TENSORS = 48
ROWS, COLS = 1024, 4096  # 8 MiB per tensor in fp16, 16 MiB once cast to fp32
ALLOWED_GROWTH = 150 * MiB


def reset_peak_rss(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def fetch_measuring_growth(
    hub: Client, server: ServerProcess, ref: str, target: dict[str, object]
) -> dict[str, torch.Tensor]:
    """Fetch ``ref`` into ``target``; assert the server's peak RSS grew by under the bound."""
    reset_peak_rss(server.pid)
    baseline = server.rss_bytes()
    fitted = hub.fetch(ref, target=target)
    growth = server.rss_peak_bytes() - baseline
    assert growth < ALLOWED_GROWTH, f"server grew by {growth / MiB:.0f} MiB"
    return fitted


def test_transforming_fetch_of_a_large_checkpoint_keeps_server_memory_flat(
    hub: Client, server: ServerProcess, ns: str
) -> None:
    generator = torch.Generator().manual_seed(0)
    source = {
        f"layers.{i}.weight": torch.randn(ROWS, COLS, generator=generator).half()
        for i in range(TENSORS)
    }
    checkpoint_bytes = sum(t.numel() * t.element_size() for t in source.values())
    assert checkpoint_bytes == 384 * MiB
    hub.push(f"{ns}/big", source)

    target = {
        "tensors": [{"key": k, "shape": [ROWS, COLS], "dtype": "F32"} for k in source],
        "tie_groups": [],
    }
    fitted = fetch_measuring_growth(hub, server, f"{ns}/big", target)

    assert checkpoint_bytes > 2 * ALLOWED_GROWTH
    assert list(fitted) == list(source)
    for key in ("layers.0.weight", f"layers.{TENSORS - 1}.weight"):
        assert fitted[key].dtype == torch.float32
        assert torch.equal(fitted[key], source[key].float())


def test_a_cast_of_one_tensor_far_over_the_memory_bound_is_computed_a_piece_at_a_time(
    hub: Client, server: ServerProcess, ns: str
) -> None:
    # An lm_head-shaped bf16 tensor (the scale benchmark's fp32 fetch grew the server by
    # 4 GiB): cast whole, the server held its 384 MiB source and its 768 MiB cast.
    rows, cols = 48 * 1024, 4096
    generator = torch.Generator().manual_seed(1)
    head = torch.randn(rows, cols, generator=generator).to(torch.bfloat16)
    source = {"lm_head.weight": head, "norm.weight": torch.ones(cols, dtype=torch.bfloat16)}
    assert head.numel() * head.element_size() == 384 * MiB
    hub.push(f"{ns}/head", source)
    target = {
        "tensors": [
            {"key": "lm_head.weight", "shape": [rows, cols], "dtype": "F32"},
            {"key": "norm.weight", "shape": [cols], "dtype": "F32"},
        ],
        "tie_groups": [],
    }

    fitted = fetch_measuring_growth(hub, server, f"{ns}/head", target)

    assert fitted["lm_head.weight"].dtype == torch.float32
    assert torch.equal(fitted["lm_head.weight"], head.float())
    assert torch.equal(fitted["norm.weight"], torch.ones(cols))
