"""Accuracy and loss of a model on a labelled uint8 image set."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedzo_flwr.data import to_tensor


@torch.no_grad()
def evaluate(
    model: nn.Module, x_uint8: np.ndarray, y: np.ndarray, dataset: str, batch_size: int = 1000
) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy of ``model`` on ``(x_uint8, y)``.

    Images are converted batch by batch, so the float copy of the whole set is never held.
    """
    if len(x_uint8) != len(y) or len(y) == 0:
        raise ValueError(
            f"x and y must be non-empty and of equal length, got {len(x_uint8)}, {len(y)}"
        )
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        x = to_tensor(x_uint8[start : start + batch_size], dataset)
        target = torch.tensor(y[start : start + batch_size], dtype=torch.long)
        logits = model(x)
        total_loss += float(F.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(dim=1) == target).sum())
    return total_loss / len(y), correct / len(y)
