"""The client's loading paths: a deduplicated push copies each tensor to the host once."""

from __future__ import annotations

import torch

from statehub import _dedup, _tensors


def test_a_deduplicated_push_copies_each_tensor_to_the_host_once(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # A non-contiguous CPU tensor takes the path a GPU tensor takes (`.to("cpu").contiguous()`
    # makes new storage); a copy is counted when the result's storage is not the input's.
    copies: list[int] = []
    original = _tensors._contiguous_cpu

    def counting(tensor: torch.Tensor) -> torch.Tensor:
        out = original(tensor)
        if out.untyped_storage().data_ptr() != tensor.untyped_storage().data_ptr():
            copies.append(out.numel())
        return out

    monkeypatch.setattr(_tensors, "_contiguous_cpu", counting)
    monkeypatch.setattr(_dedup, "_contiguous_cpu", counting)
    items = [(f"w{i}", torch.randn(64, 32).T) for i in range(3)]
    pushable = _dedup.of_state_dict(items)
    for key, tensor in items:
        assert pushable.read(key) == tensor.contiguous().numpy().tobytes()
    pushable.file_digest()
    assert len(copies) == len(items)
