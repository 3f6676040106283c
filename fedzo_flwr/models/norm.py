"""Normalisation used by every model: GroupNorm, which keeps no running statistics."""

from __future__ import annotations

from torch import nn


def num_groups(channels: int) -> int:
    """GroupNorm group count used by every model: ``max(2, channels // 16)`` (BAFFLE's rule)."""
    return max(2, channels // 16)


def group_norm(channels: int, affine: bool = True) -> nn.GroupNorm:
    """Build a GroupNorm layer for ``channels`` channels with :func:`num_groups` groups."""
    return nn.GroupNorm(num_groups(channels), channels, affine=affine)
