"""A round's update as data: what the server stepped with, so a client can take the same step.

The update of a zeroth-order round is a deterministic function of its seeds, the aggregated
scalars and the optimizer state. :class:`RoundUpdate` holds exactly what the server fed its
optimizer: per group of clients that shared seeds, the group's share of the round and the
float32 coefficients ``c_k = ΔL_k / (h K)`` of each local step. :func:`round_gradient` turns it
into the gradient estimate; the server (:class:`fedzo_flwr.zo.server.ZOServer`) calls it for its
own step and a client holding the previous weights calls it again (:class:`ReplayState`), so the
two stay bit-identical with no weights on the downlink. :func:`kept_hash` fingerprints the
result so a client can tell when its copy has drifted (lost state, corruption) and ask for the
full weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedzo_flwr.zo.reconstruct import gradient_from_coefficients, gradients_from_coefficients
from fedzo_flwr.zo.server_optimizer import OptimizerSettings, ServerOptimizer, clip_
from fedzo_flwr.zo.settings import ZOSettings

HASH_HEX_DIGITS = 16
OPTIMIZER_PREFIX = "optimizer."


@dataclass(frozen=True)
class SeedGroup:
    """The clients of a round that used the same step seeds, merged.

    Parameters
    ----------
    share : float
        The group's weight in the round's gradient (its clients' share of the examples).
    seeds : tuple of int
        One seed per local step.
    coefficients : np.ndarray
        ``(local_steps, K)`` float32: the factor of each direction of each step.
    """

    share: float
    seeds: tuple[int, ...]
    coefficients: np.ndarray

    def __post_init__(self) -> None:
        if self.coefficients.dtype != np.float32 or self.coefficients.ndim != 2:
            raise ValueError("coefficients must be a 2-d float32 array (local_steps, K)")
        if self.coefficients.shape[0] != len(self.seeds):
            raise ValueError(
                f"{len(self.seeds)} seeds but {self.coefficients.shape[0]} rows of coefficients"
            )


@dataclass(frozen=True)
class RoundUpdate:
    """Everything the server's optimizer step of one round depended on, and its result's hash.

    Parameters
    ----------
    server_round : int
        The round this update concluded.
    groups : tuple of SeedGroup
        In the order the server accumulated them.
    kept_hash : str
        :func:`kept_hash` of the kept weights after the step.
    """

    server_round: int
    groups: tuple[SeedGroup, ...]
    kept_hash: str

    @property
    def k(self) -> int:
        """Directions per step."""
        return int(self.groups[0].coefficients.shape[1]) if self.groups else 0


def round_gradient(
    sizes: Sequence[int],
    groups: Sequence[SeedGroup],
    settings: ZOSettings,
    clip: float = 0.0,
    clip_norm: str = "inf",
) -> torch.Tensor:
    """The round's gradient estimate: ``Σ_groups share · Σ_steps Σ_k c_k u_k`` (float32).

    ``sizes`` is the direction layout (``KeptSpace.sizes``). With ``clip > 0`` every group's
    estimate (one client's, under ``clip-scope = client``) is rescaled to ``clip_norm`` norm at
    most ``clip`` before it is weighted by its share (:func:`clipped_round_gradient`). The one
    implementation both the server's step and a replaying client use.
    """
    if clip > 0:
        return clipped_round_gradient(sizes, groups, settings, clip, clip_norm)
    dim = sum(sizes)
    grad = torch.zeros(dim, dtype=torch.float32)
    for group in groups:
        total = torch.zeros(dim, dtype=torch.float32)
        for seed, coefficients in zip(group.seeds, group.coefficients, strict=True):
            total += gradient_from_coefficients(sizes, seed, coefficients, settings.directions)
        grad += group.share * total
    return grad


def clipped_round_gradient(
    sizes: Sequence[int],
    groups: Sequence[SeedGroup],
    settings: ZOSettings,
    clip: float,
    clip_norm: str = "inf",
) -> torch.Tensor:
    """``Σ_groups share · clip(Σ_steps Σ_k c_k u_k)`` (float32), each group clipped alone.

    Groups with the same seeds (clients of ``seed-mode = shared``) are reconstructed together,
    so each step's directions are generated once per round, not once per client
    (:func:`~fedzo_flwr.zo.reconstruct.gradients_from_coefficients`). The shares are then added
    in the groups' order.
    """
    dim = sum(sizes)
    by_seeds: dict[tuple[int, ...], list[int]] = {}
    for index, group in enumerate(groups):
        by_seeds.setdefault(group.seeds, []).append(index)
    totals: dict[int, torch.Tensor] = {}
    for seeds, members in by_seeds.items():
        block = torch.zeros(len(members), dim, dtype=torch.float32)
        for step, seed in enumerate(seeds):
            rows = np.stack([groups[i].coefficients[step] for i in members])
            block += gradients_from_coefficients(sizes, seed, rows, settings.directions)
        for row, index in enumerate(members):
            totals[index] = clip_(block[row], clip, clip_norm)
    grad = torch.zeros(dim, dtype=torch.float32)
    for index, group in enumerate(groups):
        grad += group.share * totals[index]
    return grad


def kept_hash(weights: torch.Tensor) -> str:
    """Short SHA-256 of kept weights as little-endian float32 (16 hex digits)."""
    data = np.ascontiguousarray(weights.detach().cpu().numpy(), dtype="<f4").tobytes()
    return hashlib.sha256(data).hexdigest()[:HASH_HEX_DIGITS]


class ReplayState:
    """A client's copy of the global kept weights and optimizer, stepped from round updates.

    Parameters
    ----------
    weights : Tensor
        The kept weights the client received in full, shape ``(dim,)``.
    sizes : sequence of int
        Their direction layout (``KeptSpace.sizes``, summing to ``dim``).
    settings : ZOSettings
        The run's estimator settings (direction kind, K).
    optimizer : OptimizerSettings
        The server optimizer's settings; momentum and Adam keep 1x / 2x the kept values here.
    optimizer_state : dict, optional
        :meth:`ServerOptimizer.state_dict` of the server's optimizer at the time of ``weights``
        (needed for stateful optimizers; plain SGD needs none). The EMA of the evaluated
        weights is not kept: it never changes the training weights.
    """

    def __init__(
        self,
        weights: torch.Tensor,
        sizes: Sequence[int],
        settings: ZOSettings,
        optimizer: OptimizerSettings,
        optimizer_state: dict[str, object] | None = None,
    ) -> None:
        if sum(sizes) != weights.numel():
            raise ValueError(f"sizes sum to {sum(sizes)} but weights hold {weights.numel()} values")
        self.sizes = tuple(sizes)
        self.settings = settings
        # The EMA only changes what the server evaluates, never the training weights.
        self.optimizer = ServerOptimizer(weights, dataclasses.replace(optimizer, ema_decay=0.0))
        if optimizer_state is not None:
            self.optimizer.load_state_dict({**optimizer_state, "ema": None})

    @property
    def weights(self) -> torch.Tensor:
        """The current kept weights."""
        return self.optimizer.weights

    def arrays(self) -> dict[str, np.ndarray]:
        """The state as named float32 arrays: ``kept`` and the optimizer's per-coordinate buffers.

        Plain SGD has none; momentum one (``momentum_buffer``); Adam two (``exp_avg``,
        ``exp_avg_sq``) plus its step count (a 0-d array). What a node keeps between rounds.
        """
        out = {"kept": self.weights.numpy().copy()}
        for name, value in self.optimizer.optimizer.state_dict()["state"].get(0, {}).items():
            out[f"{OPTIMIZER_PREFIX}{name}"] = value.detach().numpy().copy()
        return out

    @classmethod
    def from_arrays(
        cls,
        arrays: dict[str, np.ndarray],
        sizes: Sequence[int],
        settings: ZOSettings,
        optimizer: OptimizerSettings,
        steps: int,
    ) -> ReplayState:
        """Rebuild a state saved with :meth:`arrays` (``steps``: optimizer steps taken so far)."""
        kept = torch.from_numpy(np.array(arrays["kept"], dtype=np.float32))
        state = cls(kept, sizes, settings, optimizer)
        buffers = {
            name.removeprefix(OPTIMIZER_PREFIX): torch.from_numpy(np.array(value))
            for name, value in arrays.items()
            if name.startswith(OPTIMIZER_PREFIX)
        }
        inner = state.optimizer.optimizer.state_dict()
        inner["state"] = {0: buffers} if buffers else {}
        state.optimizer.optimizer.load_state_dict(inner)
        state.optimizer.steps = steps
        return state

    def apply(self, update: RoundUpdate) -> bool:
        """Take ``update``'s step; return whether the result matches the server's hash."""
        opt = self.optimizer.settings
        grad = round_gradient(
            self.sizes, update.groups, self.settings, opt.group_clip, opt.clip_norm
        )
        self.optimizer.step(grad)
        return kept_hash(self.weights) == update.kept_hash


def update_state(update: RoundUpdate) -> dict[str, Any]:
    """``update`` as tensors and plain data (what a checkpoint stores, loadable weights-only)."""
    return {
        "round": update.server_round,
        "hash": update.kept_hash,
        "groups": [
            {
                "share": group.share,
                "seeds": list(group.seeds),
                "coefficients": torch.from_numpy(group.coefficients.copy()),
            }
            for group in update.groups
        ],
    }


def update_from_state(state: dict[str, Any]) -> RoundUpdate:
    """Inverse of :func:`update_state`."""
    groups = tuple(
        SeedGroup(
            float(group["share"]),
            tuple(int(s) for s in group["seeds"]),
            group["coefficients"].numpy().astype(np.float32),
        )
        for group in state["groups"]
    )
    return RoundUpdate(int(state["round"]), groups, str(state["hash"]))
