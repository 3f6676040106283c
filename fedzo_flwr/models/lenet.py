"""LeNet variants for 3x32x32 inputs."""

from __future__ import annotations

import torch
from torch import nn

from fedzo_flwr.models.norm import group_norm


class LeNet5(nn.Module):
    """Classic LeNet-5 (LeCun et al., 1998) adapted to 3x32x32 colour images.

    conv 5x5 (3->6) -> ReLU -> max-pool 2 -> conv 5x5 (6->16) -> ReLU -> max-pool 2
    -> linear 400->120 -> ReLU -> linear 120->84 -> ReLU -> linear 84->classes.
    62,006 parameters for 10 classes; 1.30 MFLOP per 32x32 image.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, kernel_size=5)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)
        self.pool = nn.MaxPool2d(2)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.act(self.conv1(x)))
        x = self.pool(self.act(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = self.act(self.fc1(x))
        x = self.act(self.fc2(x))
        logits: torch.Tensor = self.fc3(x)
        return logits


class LeNetGN(nn.Module):
    """The LeNet of BAFFLE (Feng et al., 2023): GroupNorm without affine terms and Hardswish.

    conv 5x5 (3->16, pad 2) -> GN -> Hardswish -> max-pool 2 -> conv 5x5 (16->64, pad 2) -> GN
    -> Hardswish -> global average pool -> linear 64->classes.
    27,530 parameters for 10 classes (27,440 prunable weights and 90 biases).
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, kernel_size=5, padding=2)
        self.norm1 = group_norm(16, affine=False)
        self.conv2 = nn.Conv2d(16, 64, kernel_size=5, padding=2)
        self.norm2 = group_norm(64, affine=False)
        self.fc = nn.Linear(64, num_classes)
        self.pool = nn.MaxPool2d(2)
        self.act = nn.Hardswish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.act(self.norm1(self.conv1(x))))
        x = self.act(self.norm2(self.conv2(x)))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        logits: torch.Tensor = self.fc(x)
        return logits
