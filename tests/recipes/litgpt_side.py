"""Runs under litgpt's own interpreter (``.venv-litgpt``: litgpt pins a huggingface_hub
that transformers 5 refuses, so the two cannot share a venv). tests/client/test_litgpt.py
drives it: it builds litgpt's real ``GPT``, and reads and writes only safetensors files.

    python litgpt_side.py make CONFIG_JSON SEED WEIGHTS_OUT LOGITS_OUT
        a perturbed model: its state_dict and its logits on the fixed tokens
    python litgpt_side.py run CONFIG_JSON WEIGHTS_IN LOGITS_OUT
        the weights loaded strictly into a fresh model, and its logits
"""

from __future__ import annotations

import json
import sys

import torch
from litgpt import GPT, Config
from safetensors.torch import load_file, save_file


def tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model: GPT, vocab: int) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {"logits": model(tokens(vocab)).contiguous()}


def main(command: str, config_json: str, *args: str) -> None:
    config = Config(**json.loads(config_json))
    model = GPT(config).eval()
    if command == "make":
        seed, weights, out = args
        gen = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():  # no fresh init (RMSNorm ones) matches
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    elif command == "run":
        weights, out = args
        model.load_state_dict(load_file(weights), strict=True)
    else:
        raise SystemExit(f"unknown command {command!r}")
    save_file(logits(model, config.padded_vocab_size), out)


if __name__ == "__main__":
    main(*sys.argv[1:])
