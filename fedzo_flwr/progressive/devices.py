"""Memory-heterogeneous simulated devices: a memory budget per node, seeded by partition id.

Profiles (``memory-profile``):

``none``
    no budget: every node can train every stage (and the full model).
``profl-uniform`` [code]
    budget = ``U[0.12, 1.07]`` x the full model's training need (``full_need_bytes``), drawn per
    partition id. ProFL's released code draws budgets uniformly from 100..900 against a
    full-model threshold of 840, i.e. ratios 0.119..1.071 of the full need.
``device-tier`` [ours]
    each node is one of :data:`DEVICE_TIERS` (Raspberry Pi Zero 2 W 512 MB, Raspberry Pi 4 1 GB,
    Raspberry Pi 4 4 GB, Jetson Orin Nano 8 GB), drawn per partition id with the proportions
    ``device-proportions``; its budget is ``device-usable-share`` (default 0.5, ours) of its RAM:
    the operating system, the Python/torch runtime and the Flower client take the rest.

Every draw comes from ``derive_seed(memory-seed, "progressive/device", partition_id)``, so a node
keeps its budget across rounds, runs and processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedzo_flwr.errors import ConfigError
from fedzo_flwr.seeding import derive_seed

__all__ = [
    "DEVICE_TIERS",
    "MEMORY_PROFILES",
    "PROFL_RATIO_RANGE",
    "DeviceTier",
    "NodeDevice",
    "device_budget",
]

MEMORY_PROFILES: tuple[str, ...] = ("none", "profl-uniform", "device-tier")
PROFL_RATIO_RANGE: tuple[float, float] = (0.12, 1.07)
_DEVICE_STREAM = "progressive/device"
_MIB = 1 << 20


@dataclass(frozen=True)
class DeviceTier:
    """A kind of device: its name and its RAM in bytes."""

    name: str
    ram_bytes: int


DEVICE_TIERS: tuple[DeviceTier, ...] = (
    DeviceTier("pi-zero-2w-512mb", 512 * _MIB),
    DeviceTier("pi4-1gb", 1024 * _MIB),
    DeviceTier("pi4-4gb", 4096 * _MIB),
    DeviceTier("jetson-orin-nano-8gb", 8192 * _MIB),
)


@dataclass(frozen=True)
class NodeDevice:
    """The simulated device of one node.

    Attributes
    ----------
    partition_id : int
        The node's partition.
    budget_bytes : int or None
        Memory available for training; ``None`` = unlimited (profile ``none``).
    kind : str
        Profile name, or the tier's name for ``device-tier``.

    """

    partition_id: int
    budget_bytes: int | None
    kind: str


def _proportions(values: tuple[float, ...]) -> np.ndarray:
    if len(values) != len(DEVICE_TIERS):
        raise ConfigError(
            f"device-proportions needs {len(DEVICE_TIERS)} values "
            f"({', '.join(t.name for t in DEVICE_TIERS)}), got {len(values)}"
        )
    array = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(array)) or np.any(array < 0) or array.sum() <= 0:
        raise ConfigError(f"device-proportions must be >= 0 and not all 0, got {values!r}")
    normalised: np.ndarray = array / array.sum()
    return normalised


def device_budget(
    profile: str,
    partition_id: int,
    full_need_bytes: int,
    seed: int = 0,
    proportions: tuple[float, ...] = (0.25, 0.25, 0.25, 0.25),
    usable_share: float = 0.5,
) -> NodeDevice:
    """The device of node ``partition_id`` under ``profile`` (see the module docstring).

    Parameters
    ----------
    profile : str
        ``memory-profile``: one of :data:`MEMORY_PROFILES`.
    partition_id : int
        The node's partition id (seeds its draw).
    full_need_bytes : int
        The full model's training need (``profl-uniform``'s unit), e.g.
        :func:`~fedzo_flwr.progressive.memory.full_backprop_memory` ``.total_bytes``.
    seed : int
        ``memory-seed``.
    proportions : tuple of float
        ``device-proportions``: share of each tier of :data:`DEVICE_TIERS` (normalised).
    usable_share : float
        ``device-usable-share``: fraction of a tier's RAM available for training.

    """
    if isinstance(partition_id, bool) or not isinstance(partition_id, int) or partition_id < 0:
        raise ValueError(f"partition_id must be an int >= 0, got {partition_id!r}")
    if profile not in MEMORY_PROFILES:
        raise ConfigError(
            f"memory-profile must be one of {', '.join(MEMORY_PROFILES)}, got {profile!r}"
        )
    if profile == "none":
        return NodeDevice(partition_id, None, "none")
    rng = np.random.default_rng(derive_seed(seed, _DEVICE_STREAM, partition_id))
    if profile == "profl-uniform":
        if full_need_bytes < 1:
            raise ValueError(f"full_need_bytes must be >= 1, got {full_need_bytes!r}")
        ratio = rng.uniform(*PROFL_RATIO_RANGE)
        return NodeDevice(partition_id, int(ratio * full_need_bytes), "profl-uniform")
    if not 0 < usable_share <= 1:
        raise ConfigError(f"device-usable-share must be in (0, 1], got {usable_share!r}")
    tier = DEVICE_TIERS[int(rng.choice(len(DEVICE_TIERS), p=_proportions(proportions)))]
    return NodeDevice(partition_id, int(usable_share * tier.ram_bytes), tier.name)
