"""Model registry: build any supported model by name, seeded, with its parameter count.

>>> from fedzo_flwr.models import build_model, parameter_count
>>> parameter_count("lenet5")
62006
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fedzo_flwr.models.init import InitScheme, Redraw, init_parameters_
from fedzo_flwr.models.lenet import LeNet5, LeNetGN
from fedzo_flwr.models.resnet import resnet18, resnet20

__all__ = [
    "MODELS",
    "ModelSpec",
    "Redraw",
    "build_model",
    "build_skeleton",
    "get_model_spec",
    "init_parameters_",
    "parameter_count",
    "reinitialize_",
]


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: how to build it and how to draw its initial weights."""

    name: str
    factory: Callable[[int], nn.Module]
    init_scheme: InitScheme
    description: str


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("lenet5", LeNet5, "pytorch", "classic LeNet-5, ReLU, no normalisation"),
        ModelSpec("lenet-gn", LeNetGN, "pytorch", "BAFFLE LeNet: GroupNorm + Hardswish"),
        ModelSpec("resnet20", resnet20, "kaiming-normal", "CIFAR ResNet-20, GroupNorm"),
        ModelSpec("resnet18", resnet18, "kaiming-normal", "CIFAR ResNet-18, GroupNorm"),
    )
}


def get_model_spec(name: str) -> ModelSpec:
    """Return the :class:`ModelSpec` registered as ``name``.

    Raises
    ------
    ValueError
        If ``name`` is not registered; the message lists the valid names.

    """
    if not isinstance(name, str):
        raise TypeError(f"model must be a str, got {type(name).__name__}")
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; valid models: {', '.join(sorted(MODELS))}"
        ) from None


def reinitialize_(
    model: nn.Module, name: str, generator: torch.Generator, redraw: Redraw = "all"
) -> nn.Module:
    """Redraw the parameters of ``model`` (built as ``name``) with that model's initialiser.

    ``redraw="all"`` redraws every parameter; ``"weights"`` only the prunable Conv2d/Linear
    weights, keeping biases and normalisation parameters (see
    :func:`~fedzo_flwr.models.init.init_parameters_`).
    """
    return init_parameters_(model, generator, get_model_spec(name).init_scheme, redraw)


def build_model(name: str, num_classes: int = 10, seed: int = 0) -> nn.Module:
    """Build model ``name`` for ``num_classes`` classes with weights drawn from ``seed``.

    Parameters
    ----------
    name : str
        One of :data:`MODELS` (``lenet5``, ``lenet-gn``, ``resnet20``, ``resnet18``).
    num_classes : int
        Number of output classes (10 for CIFAR-10, 100 for CIFAR-100).
    seed : int
        Seed of the CPU generator the initial weights are drawn from.

    Returns
    -------
    nn.Module
        The model in eval mode (none of our models has train-mode-only behaviour).

    """
    spec = get_model_spec(name)
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    model = spec.factory(num_classes)
    reinitialize_(model, name, torch.Generator().manual_seed(int(seed)))
    return model.eval()


def build_skeleton(name: str, num_classes: int = 10) -> nn.Module:
    """Model ``name``'s structure on the ``meta`` device: its layers and shapes, no storage.

    What a client that holds its weights sparse at rest builds instead of the dense model
    (:func:`fedzo_flwr.zo.client.stream_model`): no weight is allocated, drawn or copied.
    """
    spec = get_model_spec(name)
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    with torch.device("meta"):
        model = spec.factory(num_classes)
    return model.eval()


def parameter_count(name: str, num_classes: int = 10) -> int:
    """Number of trainable parameters of model ``name``."""
    model = get_model_spec(name).factory(num_classes)
    return sum(p.numel() for p in model.parameters())
