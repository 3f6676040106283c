"""Sparse masks over a model's prunable weights.

Conventions used across the library:

* The **prunable** tensors are the ``weight`` of every ``nn.Conv2d`` and ``nn.Linear``; biases
  and normalisation parameters are never pruned.
* A :data:`Mask` maps each prunable parameter's name (as in ``model.named_parameters()``) to a
  ``torch.bool`` tensor of the same shape, in the model's parameter order. ``True`` = kept.
"""

from __future__ import annotations

import math

import torch
from torch import nn

Mask = dict[str, torch.Tensor]


def check_density(density: float, name: str = "density") -> float:
    """Return ``density`` as a float after checking it lies in (0, 1]."""
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(f"{name} must be a number in (0, 1], got {type(density).__name__}")
    if not (0.0 < float(density) <= 1.0) or math.isnan(density):
        raise ValueError(f"{name} must be in (0, 1], got {density!r}")
    return float(density)


def prunable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, weight)`` of every Conv2d/Linear weight, in ``named_parameters`` order."""
    prunable_ids = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    return [(n, p) for n, p in model.named_parameters() if id(p) in prunable_ids]


def dense_mask(model: nn.Module) -> Mask:
    """A mask that keeps every prunable weight (density 1)."""
    return {n: torch.ones_like(p, dtype=torch.bool) for n, p in prunable_parameters(model)}


def validate_mask(model: nn.Module, mask: Mask) -> Mask:
    """Check that ``mask`` covers exactly the prunable weights of ``model`` with matching shapes.

    Raises
    ------
    TypeError
        If ``mask`` is not a dict of bool tensors.
    ValueError
        If names or shapes disagree with the model (the message names the parameter).

    """
    if not isinstance(mask, dict):
        raise TypeError(f"mask must be a dict of bool tensors, got {type(mask).__name__}")
    expected = dict(prunable_parameters(model))
    missing = sorted(set(expected) - set(mask))
    extra = sorted(set(mask) - set(expected))
    if missing or extra:
        raise ValueError(
            f"mask does not match the model's prunable weights: "
            f"missing {missing}, unexpected {extra}"
        )
    for name, param in expected.items():
        m = mask[name]
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            raise TypeError(f"mask[{name!r}] must be a torch.bool tensor")
        if m.shape != param.shape:
            raise ValueError(
                f"mask shape mismatch for {name!r}: "
                f"mask {tuple(m.shape)} vs weight {tuple(param.shape)}"
            )
    return mask


def kept_count(mask: Mask) -> int:
    """Number of kept (True) entries over all prunable tensors."""
    return int(sum(int(m.sum()) for m in mask.values()))


def total_count(mask: Mask) -> int:
    """Number of prunable entries covered by ``mask``."""
    return int(sum(m.numel() for m in mask.values()))


def mask_density(mask: Mask) -> float:
    """Fraction of prunable weights kept."""
    return kept_count(mask) / total_count(mask)


def layer_densities(mask: Mask) -> dict[str, float]:
    """Per-tensor kept fraction."""
    return {n: float(m.float().mean()) for n, m in mask.items()}


@torch.no_grad()
def apply_mask_(model: nn.Module, mask: Mask) -> nn.Module:
    """Zero every pruned weight of ``model`` in place."""
    params = dict(model.named_parameters())
    for name, m in mask.items():
        params[name].mul_(m.to(params[name].dtype))
    return model


def kept_target(density: float, total: int) -> int:
    """The exact number of entries a mask of ``density`` over ``total`` entries keeps: ceil(d*n)."""
    return min(total, math.ceil(check_density(density) * total - 1e-9))


def global_topk_mask(scores: dict[str, torch.Tensor], density: float) -> Mask:
    """Keep the globally highest-scoring ``ceil(density * n)`` entries, never emptying a tensor.

    Ties are broken by position (earlier tensor, then lower flat index, wins), so the result is
    deterministic and the kept count is exact. To avoid layer collapse, the best entry of each
    tensor is reserved first; the rest of the budget goes to the global top scores.

    Parameters
    ----------
    scores : dict of str to Tensor
        One score tensor per prunable parameter (higher = more important). ``-inf`` marks entries
        that must not be kept unless a tensor would otherwise be empty.
    density : float
        Target kept fraction in (0, 1].

    Returns
    -------
    Mask
        Bool tensors shaped like ``scores``.

    """
    if not scores:
        raise ValueError("scores must hold at least one tensor")
    names = list(scores)
    flat = torch.cat([scores[n].detach().reshape(-1).to(torch.float64) for n in names])
    flat = torch.nan_to_num(flat, nan=-math.inf)
    total = flat.numel()
    k = kept_target(density, total)
    if k < len(names):
        raise ValueError(
            f"density {density} keeps {k} weights, fewer than the {len(names)} prunable tensors"
        )
    sizes = [scores[n].numel() for n in names]
    offsets = torch.tensor([0, *sizes]).cumsum(0)
    keep = torch.zeros(total, dtype=torch.bool)
    # Reserve each tensor's best entry (argmax returns the first maximal index: deterministic).
    for i in range(len(names)):
        lo, hi = int(offsets[i]), int(offsets[i + 1])
        keep[lo + int(torch.argmax(flat[lo:hi]))] = True
    remaining = k - len(names)
    if remaining > 0:
        candidates = flat.clone()
        candidates[keep] = -math.inf
        # Stable descending sort: equal scores keep their index order.
        order = torch.sort(candidates, descending=True, stable=True).indices
        chosen = order[torch.logical_not(keep[order])][:remaining]
        keep[chosen] = True
    out: Mask = {}
    for i, name in enumerate(names):
        out[name] = keep[int(offsets[i]) : int(offsets[i + 1])].reshape(scores[name].shape)
    return out
