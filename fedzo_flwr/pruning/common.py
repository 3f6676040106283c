"""Machinery shared by every pruner: seeds, working copies, mask gradients, the iterative schedule.

Every pruner scores on a **private deep copy** of the user's model, so the user's weights,
gradients and ``requires_grad`` flags are never touched (the restored-initialisation property is
therefore bit-exact by construction). Scores that depend on a mask are computed as the gradient
of an objective with respect to a float copy of the mask, ``∂J/∂m``, passing ``w * m`` as the
weight through :func:`torch.func.functional_call`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from fedzo_flwr.errors import PruningError
from fedzo_flwr.logs import get_logger
from fedzo_flwr.seeding import derive_seed as derive_seed  # re-exported for the pruners
from fedzo_flwr.sparse.mask import (
    Mask,
    check_density,
    dense_mask,
    global_topk_mask,
    kept_count,
    kept_target,
    layer_densities,
    prunable_parameters,
    total_count,
    validate_mask,
)

logger = get_logger(__name__)

#: ``score_fn(mask, t)`` returns one non-negative score tensor per prunable weight for iteration
#: ``t`` (1-based) of an iterative schedule, evaluated under ``mask``.
ScoreFn = Callable[[Mask, int], dict[str, torch.Tensor]]

#: Fraction of kept weights with an exactly-zero score above which an iteration logs a warning.
ZERO_SCORE_WARNING = 0.25


def check_positive_int(value: int, name: str) -> int:
    """Return ``value`` after checking it is an int >= 1 (``ValueError`` naming ``name``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def reject_batchnorm(model: nn.Module, method: str) -> None:
    """Raise ``NotImplementedError`` if ``model`` has BatchNorm layers.

    NTK-SAP needs a train-mode pass to set BatchNorm statistics for each fresh weight draw before
    scoring in eval mode; our models use GroupNorm only, so that path is not implemented.
    """
    bn = [name for name, mod in model.named_modules() if isinstance(mod, _BatchNorm)]
    if bn:
        raise NotImplementedError(
            f"{method} does not support BatchNorm (found {bn[:3]}{'...' if len(bn) > 3 else ''}); "
            "our models use GroupNorm, which keeps no running statistics"
        )


def working_copy(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A detached, frozen, eval-mode deep copy of ``model`` on the CPU (optionally cast)."""
    work = copy.deepcopy(model).to("cpu")
    if dtype is not None:
        work = work.to(dtype)
    work.eval()
    for p in work.parameters():
        p.requires_grad_(False)
    return work


def float_mask(mask: Mask, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Float leaf copies of ``mask`` that require grad (the variables scores differentiate)."""
    return {
        n: m.detach().to(device="cpu", dtype=dtype).requires_grad_(True) for n, m in mask.items()
    }


def masked_forward(
    work: nn.Module,
    params: dict[str, torch.Tensor],
    mask: dict[str, torch.Tensor],
    x: torch.Tensor,
    delta: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Evaluate ``work`` on ``x`` with every prunable weight ``w`` replaced by ``(w + δ) * m``.

    Parameters
    ----------
    work : nn.Module
        Module whose structure is used (its own parameter values are ignored).
    params : dict of str to Tensor
        Values for **all** parameters of ``work``.
    mask : dict of str to Tensor
        Float mask per prunable weight (may require grad).
    x : Tensor
        Input batch.
    delta : dict of str to Tensor, optional
        Additive perturbation per prunable weight, applied before masking.

    """
    values = dict(params)
    for name, m in mask.items():
        w = params[name] if delta is None else params[name] + delta[name]
        values[name] = w * m
    values.update(dict(work.named_buffers()))
    out: torch.Tensor = functional_call(work, values, (x,))
    return out


def mask_gradient(
    objective: torch.Tensor, mask: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``∂objective/∂m`` for every float mask tensor (zeros where the graph does not reach)."""
    names = list(mask)
    grads = torch.autograd.grad(objective, [mask[n] for n in names], allow_unused=True)
    return {n: torch.zeros_like(mask[n]) if g is None else g.detach() for n, g in zip(names, grads)}


def check_result(model: nn.Module, mask: Mask, density: float, method: str) -> Mask:
    """Check a pruner's output: valid mask, exact kept count, no fully pruned tensor.

    Raises
    ------
    PruningError
        If the count is not ``kept_target(density, n)`` or a prunable tensor is empty (layer
        collapse); both indicate a bug, never a user error.

    """
    validate_mask(model, mask)
    target = kept_target(density, total_count(mask))
    kept = kept_count(mask)
    if kept != target:
        raise PruningError(f"{method}: mask keeps {kept} weights, expected exactly {target}")
    empty = [n for n, m in mask.items() if not bool(m.any())]
    if empty:
        raise PruningError(f"{method}: layer collapse, fully pruned tensors {empty}")
    return mask


def one_shot_prune(model: nn.Module, density: float, scores: dict[str, torch.Tensor]) -> Mask:
    """Global top-k of ``scores`` (one tensor per prunable weight of ``model``) at ``density``."""
    density = check_density(density)
    return global_topk_mask({n: scores[n] for n, _ in prunable_parameters(model)}, density)


def iterative_prune(
    model: nn.Module, density: float, iterations: int, score_fn: ScoreFn, *, method: str
) -> Mask:
    """Iterative global pruning with the exponential schedule ``d_t = density ** (t / T)``.

    At each iteration ``t = 1..T`` the scores are recomputed under the current mask and the top
    ``kept_target(d_t, n)`` entries are kept globally (via
    :func:`fedzo_flwr.sparse.mask.global_topk_mask`). Pruned entries are given ``-inf``, so they
    never return; the final density is exactly ``kept_target(density, n) / n``.

    Parameters
    ----------
    model : nn.Module
        Only its prunable names and shapes are read.
    density : float
        Final kept fraction in (0, 1].
    iterations : int
        Number of pruning rounds ``T``.
    score_fn : ScoreFn
        ``score_fn(mask, t)``: non-negative scores (higher = keep); values at pruned entries are
        ignored.
    method : str
        Name used in log messages and errors.

    Returns
    -------
    Mask
        The final mask.

    Raises
    ------
    PruningError
        If a kept entry gets a non-finite score.

    """
    density = check_density(density)
    iterations = check_positive_int(iterations, "iterations")
    mask = dense_mask(model)
    total = total_count(mask)
    if kept_target(density, total) == total:
        return mask
    zero_fractions: list[float] = []
    for t in range(1, iterations + 1):
        d_t = density ** (t / iterations)
        scores = score_fn(mask, t)
        restricted: dict[str, torch.Tensor] = {}
        zeros = 0
        for name, keep in mask.items():
            s = scores[name].detach().to(torch.float64)
            kept_scores = s[keep]
            if not bool(torch.isfinite(kept_scores).all()):
                raise PruningError(f"{method}: non-finite scores in {name!r} at iteration {t}")
            zeros += int((kept_scores == 0).sum())
            restricted[name] = torch.where(keep, s, torch.full_like(s, -math.inf))
        zero_fractions.append(zeros / kept_count(mask))
        new = global_topk_mask(restricted, d_t)
        regrown = [n for n in mask if bool((new[n] & ~mask[n]).any())]
        if regrown:  # cannot happen while kept_target(d_t) is non-increasing; guard anyway
            raise PruningError(f"{method}: pruned entries regrew in {regrown}")
        mask = new
        logger.info(
            "%s iteration %d/%d: density %.6f (kept %d/%d, %.1f%% zero scores)",
            method,
            t,
            iterations,
            d_t,
            kept_count(mask),
            total,
            100 * zero_fractions[-1],
        )
    flagged = [f for f in zero_fractions if f > ZERO_SCORE_WARNING]
    if flagged:
        logger.warning(
            "%s: in %d of %d iterations more than %.0f%% of the kept weights scored exactly 0 "
            "(worst %.0f%%), so their order fell back to tensor/index order (e.g. ReLU units "
            "dead for the whole batch in that weight draw); more scoring batches per iteration "
            "(NTK-SAP: repeats) make the scores reliable",
            method,
            len(flagged),
            iterations,
            100 * ZERO_SCORE_WARNING,
            100 * max(flagged),
        )
    logger.debug("%s layer densities: %s", method, layer_densities(mask))
    return mask
