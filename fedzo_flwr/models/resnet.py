"""CIFAR ResNets with GroupNorm (no BatchNorm running statistics)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from fedzo_flwr.models.norm import group_norm


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with GroupNorm and a residual connection.

    Parameters
    ----------
    in_planes, planes : int
        Input and output channels.
    stride : int
        Stride of the first convolution.
    shortcut : {"pad", "conv"}
        How the residual adapts when the shape changes: ``"pad"`` is the parameter-free option A
        of He et al. (subsample and zero-pad channels, used by ResNet-20); ``"conv"`` is a 1x1
        convolution with GroupNorm (option B, used by ResNet-18).

    """

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.norm1 = group_norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.norm2 = group_norm(planes)
        self.pad_channels = 0
        self.stride = stride
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            if shortcut == "pad":
                self.pad_channels = planes - in_planes
            else:
                self.downsample = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), group_norm(planes)
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        elif self.pad_channels or self.stride != 1:
            identity = x[:, :, :: self.stride, :: self.stride]
            half = self.pad_channels // 2
            identity = F.pad(identity, (0, 0, 0, 0, half, self.pad_channels - half))
        else:
            identity = x
        return F.relu(out + identity)


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: a 3x3 stem, stages of :class:`BasicBlock`, global pooling, linear.

    Parameters
    ----------
    widths : sequence of int
        Channels per stage; the first stage keeps the stem's resolution, later ones halve it.
    blocks_per_stage : int
        Basic blocks in each stage.
    shortcut : {"pad", "conv"}
        Residual adaptation, see :class:`BasicBlock`.
    num_classes : int
        Output classes.

    """

    def __init__(
        self, widths: tuple[int, ...], blocks_per_stage: int, shortcut: str, num_classes: int
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.norm1 = group_norm(widths[0])
        layers: list[nn.Module] = []
        in_planes = widths[0]
        for stage, planes in enumerate(widths):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(BasicBlock(in_planes, planes, stride, shortcut))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm1(self.conv1(x)))
        x = self.layers(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        logits: torch.Tensor = self.fc(x)
        return logits


def resnet20(num_classes: int = 10) -> CifarResNet:
    """ResNet-20 of He et al. (2016) for CIFAR: widths 16/32/64, 3 blocks per stage, option A."""
    return CifarResNet((16, 32, 64), 3, "pad", num_classes)


def resnet18(num_classes: int = 10) -> CifarResNet:
    """ResNet-18, CIFAR variant: 3x3 stem, no max-pool, widths 64..512, 1x1 shortcuts."""
    return CifarResNet((64, 128, 256, 512), 2, "conv", num_classes)
