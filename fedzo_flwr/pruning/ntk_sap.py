"""Data-free NTK-SAP (Wang et al., ICLR 2023) with exact-count global selection.

Saliency of prunable weight ``j`` under the current mask ``m`` (method note, section (a))::

    S_j = | Σ_b ∂/∂m_j Σ_{i∈b} ‖f(Z_i; θ_b⊙m) − f(Z_i; (θ_b + εξ_b)⊙m)‖² | · [m_j = 1]

with ``Z ~ N(0, I)`` inputs of the data's shape only, ``θ_b`` the model's parameters with its
**prunable weights freshly drawn from the model's own initialiser for every batch**, ``ξ_b ~ N(0,
I)`` per prunable weight and the gradient taken with respect to the mask only (weights frozen),
flowing through both forward passes. Signed gradients are summed over batches and ``|·|`` is
taken once. :func:`ntk_sap_mask` repeats this for ``T`` iterations with the exponential schedule
``d_t = d^(t/T)``.

What a batch redraws is :attr:`NTKSAPConfig.reinit` (run-config key ``prune-reinit``):

* ``"weights"`` (default, reference parity): only the Conv2d/Linear weights; the biases and
  normalisation parameters stay at the model's own initial values for every batch. This is what
  the reference implementation does (``YiteWang/NTK-SAP``, ``Pruners/pruners.py`` class ``NTKSAP``
  calls the model's ``_initialize_weights``, which redraws conv/linear weights only). With fixed
  biases a ReLU unit's survival follows the sign of its bias, which shapes the per-layer
  densities of bias-carrying nets such as LeNet-5 (``docs/method.md``).
* ``"all"``: every parameter, biases included (fedzo-flwr's behaviour before issue #12); the
  scores then depend on the architecture only.

The one scoring loop is :func:`ntk_mask_gradients`; it takes any iterable of input batches, so
the federated form (:mod:`fedzo_flwr.pruning.federated`) runs the same code on client data.

Random streams (all CPU :class:`torch.Generator`, seeds from
:func:`~fedzo_flwr.pruning.common.derive_seed`):

* inputs of stream ``c``: one generator seeded ``derive_seed(seed, "ntk-sap/inputs", c)``, drawn
  lazily batch by batch, continuing across passes and iterations (:func:`gaussian_inputs`);
* weight draws and perturbations of stream ``c`` at iteration ``t``: a generator seeded
  :func:`scoring_seed` ``(seed, c, t)``; per batch it draws ``θ_b`` (via
  :func:`fedzo_flwr.models.reinitialize_`: each Conv2d/Linear weight, then its bias, in module
  order; with ``reinit="weights"`` the bias values are drawn and discarded, so both settings see
  the same weights and perturbations for a seed) and then ``ξ_b`` for each prunable weight in
  order.

The server-side data-free mask uses stream ``c = 0``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from fedzo_flwr.pruning.common import (
    check_positive_int,
    check_result,
    float_mask,
    iterative_prune,
    mask_gradient,
    masked_forward,
    reject_batchnorm,
    working_copy,
)
from fedzo_flwr.pruning.ntk_setup import (
    GaussianInputs,
    NTKSAPConfig,
    Reinit,
    ReinitMode,
    gaussian_inputs,
    model_reinit,
    scoring_seed,
)
from fedzo_flwr.sparse.mask import Mask, prunable_parameters, validate_mask

__all__ = [
    "GaussianInputs",
    "NTKSAPConfig",
    "Reinit",
    "ReinitMode",
    "gaussian_inputs",
    "model_reinit",
    "ntk_mask_gradients",
    "ntk_sap_mask",
    "ntk_sap_scores",
    "scores_from_gradients",
    "scoring_seed",
]

logger = logging.getLogger(__name__)


def _input_of(batch: object) -> torch.Tensor:
    """The input tensor of a batch: the tensor itself or the first item of ``(x, y, ...)``."""
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"batches must yield tensors or (x, y) pairs, got {type(batch).__name__}")
    return batch


def ntk_mask_gradients(
    model: nn.Module,
    mask: Mask,
    batches: Iterable[torch.Tensor],
    *,
    reinit: Reinit,
    generator: torch.Generator,
    epsilon: float = 0.01,
    passes: int = 1,
) -> dict[str, torch.Tensor]:
    """Signed NTK-SAP mask gradients summed over ``passes`` passes of ``batches``.

    For each batch ``x``: redraw the parameters ``θ`` of a private copy of ``model`` with
    ``reinit(copy, generator)`` (what it leaves alone keeps ``model``'s values), draw
    ``ξ ~ N(0, I)`` per prunable weight from ``generator``, and add
    ``∂/∂m Σ_i ‖f(x_i; θ⊙m) − f(x_i; (θ+εξ)⊙m)‖²`` evaluated at ``m = mask``.

    This is the only NTK-SAP scoring loop: the data-free server (Gaussian ``batches``) and
    federated clients (their own data) both call it.

    Parameters
    ----------
    model : nn.Module
        Model to score; never modified (a deep copy is used, in eval mode). Parameters that
        ``reinit`` does not redraw (with :func:`model_reinit` ``"weights"``: biases and
        normalisation parameters) are used at ``model``'s values.
    mask : Mask
        Current mask; the gradient is evaluated at it (pruned weights are exactly zero in both
        forward passes).
    batches : iterable of Tensor
        Input batches (or ``(x, y)`` pairs, of which only ``x`` is used); iterated ``passes``
        times, so it must be re-iterable (a list, a DataLoader, :class:`GaussianInputs`).
    reinit : Reinit
        Redraws the copy's parameters for every batch (e.g. :func:`model_reinit`).
    generator : torch.Generator
        Source of the weight draws and perturbations.
    epsilon : float
        Perturbation standard deviation.
    passes : int
        Passes over ``batches`` (``R``).

    Returns
    -------
    dict of str to Tensor
        Signed summed gradient per prunable weight (float, including pruned entries).

    Raises
    ------
    ValueError
        If a pass over ``batches`` yields nothing.
    NotImplementedError
        If the model has BatchNorm layers.

    """
    reject_batchnorm(model, "NTK-SAP")
    validate_mask(model, mask)
    check_positive_int(passes, "passes")
    work = working_copy(model)
    names = [n for n, _ in prunable_parameters(work)]
    param_dtype = next(p for _, p in prunable_parameters(work)).dtype
    m = float_mask(mask, param_dtype)
    total = {n: torch.zeros_like(m[n]) for n in names}
    for pass_index in range(passes):
        count = 0
        for batch in batches:
            x = _input_of(batch).to(device="cpu", dtype=param_dtype)
            reinit(work, generator)
            params = {k: v.detach() for k, v in work.named_parameters()}
            delta = {
                n: epsilon * torch.randn(params[n].shape, generator=generator, dtype=param_dtype)
                for n in names
            }
            clean = masked_forward(work, params, m, x)
            perturbed = masked_forward(work, params, m, x, delta)
            objective = (clean - perturbed).pow(2).sum()
            for n, g in mask_gradient(objective, m).items():
                total[n] += g
            count += 1
        if count == 0:
            raise ValueError(
                f"batches yielded no input on pass {pass_index + 1}; pass a non-empty re-iterable "
                "(list, DataLoader), not a one-shot iterator"
            )
    return total


def scores_from_gradients(signed: dict[str, torch.Tensor], mask: Mask) -> dict[str, torch.Tensor]:
    """``|signed| · [m = 1]``: NTK-SAP scores, zero at pruned entries."""
    return {n: signed[n].abs() * mask[n].to(signed[n].dtype) for n in mask}


def ntk_sap_scores(
    model: nn.Module,
    model_name: str,
    mask: Mask,
    config: NTKSAPConfig,
    generator: torch.Generator,
    *,
    inputs: Iterable[torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """One NTK-SAP scoring iteration under ``mask`` (``config.repeats`` passes).

    Parameters
    ----------
    model : nn.Module
        Model to score; never modified. With ``config.reinit == "weights"`` its biases and
        normalisation parameters are used as they are.
    model_name : str
        Registry name; its initialiser draws ``θ_b`` for every batch.
    mask : Mask
        Current mask.
    config : NTKSAPConfig
        ``epsilon``, ``repeats``, ``reinit``, and (for the default inputs) the batch layout.
    generator : torch.Generator
        Weight draws and perturbations; also the Gaussian inputs when ``inputs`` is None.
    inputs : iterable of Tensor, optional
        Input batches; default: ``N(0, I)`` batches of ``config.batch_sizes`` drawn from
        ``generator``.

    Returns
    -------
    dict of str to Tensor
        Non-negative scores per prunable weight; exactly 0 at pruned entries.

    """
    if inputs is None:
        inputs = GaussianInputs(config.input_shape, config.batch_sizes, generator)
    signed = ntk_mask_gradients(
        model,
        mask,
        inputs,
        reinit=model_reinit(model_name, config.reinit),
        generator=generator,
        epsilon=config.epsilon,
        passes=config.repeats,
    )
    return scores_from_gradients(signed, mask)


def ntk_sap_mask(
    model: nn.Module,
    model_name: str,
    density: float,
    config: NTKSAPConfig | None = None,
    seed: int = 0,
) -> Mask:
    """Data-free NTK-SAP mask at ``density`` (iterative, global, exact count).

    Takes no data: the inputs are ``N(0, I)`` of ``config.input_shape`` and the prunable
    weights are fresh draws of ``model_name``'s initialiser for every batch, so ``model``'s own
    prunable weights are read by nobody (and left bit-identical). With the default
    ``config.reinit = "weights"`` the model's biases and normalisation parameters (its initial
    values θ0, as in the reference NTK-SAP) enter the scores; with ``"all"`` they are redrawn
    too and only the architecture of ``model`` matters.

    Parameters
    ----------
    model : nn.Module
        Model to prune (at its initial values); not modified.
    model_name : str
        Registry name of ``model`` (selects the initialiser for the weight draws).
    density : float
        Final kept fraction in (0, 1]; the mask keeps exactly ``kept_target(density, n)``.
    config : NTKSAPConfig, optional
        Scoring settings; default ``NTKSAPConfig()``.
    seed : int
        Seed of every random draw (Gaussian inputs, weight draws, perturbations).

    Returns
    -------
    Mask
        Bool mask; no prunable tensor is empty.

    """
    config = NTKSAPConfig() if config is None else config
    model_reinit(model_name)  # fail early on an unknown model name
    reject_batchnorm(model, "NTK-SAP")
    inputs = gaussian_inputs(config, seed, stream=0)

    def score_fn(mask: Mask, t: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(scoring_seed(seed, 0, t))
        return ntk_sap_scores(model, model_name, mask, config, generator, inputs=inputs)

    mask = iterative_prune(model, density, config.iterations, score_fn, method="NTK-SAP")
    return check_result(model, mask, density, "NTK-SAP")
