"""Seeded weight initialisers.

Every draw takes an explicit :class:`torch.Generator`, so the server, the pruner (which redraws the
weights once per scoring batch) and the tests can reproduce a model bit for bit from a seed.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

InitScheme = Literal["pytorch", "kaiming-normal"]


def _fan_in(weight: torch.Tensor) -> int:
    return weight.shape[1] * (weight[0][0].numel() if weight.dim() > 2 else 1)


@torch.no_grad()
def init_parameters_(model: nn.Module, generator: torch.Generator, scheme: InitScheme) -> nn.Module:
    """Redraw every parameter of ``model`` in place from ``generator``.

    Parameters
    ----------
    model : nn.Module
        The model to initialise.
    generator : torch.Generator
        Source of every random draw (CPU generator).
    scheme : {"pytorch", "kaiming-normal"}
        ``"pytorch"`` reproduces PyTorch's defaults for Conv/Linear (Kaiming-uniform with
        ``a=sqrt(5)``, bias uniform in +-1/sqrt(fan_in)); ``"kaiming-normal"`` draws conv weights
        from Kaiming-normal (fan_out, ReLU) as the CIFAR ResNets of NTK-SAP do, linear layers as
        PyTorch. Normalisation layers get weight 1 and bias 0.

    Returns
    -------
    nn.Module
        ``model`` itself.

    """
    if scheme not in ("pytorch", "kaiming-normal"):
        raise ValueError(f"scheme must be 'pytorch' or 'kaiming-normal', got {scheme!r}")
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            weight = module.weight
            if scheme == "kaiming-normal" and isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(
                    weight, mode="fan_out", nonlinearity="relu", generator=generator
                )
            else:
                nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
            if module.bias is not None:
                bound = 1.0 / math.sqrt(_fan_in(weight))
                nn.init.uniform_(module.bias, -bound, bound, generator=generator)
        elif isinstance(module, nn.GroupNorm) and module.affine:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return model
