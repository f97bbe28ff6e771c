"""Tensors far over the JSON body limit (32 MiB) through the routes that carry tensor bytes.

A fine-tune whose new tensor is 200 MiB takes the deduplicated push (``PUT .../tensors/
{sha256}``), stores only its new bytes and reads back equal, on both backends.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from statehub import Client
from tests._metrics import scrape
from tests.api.conftest import Deployment

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def server(deployment: Deployment) -> Any:
    # A 16 MiB backbone shares under half the bytes: let the client compose anyway.
    return deployment.start(STATEHUB_DEDUP_MIN_SHARED_FRACTION="0.05")


@pytest.fixture
def hub(server: Any) -> Any:
    with Client(server.url, retries=1) as client:
        yield client


def pushed_bytes(url: str) -> float:
    return scrape(url).get(("statehub_push_bytes_total", frozenset()), 0.0)


@pytest.mark.slow
def test_a_deduplicated_push_with_a_200_mib_new_tensor(
    deployment: Deployment, server: Any, hub: Client, ns: str
) -> None:
    generator = torch.Generator().manual_seed(13)
    base = {f"encoder.{i}.weight": torch.randn(1024, 1024, generator=generator) for i in range(4)}
    hub.push(f"{ns}/big", base)
    head = torch.randn(50 * 1024, 1024, generator=generator)  # 200 MiB of fp32
    assert head.nbytes == 200 * MiB
    tuned = base | {"head.weight": head}

    stored_before = sum(blob.size for blob in deployment.store().iter_stored())
    sent_before = pushed_bytes(server.url)
    version = hub.push(f"{ns}/big", tuned)
    storage = version.ingest["storage"]
    assert storage["composed"] is True
    assert pushed_bytes(server.url) - sent_before == head.nbytes  # only the new tensor moved
    stored = sum(blob.size for blob in deployment.store().iter_stored()) - stored_before
    assert head.nbytes <= stored <= head.nbytes + 64 * 1024  # the new tensor and a header

    fetched = hub.fetch(f"{ns}/big:2", target=tuned)
    assert fetched.keys() == tuned.keys()
    assert all(torch.equal(fetched[k], tuned[k]) for k in tuned)
    del fetched
