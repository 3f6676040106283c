"""Baseline foresight pruners: random, magnitude, SNIP and SynFlow (all global, exact count).

Every pruner works on a private copy of the model, so the caller's weights are left
bit-identical, and selects with :func:`fedzo_flwr.sparse.mask.global_topk_mask` (ties by index, one
reserved entry per tensor, so no layer collapses).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn import functional as F

from fedzo_flwr.pruning.common import (
    check_positive_int,
    check_result,
    derive_seed,
    float_mask,
    iterative_prune,
    mask_gradient,
    masked_forward,
    one_shot_prune,
    working_copy,
)
from fedzo_flwr.sparse.mask import Mask, check_density, dense_mask, prunable_parameters

__all__ = ["magnitude_mask", "random_mask", "snip_gradients", "snip_mask", "synflow_mask"]


def random_mask(model: nn.Module, density: float, seed: int = 0) -> Mask:
    """Random global pruning: scores ``U(0, 1)`` from a generator seeded by ``seed``.

    The expected density of every tensor is ``density`` (up to the one reserved entry per
    tensor).
    """
    density = check_density(density)
    generator = torch.Generator().manual_seed(derive_seed(seed, "random-mask"))
    scores = {
        n: torch.rand(p.shape, generator=generator, dtype=torch.float64)
        for n, p in prunable_parameters(model)
    }
    return check_result(model, one_shot_prune(model, density, scores), density, "random")


def magnitude_mask(model: nn.Module, density: float) -> Mask:
    """Global magnitude pruning at initialisation: keep the largest ``|w|``."""
    density = check_density(density)
    scores = {n: p.detach().abs().to("cpu", torch.float64) for n, p in prunable_parameters(model)}
    return check_result(model, one_shot_prune(model, density, scores), density, "magnitude")


def snip_gradients(
    model: nn.Module, mask: Mask, x: torch.Tensor, y: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Signed SNIP mask gradients ``∂L/∂m`` at ``mask`` (= ``w ⊙ ∂L/∂w``), ``L`` = mean CE.

    The one SNIP scorer: :func:`snip_mask` sums it over batches, and a client of the federated
    pruning phase uploads it (:func:`fedzo_flwr.pruning.client.client_prune_gradients`).
    ``model`` holds the weights to score (θ0); it is not modified.
    """
    work = working_copy(model)
    params = {k: v.detach() for k, v in work.named_parameters()}
    dtype = next(p for _, p in prunable_parameters(work)).dtype
    m = float_mask(mask, dtype)
    loss = F.cross_entropy(masked_forward(work, params, m, x.to(dtype)), y)
    return mask_gradient(loss, m)


def snip_mask(
    model: nn.Module, density: float, batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None
) -> Mask:
    """SNIP (Lee et al., 2019): keep the largest ``|g ⊙ w|`` of the cross-entropy loss.

    ``g`` is the gradient of the sum over ``batches`` of the mean cross-entropy, evaluated at the
    model's current weights (eval mode; our models have no train-mode-only layers). Computed as
    ``|∂L/∂m|`` at ``m = 1`` (:func:`snip_gradients`), which equals ``|w ⊙ ∂L/∂w|``.

    Parameters
    ----------
    model : nn.Module
        Model at initialisation; not modified.
    density : float
        Kept fraction in (0, 1].
    batches : iterable of (x, y)
        Labelled data (e.g. a DataLoader over a few hundred training samples).

    Raises
    ------
    ValueError
        If ``batches`` is None or yields nothing (SNIP needs data).

    """
    density = check_density(density)
    if batches is None:
        raise ValueError("snip needs data: pass batches of (x, y) (it is not data-free)")
    dense = dense_mask(model)
    total: dict[str, torch.Tensor] | None = None
    for batch in batches:
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
            raise TypeError("snip batches must be (x, y) pairs")
        grads = snip_gradients(model, dense, batch[0].to("cpu"), batch[1].to("cpu"))
        if total is None:
            total = grads
        else:
            for n, g in grads.items():
                total[n] += g
    if total is None:
        raise ValueError("snip needs data: batches yielded no (x, y) batch")
    scores = {n: g.abs() for n, g in total.items()}
    return check_result(model, one_shot_prune(model, density, scores), density, "SNIP")


def synflow_mask(
    model: nn.Module,
    density: float,
    iterations: int = 100,
    input_shape: tuple[int, ...] = (3, 32, 32),
) -> Mask:
    """SynFlow (Tanaka et al., 2020): data-free iterative synaptic-flow pruning.

    The network is "linearised" by replacing every parameter with its absolute value (in float64
    on a private copy); with an all-ones input ``R = 1ᵀ f(1; |θ|⊙m)`` and the score is
    ``|θ ⊙ ∂R/∂θ|`` = ``|∂R/∂m|`` at kept entries. ``iterations`` rounds of the exponential
    schedule ``d_t = d^(t/T)`` (SynFlow's default ``T = 100``).

    Caveat: with GroupNorm (all our models) the linearised network is not positive-homogeneous,
    since normalisation subtracts group means and divides by group scales. SynFlow's
    conservation argument is therefore only approximate; we run it as is in double precision.

    Parameters
    ----------
    model : nn.Module
        Architecture and weights at initialisation (only ``|θ|`` is used); not modified.
    density : float
        Final kept fraction in (0, 1].
    iterations : int
        Pruning rounds ``T``.
    input_shape : tuple of int
        Shape of one input.

    """
    density = check_density(density)
    check_positive_int(iterations, "iterations")
    work = working_copy(model, torch.float64)
    params = {k: v.detach().abs() for k, v in work.named_parameters()}
    x = torch.ones((1, *input_shape), dtype=torch.float64)

    def score_fn(mask: Mask, t: int) -> dict[str, torch.Tensor]:
        m = float_mask(mask, torch.float64)
        flow = masked_forward(work, params, m, x).sum()
        return {n: g.abs() for n, g in mask_gradient(flow, m).items()}

    mask = iterative_prune(model, density, iterations, score_fn, method="SynFlow")
    return check_result(model, mask, density, "SynFlow")
