"""Server side: rebuild gradient estimates from ``(seed, scalars)`` pairs.

For K loss differences ``ΔL_k`` of seed ``s`` the estimate is

    g = (1/K) Σ_k (ΔL_k / h) u_k,      h = σ (forward) or 2σ (central),

restricted to the kept coordinates (``u_k`` lives in the KeptSpace, drawn block by block in the
layout ``sizes`` = ``KeptSpace.sizes``, see :mod:`fedzo_flwr.zo.directions`). It is linear in the
scalars, so clients that share a seed can be combined **before** reconstruction:
``Σ_c p_c g_c = g(Σ_c p_c ΔL_c)``. One reconstruction per round then costs O(K·dim) whatever
the number of clients. The client uses the very same functions for its local steps, which is what
makes server-side replay bit-exact.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedzo_flwr.zo.directions import DirectionGenerator
from fedzo_flwr.zo.settings import ZOSettings

DEFAULT_BLOCK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class ScalarStep:
    """One zeroth-order step as it travels: the seed and its K loss differences."""

    seed: int
    deltas: np.ndarray


def check_deltas(deltas: np.ndarray | Sequence[float], k: int, name: str = "deltas") -> np.ndarray:
    """Return ``deltas`` as a finite float64 vector of length ``k`` or raise ``ValueError``."""
    values = np.asarray(deltas, dtype=np.float64)
    if values.shape != (k,):
        raise ValueError(f"{name} must have shape ({k},), got {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name} must be finite (found NaN or inf)")
    return values


def estimate_gradient(
    sizes: Sequence[int],
    step: ScalarStep,
    settings: ZOSettings,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> torch.Tensor:
    """Gradient estimate (float32, shape ``(sum(sizes),)``) of one ``(seed, deltas)`` step.

    ``sizes`` is the direction layout (``KeptSpace.sizes``). Directions are regenerated in
    blocks of at most ``block_bytes`` and never held K at a time.
    """
    coeffs32 = step_coefficients(step.deltas, settings)
    return gradient_from_coefficients(sizes, step.seed, coeffs32, settings.directions, block_bytes)


def step_coefficients(deltas: np.ndarray | Sequence[float], settings: ZOSettings) -> np.ndarray:
    """The float32 factors ``ΔL_k / (h K)`` that weight direction ``u_k`` in the estimate.

    These K numbers (not the loss differences) are what the replay downlink ships: a client that
    multiplies them with the same directions reproduces the server's estimate bit for bit.
    """
    coeffs = check_deltas(deltas, settings.k) / (settings.difference_scale * settings.k)
    return coeffs.astype(np.float32)


def _direction_blocks(
    sizes: Sequence[int], seed: int, directions: str, k: int, block_bytes: int
) -> tuple[int, Iterator[tuple[slice, torch.Tensor]]]:
    """The dimension and the blocks ``(rows, u_rows)`` of the ``k`` directions of ``seed``.

    Each block holds at most ``block_bytes`` of directions, generated into one reused buffer
    (a block is valid until the next one is drawn).
    """
    generator = DirectionGenerator(sizes, seed, directions)
    dim = generator.dim
    rows = max(1, min(k, block_bytes // (4 * dim)))
    buffer = torch.empty(rows, dim, dtype=torch.float32)

    def blocks() -> Iterator[tuple[slice, torch.Tensor]]:
        for start in range(0, k, rows):
            stop = min(start + rows, k)
            yield slice(start, stop), generator.block(start, stop, out=buffer)

    return dim, blocks()


def gradient_from_coefficients(
    sizes: Sequence[int],
    seed: int,
    coefficients: np.ndarray,
    directions: str,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> torch.Tensor:
    """``Σ_k c_k u_k`` (float32, shape ``(sum(sizes),)``) for the directions of ``seed``.

    ``sizes`` is the direction layout (``KeptSpace.sizes``). Accumulated in float64 over
    blocks of at most ``block_bytes`` of directions.
    """
    coeffs32 = torch.from_numpy(np.ascontiguousarray(coefficients, dtype=np.float32))
    dim, blocks = _direction_blocks(sizes, seed, directions, int(coeffs32.numel()), block_bytes)
    grad = torch.zeros(dim, dtype=torch.float64)
    for rows, block in blocks:
        grad += (coeffs32[rows] @ block).to(torch.float64)
    return grad.to(torch.float32)


def gradients_from_coefficients(
    sizes: Sequence[int],
    seed: int,
    coefficients: np.ndarray,
    directions: str,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> torch.Tensor:
    """``Σ_k C[i, k] u_k`` for every row ``i`` of ``coefficients`` (shape ``(rows, K)``).

    Several clients' estimates over the same directions (per-client clipping): the directions
    of ``seed`` are generated once for all rows. Returns float32 ``(rows, sum(sizes))``,
    accumulated in float64 over blocks like :func:`gradient_from_coefficients` (whose single
    row it matches up to float32 rounding: a matrix product may sum in another order).
    """
    coeffs32 = torch.from_numpy(np.ascontiguousarray(coefficients, dtype=np.float32))
    if coeffs32.ndim != 2:
        raise ValueError(f"coefficients must be 2-d (rows, K), got shape {tuple(coeffs32.shape)}")
    dim, blocks = _direction_blocks(sizes, seed, directions, int(coeffs32.shape[1]), block_bytes)
    grads = torch.zeros(coeffs32.shape[0], dim, dtype=torch.float64)
    for rows, block in blocks:
        grads += (coeffs32[:, rows] @ block).to(torch.float64)
    return grads.to(torch.float32)


AGGREGATIONS: tuple[str, ...] = ("mean", "trimmed-mean", "median")


def aggregate_deltas(
    deltas: Sequence[np.ndarray],
    weights: Sequence[float],
    k: int,
    method: str = "mean",
    trim_fraction: float = 0.1,
) -> np.ndarray:
    """Combine several clients' loss differences for the same seed, direction by direction.

    Parameters
    ----------
    deltas : sequence of np.ndarray
        One (K,) vector per client, all for the same seed.
    weights : sequence of float
        Non-negative weights, e.g. the clients' example counts (used by ``mean``).
    k : int
        Expected length of each vector.
    method : {"mean", "trimmed-mean", "median"}
        ``mean``: weighted mean (weights normalised to sum 1). ``trimmed-mean``: for every
        direction, drop the ``trim_fraction`` largest and smallest values, then average the rest
        (unweighted). ``median``: per-direction median (unweighted). The robust options bound
        the influence of a client that sends garbage within the validation bounds.
    trim_fraction : float
        Fraction cut from each end by ``trimmed-mean``, in [0, 0.5).
    """
    if len(deltas) == 0:
        raise ValueError("deltas must hold at least one client's vector")
    if len(deltas) != len(weights):
        raise ValueError(f"got {len(deltas)} delta vectors but {len(weights)} weights")
    if method not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}; got {method!r}")
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    w = np.asarray(weights, dtype=np.float64)
    if np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {list(w)}")
    stacked = np.stack([check_deltas(d, k, f"deltas[{i}]") for i, d in enumerate(deltas)])
    if method == "median":
        median: np.ndarray = np.median(stacked, axis=0)
        return median
    if method == "trimmed-mean":
        cut = int(np.floor(trim_fraction * len(deltas)))
        ordered = np.sort(stacked, axis=0)
        trimmed: np.ndarray = ordered[cut : len(deltas) - cut].mean(axis=0)
        return trimmed
    mean: np.ndarray = (w / w.sum()) @ stacked
    return mean


def local_sgd_step(theta: torch.Tensor, grad: torch.Tensor, lr: float) -> torch.Tensor:
    """``theta - lr * grad``: the client's local step, replayed identically by the server."""
    return torch.add(theta, grad, alpha=-lr)


def local_sgd_step_(theta: torch.Tensor, grad: torch.Tensor, lr: float) -> None:
    """:func:`local_sgd_step` in place (the same elementwise op, the same bits): no new vector."""
    theta.add_(grad, alpha=-lr)


def accumulate_steps(
    sizes: Sequence[int], steps: Sequence[ScalarStep], settings: ZOSettings
) -> torch.Tensor:
    """Sum of the estimates of several steps: the pseudo-gradient of a multi-step round.

    With local SGD at learning rate η, a client that took ``steps`` moved by
    ``-η * accumulate_steps(...)``; the server feeds the sum to its own optimizer.
    """
    total = torch.zeros(sum(sizes), dtype=torch.float32)
    for step in steps:
        total += estimate_gradient(sizes, step, settings)
    return total


def replay(
    theta: torch.Tensor,
    sizes: Sequence[int],
    steps: Sequence[ScalarStep],
    settings: ZOSettings,
    lr: float,
) -> torch.Tensor:
    """Replay a client's local SGD trajectory exactly from its ``(seed, deltas)`` steps.

    ``sizes`` is the direction layout of ``theta`` (``KeptSpace.sizes``).
    """
    for step in steps:
        theta = local_sgd_step(theta, estimate_gradient(sizes, step, settings), lr)
    return theta
