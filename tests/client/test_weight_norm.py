"""torch's two forms of weight normalisation (issue 15): a checkpoint saved with the legacy
``torch.nn.utils.weight_norm`` (``weight_g`` / ``weight_v``) fetched into a model built with
``torch.nn.utils.parametrizations.weight_norm`` (``parametrizations.weight.original0/1``),
and the other way round, with no adapter named, on both backends: the strict load gives the
source model's outputs. Before, the plan was ``partial`` and kept the model's random values."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from statehub import Client
from tests._models import seeded


class Decoder(nn.Module):
    """Shaped like torchfcpe's: a weight-normalised projection between plain layers."""

    def __init__(self, *, legacy: bool) -> None:
        super().__init__()
        self.input_proj = nn.Conv1d(4, 16, 3, padding=1)
        self.norm = nn.LayerNorm(16)
        conv = nn.Conv1d(16, 8, 3, padding=1)
        if legacy:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # deprecated, still saved
                self.output_proj = torch.nn.utils.weight_norm(conv)
        else:
            self.output_proj = torch.nn.utils.parametrizations.weight_norm(conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.input_proj(x).transpose(1, 2)).transpose(1, 2)
        return self.output_proj(torch.relu(h))


def trained(*, legacy: bool) -> Decoder:
    seeded(3)
    model = Decoder(legacy=legacy)
    with torch.no_grad():  # perturbed: no fresh init of either form matches
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return model.eval()


@pytest.mark.parametrize("source_legacy", [True, False], ids=["legacy-to-param", "param-to-legacy"])
def test_weight_norm_forms_load_into_each_other_with_the_source_outputs(
    hub: Client, ns: str, source_legacy: bool
) -> None:
    source = trained(legacy=source_legacy)
    hub.push(f"{ns}/decoder", source)
    seeded(99)
    target = Decoder(legacy=not source_legacy).eval()
    x = torch.randn(2, 4, 10, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(target(x), source(x))

    plan = hub.plan(f"{ns}/decoder", target=target)
    assert plan.keep_target == [] and plan.unused == []
    wn = [e for e in plan.entries if e.stage == "normalized"]
    assert len(wn) == 2 and all("weight norm" in e.rule for e in wn)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing kept, nothing to warn about
        sd = hub.fetch(f"{ns}/decoder", target=target)
    target.load_state_dict(sd, strict=True)
    g, v = ("weight_g", "weight_v") if not source_legacy else ("original0", "original1")
    src_sd = source.state_dict()
    src_g = next(t for k, t in src_sd.items() if k.endswith(("weight_g", "original0")))
    assert torch.equal(next(t for k, t in sd.items() if k.endswith(g)), src_g)
    assert any(k.endswith(v) for k in sd)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)
