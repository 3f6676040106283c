"""NTK-SAP's settings and what a scoring batch draws: the config, Gaussian inputs, weight redraws.

Split from :mod:`fedzo_flwr.pruning.ntk_sap` (the scoring itself); that module re-exports every
name here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from fedzo_flwr.models import get_model_spec, reinitialize_
from fedzo_flwr.models.init import REDRAWS
from fedzo_flwr.pruning.common import (
    check_positive_int,
    derive_seed,
)

if TYPE_CHECKING:
    from fedzo_flwr.config import RunConfig

#: ``reinit(module, generator)`` redraws parameters of ``module`` in place from ``generator``
#: (which ones is up to the callable; :func:`model_reinit` offers the two NTK-SAP settings).
Reinit = Callable[[nn.Module, torch.Generator], object]

#: What each scoring batch redraws, see :attr:`NTKSAPConfig.reinit`.
ReinitMode = Literal["weights", "all"]


@dataclass(frozen=True)
class NTKSAPConfig:
    """Settings of NTK-SAP scoring.

    Defaults follow NTK-SAP's reference setup for CIFAR-10: the prune set is ``10 × classes``
    = 100 "samples" (only their shape is used) loaded with batch size 256, i.e. **one batch of
    100 Gaussian inputs per pass**; ``R = 5`` passes per iteration (NTK-SAP's CIFAR-10 scripts,
    and our run config's ``prune-repeats``); ``T = 20`` iterations; ``ε = 0.01``; only the
    prunable weights redrawn per batch (``reinit="weights"``, as the reference). For CIFAR-100
    use :meth:`for_num_classes` (1000 samples = batches of 256, 256, 256, 232).

    Attributes
    ----------
    epsilon : float
        Standard deviation of the weight perturbation ``Δθ = ε·ξ``; > 0.
    repeats : int
        ``R``: passes over the prune set per scoring iteration.
    iterations : int
        ``T``: pruning iterations of the exponential schedule.
    batch_size : int
        Largest Gaussian batch.
    prune_samples : int
        Gaussian inputs per pass (NTK-SAP: 10 × number of classes). Split into
        :attr:`batch_sizes`.
    input_shape : tuple of int
        Shape of one input, ``(C, H, W)``.
    reinit : {"weights", "all"}
        What each scoring batch redraws from the model's initialiser. ``"weights"`` (default):
        only the prunable Conv2d/Linear weights; biases and normalisation parameters keep the
        scored model's values, as in the reference NTK-SAP. ``"all"``: every parameter
        (fedzo-flwr before issue #12).

    """

    epsilon: float = 0.01
    repeats: int = 5
    iterations: int = 20
    batch_size: int = 256
    prune_samples: int = 100
    input_shape: tuple[int, ...] = (3, 32, 32)
    reinit: ReinitMode = "weights"

    def __post_init__(self) -> None:
        eps = self.epsilon
        if (
            isinstance(eps, bool)
            or not isinstance(eps, (int, float))
            or not (math.isfinite(eps) and eps > 0)
        ):
            raise ValueError(f"epsilon must be a finite number > 0, got {eps!r}")
        for name in ("repeats", "iterations", "batch_size", "prune_samples"):
            check_positive_int(getattr(self, name), name)
        shape = self.input_shape
        if (
            not isinstance(shape, tuple)
            or not shape
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
        ):
            raise ValueError(
                f"input_shape must be a non-empty tuple of positive ints, got {shape!r}"
            )
        if self.reinit not in REDRAWS:
            raise ValueError(f"reinit must be 'weights' or 'all', got {self.reinit!r}")

    @classmethod
    def for_num_classes(cls, num_classes: int, **overrides: object) -> NTKSAPConfig:
        """NTK-SAP's prune-set size for ``num_classes`` classes: ``10 × num_classes`` samples."""
        check_positive_int(num_classes, "num_classes")
        return cls(**{"prune_samples": 10 * num_classes, **overrides})  # type: ignore[arg-type]

    @classmethod
    def for_run(cls, cfg: RunConfig) -> NTKSAPConfig:
        """The NTK-SAP settings of a run: ``prune-iterations``, ``prune-repeats``, ``prune-reinit``.

        Everything else keeps its default (CIFAR-10 prune set of 100 Gaussian inputs).
        """
        return cls(
            iterations=cfg.prune_iterations, repeats=cfg.prune_repeats, reinit=cfg.prune_reinit
        )

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """Sizes of the Gaussian batches of one pass (all ``batch_size`` but the last)."""
        full, rest = divmod(self.prune_samples, self.batch_size)
        return (self.batch_size,) * full + ((rest,) if rest else ())

    @property
    def num_batches(self) -> int:
        """Gaussian batches per pass: ``ceil(prune_samples / batch_size)``."""
        return len(self.batch_sizes)


class GaussianInputs:
    """Re-iterable stream of ``N(0, I)`` input batches drawn from one generator.

    Each ``iter()`` is one pass over the "prune set" and yields batches of ``batch_sizes``;
    successive passes continue the generator, so every batch is a fresh draw (as NTK-SAP's
    ``torch.randn_like(data)``).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        batch_sizes: tuple[int, ...],
        generator: torch.Generator,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.input_shape = tuple(input_shape)
        self.batch_sizes = tuple(batch_sizes)
        self.generator = generator
        self.dtype = dtype

    def __len__(self) -> int:
        return len(self.batch_sizes)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for size in self.batch_sizes:
            yield torch.randn((size, *self.input_shape), generator=self.generator, dtype=self.dtype)


def gaussian_inputs(config: NTKSAPConfig, seed: int, stream: int = 0) -> GaussianInputs:
    """The Gaussian input stream ``stream`` of seed ``seed`` (``0`` = the server's)."""
    generator = torch.Generator().manual_seed(derive_seed(seed, "ntk-sap/inputs", stream))
    return GaussianInputs(config.input_shape, config.batch_sizes, generator)


def scoring_seed(seed: int, stream: int, iteration: int) -> int:
    """Seed of the weight-draw/perturbation generator of ``stream`` at ``iteration`` (1-based).

    In the federated form this is the seed the server assigns to client ``stream``.
    """
    return derive_seed(seed, "ntk-sap/weights", stream, iteration)


def model_reinit(model_name: str, mode: ReinitMode = "weights") -> Reinit:
    """A :data:`Reinit` drawing from the initialiser registered for ``model_name``.

    Parameters
    ----------
    model_name : str
        Registry name (selects the initialiser).
    mode : {"weights", "all"}
        ``"weights"``: redraw only the prunable Conv2d/Linear weights, keep biases and
        normalisation parameters (reference NTK-SAP); ``"all"``: redraw every parameter.

    """
    get_model_spec(model_name)  # fail early on unknown names
    if mode not in REDRAWS:
        raise ValueError(f"reinit must be 'weights' or 'all', got {mode!r}")

    def reinit(module: nn.Module, generator: torch.Generator) -> nn.Module:
        return reinitialize_(module, model_name, generator, mode)

    return reinit
