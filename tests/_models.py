"""Small real models for the scenario tests (no torchvision): ResNet-, ViT- and
transformer-style nets with the module layouts real checkpoints have."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


def seeded(seed: int) -> None:
    torch.manual_seed(seed)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // 2, 1)
        self.fc2 = nn.Conv2d(channels // 2, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(scale))))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, se: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.se = SqueezeExcite(cout) if se else None
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.se is not None:
            out = self.se(out)
        shortcut = self.downsample(x) if self.downsample is not None else x
        return torch.relu(out + shortcut)


class TinyResNet(nn.Module):
    """conv1/bn1/layer1/layer2/fc, like torchvision's ResNet at a tiny width."""

    def __init__(self, in_chans: int = 3, num_classes: int = 10, se: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 8, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(BasicBlock(8, 8, se=se), BasicBlock(8, 8, se=se))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, stride=2, se=se))
        self.fc = nn.Linear(16, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.layer2(self.layer1(x)).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class Backbone(nn.Module):
    """The ResNet without its head: what a base-model checkpoint holds."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, stride=2))


class WithHead(nn.Module):
    def __init__(self, prefix: str = "encoder", num_classes: int = 5) -> None:
        super().__init__()
        self.add_module(prefix, Backbone())
        self.head = nn.Linear(16, num_classes)


def sequential_resnet() -> nn.Sequential:
    """TinyResNet's tensors under numbered names (an nn.Sequential export)."""

    def block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if stride != 1 or cin != cout:
            layers.append(
                nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            )
        return nn.Sequential(*layers)

    return nn.Sequential(
        OrderedDict(
            [
                ("stem_conv", nn.Conv2d(3, 8, 7, 2, 3, bias=False)),
                ("stem_norm", nn.BatchNorm2d(8)),
                ("stage1", nn.Sequential(block(8, 8), block(8, 8))),
                ("stage2", nn.Sequential(block(8, 16, 2))),
                ("classifier", nn.Linear(16, 10)),
            ]
        )
    )


class Attention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)


class Mlp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, dim * 2)
        self.fc2 = nn.Linear(dim * 2, dim)


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim)


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)


class TinyViT(nn.Module):
    """timm's ViT layout: cls_token, pos_embed [1, 1 + grid*grid, dim], blocks, norm, head."""

    def __init__(self, grid: int = 14, dim: int = 16, depth: int = 2, num_classes: int = 10):
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + grid * grid, dim))
        self.patch_embed = PatchEmbed(4, dim)
        self.blocks = nn.Sequential(*[Block(dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)


class TinyEncoder(nn.Module):
    """A transformer encoder with LayerNorm (BERT-like names)."""

    def __init__(self, vocab: int = 50, dim: int = 16) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(vocab, dim)
        self.LayerNorm = nn.LayerNorm(dim)
        self.layer = nn.Sequential(Block(dim), Block(dim))


class TiedNet(nn.Module):
    """One Linear registered under two names: both keys share storage."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 8)
        self.body = nn.Linear(8, 8)
        self.decoder = self.embed


def randomize_buffers(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorm statistics non-default values, so copying them is visible."""
    g = torch.Generator().manual_seed(seed)
    for name, buffer in model.named_buffers():
        if name.endswith("running_mean"):
            buffer.copy_(torch.randn(buffer.shape, generator=g))
        elif name.endswith("running_var"):
            buffer.copy_(torch.rand(buffer.shape, generator=g) + 0.5)
        elif name.endswith("num_batches_tracked"):
            buffer.fill_(11)
    return model
