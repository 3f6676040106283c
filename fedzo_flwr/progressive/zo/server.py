"""The server's side of ``zo-progressive``: a :class:`ZOServer` over the active stage's space.

:class:`StageZOServer` holds the staged model and its staged mask and, for the active stage, a
:class:`~fedzo_flwr.zo.server.ZOServer` built on the stage's active module
(:class:`~.active.ActiveStage`): it reconstructs each round's update over the stage's kept
coordinates from the clients' scalars and steps them with the run's server optimizer, exactly as
for ``zo-pruned``. The frozen blocks are never touched. :meth:`StageZOServer.set_stage` rebuilds
the space and starts a fresh optimizer (and an empty replay history, so every node gets the new
stage's weights in full once) from the current values of the new stage's tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedzo_flwr.config import RunConfig
from fedzo_flwr.progressive.staged import StagedModel
from fedzo_flwr.progressive.zo.active import ActiveStage
from fedzo_flwr.sparse.mask import Mask
from fedzo_flwr.zo.server import ClientUpdate, RoundSummary, ZOServer

__all__ = ["StageZOServer"]


class StageZOServer:
    """Global state of a ``zo-progressive`` run: the staged model and the active stage's server.

    Parameters
    ----------
    cfg : RunConfig
        Validated run configuration (K, σ, optimizer, aggregation, seeds, replay history).
    staged : StagedModel
        The staged global model, masked (:func:`~.active.apply_staged_mask_`).
    mask : Mask
        Its staged mask (:func:`~.active.staged_mask`).
    stage : int
        The first active stage.

    Attributes
    ----------
    active : ActiveStage
        The active stage.
    server : ZOServer
        The zeroth-order server over ``active.module`` and ``active.mask``.

    """

    def __init__(self, cfg: RunConfig, staged: StagedModel, mask: Mask, stage: int = 0) -> None:
        self.cfg = cfg
        self.staged = staged
        self.mask = mask
        self.active = ActiveStage(staged, stage, mask)
        self.server = ZOServer(cfg, self.active.module, self.active.mask)

    @property
    def stage(self) -> int:
        """The active stage."""
        return self.active.stage

    def set_stage(self, stage: int) -> None:
        """Make ``stage`` active: new space, fresh optimizer and replay history."""
        self.active = ActiveStage(self.staged, stage, self.mask)
        self.server = ZOServer(self.cfg, self.active.module, self.active.mask)

    def round_seed(self, server_round: int) -> int:
        """The seed broadcast in ``server_round``."""
        return self.server.round_seed(server_round)

    def expected_seeds(self, server_round: int, partition_id: int) -> list[int]:
        """The step seeds a client of ``partition_id`` must use in ``server_round``."""
        return self.server.expected_seeds(server_round, partition_id)

    def apply_round(self, updates: Sequence[ClientUpdate], server_round: int = 0) -> RoundSummary:
        """Reconstruct the round's update over the stage's kept coordinates and step them."""
        return self.server.apply_round(updates, server_round)
