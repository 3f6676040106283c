"""ServerApp: prune, then run FedZO rounds (or FedAvg, progressive, zo-progressive) and record.

Pruning is data-free on the server, or a federated phase for data-dependent pruners.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from logging import ERROR, INFO
from pathlib import Path
from typing import Any, Protocol

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedzo_flwr.config import ZO_PROGRESSIVE, RunConfig
from fedzo_flwr.data import DatasetArrays, load_dataset
from fedzo_flwr.errors import CheckpointError, ConfigError, DataError, PruningError, RunSetupError
from fedzo_flwr.measure.flops import zo_step_flops
from fedzo_flwr.pruning.client import needs_client_data
from fedzo_flwr.run.checkpoint import check_compatible, load_checkpoint
from fedzo_flwr.run.results import RunRecorder
from fedzo_flwr.run.setup import InitialModel, build_global_model, initial_model
from fedzo_flwr.sparse.mask import Mask, apply_mask_
from fedzo_flwr.zo.server import ZOServer
from server_app.fedavg_strategy import MaskedFedAvg
from server_app.federated_pruning import federated_prune
from server_app.identity import PartitionRegistry
from server_app.logs import log
from server_app.masked_rounds import MaskedRounds
from server_app.progressive_strategy import ProgressiveRounds
from server_app.strategy import FedZO
from server_app.zo_progressive_strategy import ZOProgressiveRounds

app = ServerApp()


def default_run_name(cfg: RunConfig) -> str:
    """``<method>-<model>-<partitioner>-d<density>-s<seed>-<UTC time>``."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    part = cfg.partitioner + (f"{cfg.alpha:g}" if cfg.partitioner == "dirichlet" else "")
    return f"{cfg.method}-{cfg.model}-{part}-d{cfg.effective_density:g}-s{cfg.seed}-{stamp}"


def load_setup(run_config: dict[str, Any]) -> tuple[RunConfig, DatasetArrays]:
    """Validate the config and load the test set before anything else (fail fast)."""
    try:
        cfg = RunConfig.from_run_config(run_config)
        return cfg, load_dataset(cfg.dataset, cfg.resolve_data_dir())
    except (ConfigError, DataError, FileNotFoundError, ValueError) as err:
        log(ERROR, "cannot start the run: %s", err)
        raise RunSetupError(str(err)) from None


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run a federation as configured by ``context.run_config`` (``method`` picks the trainer)."""
    cfg, test_data = load_setup(dict(context.run_config))
    if cfg.method == "fedavg" and cfg.resume_from:
        log(ERROR, "cannot start the run: resume-from is not supported by method fedavg")
        raise RunSetupError("key 'resume-from': not supported by method 'fedavg'")
    run_dir = cfg.resolve_output_dir() / (cfg.run_name or default_run_name(cfg))
    recorder = RunRecorder(run_dir, cfg.to_run_config())
    log(INFO, "results go to %s", run_dir)

    registry = PartitionRegistry()  # partition bindings, from the pruning phase to the end
    strategy: MaskedRounds[Any]
    if cfg.method == ZO_PROGRESSIVE:  # staged, pruned on the server: zeroth-order progressive
        zo_progressive = ZOProgressiveRounds.for_run(cfg, recorder, test_data)
        zo_progressive.run(grid, zo_progressive.prune_seconds, registry)
        return
    if cfg.progressive:  # dense, no pruning phase: progressive block training
        progressive = ProgressiveRounds.for_run(cfg, recorder, test_data)
        if cfg.resume_from:
            progressive.start_round = resume(cfg, progressive, recorder)
        progressive.run(grid, 0.0, registry)
        return
    init = starting_model(grid, cfg, recorder, registry)
    if cfg.method == "fedavg":
        strategy = MaskedFedAvg.for_model(cfg, init.model, init.mask, recorder, test_data)
    else:
        server = ZOServer(cfg, init.model, init.mask)
        start_round = resume(cfg, server, recorder) if cfg.resume_from else 0
        step_flops = zo_step_flops(init.model, init.mask, cfg.batch_size, cfg.k, cfg.fd)
        strategy = FedZO(server, recorder, test_data, step_flops * cfg.local_steps, start_round)
    strategy.run(grid, init.prune_seconds, registry)


def starting_model(
    grid: Grid, cfg: RunConfig, recorder: RunRecorder, registry: PartitionRegistry | None = None
) -> InitialModel:
    """θ0 and its mask: data-free pruning on the server, or a federated pruning phase.

    ``snip`` and ``ntk-local`` score on client data, so the clients compute the scores
    (``server_app.federated_pruning``); the phase's measured bytes go to ``setup.pruning_phase``.
    """
    if not needs_client_data(cfg):
        return initial_model(cfg)
    model = build_global_model(cfg)
    started = time.perf_counter()
    try:
        mask, report = federated_prune(grid, cfg, model, registry)
    except PruningError as err:
        log(ERROR, "cannot start the run: %s", err)
        raise RunSetupError(str(err)) from None
    apply_mask_(model, mask)
    recorder.set_setup(pruning_phase=report)
    return InitialModel(model, mask, time.perf_counter() - started)


class Resumable(Protocol):
    """What a checkpoint restores: a ``ZOServer`` or a ``ProgressiveRounds``."""

    @property
    def mask(self) -> Mask:
        """The run's mask (checked against the checkpoint's)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the server state saved in the checkpoint."""


def resume(cfg: RunConfig, server: Resumable, recorder: RunRecorder) -> int:
    """Load ``resume-from`` into ``server`` and ``recorder``; return the rounds already done."""
    path = Path(cfg.resume_from).expanduser().resolve()
    try:
        state = load_checkpoint(path)
        check_compatible(state, cfg, server.mask, path)
    except CheckpointError as err:
        log(ERROR, "cannot resume: %s", err)
        raise RunSetupError(str(err)) from None
    server.load_state_dict(state["server"])
    recorder.data["rounds"] = [
        r for r in state["results"]["rounds"] if r["round"] <= state["round"]
    ]
    recorder.data["resumed_from"] = {"path": str(path), "round": state["round"]}
    recorder.write()
    log(INFO, "resumed from %s after round %d", path, state["round"])
    return int(state["round"])
