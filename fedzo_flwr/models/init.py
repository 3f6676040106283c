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

#: What a redraw touches: ``"all"`` every parameter; ``"weights"`` only the prunable Conv2d/Linear
#: weights, leaving biases and normalisation parameters as they are (NTK-SAP's
#: ``_initialize_weights`` during scoring).
Redraw = Literal["weights", "all"]

INIT_SCHEMES: tuple[str, ...] = ("pytorch", "kaiming-normal")
REDRAWS: tuple[str, ...] = ("weights", "all")


def _fan_in(weight: torch.Tensor) -> int:
    return weight.shape[1] * (weight[0][0].numel() if weight.dim() > 2 else 1)


@torch.no_grad()
def init_parameters_(
    model: nn.Module, generator: torch.Generator, scheme: InitScheme, redraw: Redraw = "all"
) -> nn.Module:
    """Redraw the parameters of ``model`` in place from ``generator``.

    Parameters
    ----------
    model : nn.Module
        The model to initialise.
    generator : torch.Generator
        Source of every random draw (CPU generator).
    scheme : {"pytorch", "kaiming-normal"}
        How Conv2d/Linear **weights** are drawn. ``"pytorch"`` reproduces PyTorch's default
        (Kaiming-uniform with ``a=sqrt(5)``, i.e. uniform in +-1/sqrt(fan_in));
        ``"kaiming-normal"`` is ``nn.init.kaiming_normal_`` with its defaults (``mode="fan_in"``,
        ``nonlinearity="leaky_relu"``, ``a=0``: std ``sqrt(2 / fan_in)``) on conv **and** linear
        weights, as the ``_initialize_weights`` of NTK-SAP's CIFAR ResNets and VGGs
        (``Models/lottery_resnet.py``, ``Models/lottery_vgg.py``) does. Under both schemes a
        Conv2d/Linear bias is PyTorch's default, uniform in +-1/sqrt(fan_in) (the reference leaves
        biases at PyTorch's default too), and GroupNorm gets weight 1 and bias 0.
    redraw : {"all", "weights"}
        ``"all"`` (default): every parameter as above. ``"weights"``: only the Conv2d/Linear
        weights; biases and GroupNorm parameters keep their current values. The bias draws are
        still taken from ``generator`` (and discarded), so both settings consume the same random
        stream and give the same weights for the same generator state.

    Returns
    -------
    nn.Module
        ``model`` itself.

    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"scheme must be 'pytorch' or 'kaiming-normal', got {scheme!r}")
    if redraw not in REDRAWS:
        raise ValueError(f"redraw must be 'weights' or 'all', got {redraw!r}")
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            weight = module.weight
            if scheme == "kaiming-normal":
                nn.init.kaiming_normal_(weight, generator=generator)
            else:
                nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
            if module.bias is not None:
                bound = 1.0 / math.sqrt(_fan_in(weight))
                bias = module.bias if redraw == "all" else torch.empty_like(module.bias)
                nn.init.uniform_(bias, -bound, bound, generator=generator)
        elif isinstance(module, nn.GroupNorm) and module.affine and redraw == "all":
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return model
