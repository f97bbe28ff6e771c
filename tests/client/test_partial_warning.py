"""A fetch that keeps target keys says so (issue 15 item 3), on both backends: a
StatehubWarning names the kept keys and the checkpoint tensors left unused, with and without
``load``; ``on_missing="keep"`` given explicitly silences it; an exact fetch warns nothing."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from statehub import Client, StatehubWarning
from tests._models import seeded


class Net(nn.Module):
    def __init__(self, extra: str, size: int) -> None:
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.add_module(extra, nn.Linear(8, size))


def statehub_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, StatehubWarning)]


@pytest.mark.parametrize("load", [False, True], ids=["dict", "load"])
def test_a_partial_fetch_warns_naming_kept_and_unused_keys(
    hub: Client, ns: str, load: bool
) -> None:
    seeded(0)
    source = Net("probe", 3)
    hub.push(f"{ns}/net", source)
    target = Net("classifier", 5)
    own = target.classifier.weight.detach().clone()
    with pytest.warns(StatehubWarning) as caught:
        sd = hub.fetch(f"{ns}/net", target=target, load=load)
    message = str(caught[0].message)
    assert f"fetch of {ns}/net kept 2 key(s)" in message
    assert "classifier.weight, classifier.bias" in message
    assert "not used: probe.weight, probe.bias" in message
    assert 'on_missing="keep"' in message
    assert torch.equal(sd["classifier.weight"], own)  # what the warning is about
    assert torch.equal(sd["body.weight"], source.body.weight)


def test_an_explicit_keep_policy_and_an_exact_fetch_warn_nothing(hub: Client, ns: str) -> None:
    seeded(1)
    source = Net("probe", 3)
    hub.push(f"{ns}/net", source)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kept = hub.fetch(f"{ns}/net", target=Net("classifier", 5), on_missing="keep")
        exact = hub.fetch(f"{ns}/net", target=Net("probe", 3))
    assert statehub_warnings(caught) == []
    assert "classifier.weight" in kept and torch.equal(exact["probe.weight"], source.probe.weight)
