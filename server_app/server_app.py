"""ServerApp: prune, then run FedZO rounds (or the FedAvg baseline) and record results.

Pruning is data-free on the server, or a federated phase for data-dependent pruners.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from logging import ERROR, INFO
from pathlib import Path

import torch
from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedzo_flwr.config import ConfigError, RunConfig
from fedzo_flwr.data import load_dataset
from fedzo_flwr.errors import RunSetupError
from fedzo_flwr.files import atomic_write_bytes
from fedzo_flwr.measure.flops import forward_flops, zo_step_flops
from fedzo_flwr.protocol.wire import mask_nbytes, sparse_weights_nbytes
from fedzo_flwr.pruning.client import needs_client_data
from fedzo_flwr.run.checkpoint import CheckpointError, check_compatible, load_checkpoint
from fedzo_flwr.run.results import RunRecorder
from fedzo_flwr.run.setup import InitialModel, build_global_model, initial_model
from fedzo_flwr.sparse.mask import (
    apply_mask_,
    kept_count,
    layer_densities,
    mask_density,
    total_count,
)
from fedzo_flwr.zo.server import ZOServer
from server_app.fedavg_strategy import run_fedavg
from server_app.federated_pruning import PruningPhaseError, federated_prune
from server_app.strategy import FedZO, kept_arrays

app = ServerApp()


def default_run_name(cfg: RunConfig) -> str:
    """``<method>-<model>-<partitioner>-d<density>-s<seed>-<UTC time>``."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    part = cfg.partitioner + (f"{cfg.alpha:g}" if cfg.partitioner == "dirichlet" else "")
    return f"{cfg.method}-{cfg.model}-{part}-d{cfg.effective_density:g}-s{cfg.seed}-{stamp}"


def load_setup(run_config: dict) -> tuple[RunConfig, object]:
    """Validate the config and load the test set before anything else (fail fast)."""
    try:
        cfg = RunConfig.from_run_config(run_config)
        return cfg, load_dataset(cfg.dataset, cfg.resolve_data_dir())
    except (ConfigError, FileNotFoundError, ValueError) as err:
        log(ERROR, "fedzo: cannot start the run: %s", err)
        raise RunSetupError(str(err)) from None


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run a federation as configured by ``context.run_config`` (``method`` picks the trainer)."""
    cfg, test_data = load_setup(dict(context.run_config))
    if cfg.method == "fedavg" and cfg.resume_from:
        log(ERROR, "fedzo: cannot start the run: resume-from is not supported by method fedavg")
        raise RunSetupError("key 'resume-from': not supported by method 'fedavg'")
    run_dir = cfg.resolve_output_dir() / (cfg.run_name or default_run_name(cfg))
    recorder = RunRecorder(run_dir, cfg.to_run_config())
    log(INFO, "fedzo: results go to %s", run_dir)

    init = starting_model(grid, cfg, recorder)
    if cfg.method == "fedavg":
        run_fedavg(grid, cfg, init.model, init.mask, init.prune_seconds, test_data, recorder)
        log(INFO, "fedzo: fedavg finished; wrote %s", recorder.results_path)
        return
    server = ZOServer(cfg, init.model, init.mask)
    start_round = resume(cfg, server, recorder) if cfg.resume_from else 0
    input_shape = tuple(test_data.x_test.shape[1:][::-1])  # HWC -> CHW
    flops = forward_flops(init.model, init.mask, input_shape=input_shape)
    step_flops = zo_step_flops(init.model, init.mask, cfg.batch_size, cfg.k, cfg.fd)
    recorder.set_setup(
        density=mask_density(init.mask),
        kept_weights=kept_count(init.mask),
        prunable_weights=total_count(init.mask),
        kept_coordinates=server.space.dim,
        layer_densities=layer_densities(init.mask),
        prune_seconds=init.prune_seconds,
        mask_bytes=mask_nbytes(init.mask),
        sparse_weights_bytes=sparse_weights_nbytes(server.space),
        forward_flops_per_example={"dense": flops.dense, "sparse": flops.sparse},
        client_round_forward_flops=step_flops * cfg.local_steps,
        flops_note="FlopCounterMode conv/linear FLOPs scaled by each layer's kept fraction",
    )
    strategy = FedZO(server, recorder, test_data, step_flops * cfg.local_steps, start_round)
    started = time.perf_counter()
    strategy.start(
        grid=grid,
        initial_arrays=kept_arrays(server),
        num_rounds=cfg.num_server_rounds - start_round,
        timeout=cfg.round_timeout,
        evaluate_fn=strategy.evaluate_global,
    )
    checkpoint = run_dir / "model.pt"
    server.eval_model()
    buffer = _serialize_checkpoint(cfg, server)
    server.restore_training_weights()
    atomic_write_bytes(checkpoint, buffer)
    final = recorder.finish(
        rounds=cfg.num_server_rounds,
        seconds=time.perf_counter() - started,
        rejected_replies=strategy.rejected_total,
        checkpoint=str(checkpoint),
    )
    plot = recorder.plot()
    log(
        INFO,
        "fedzo: final accuracy %s; wrote %s, %s and %s",
        final.get("accuracy"),
        recorder.results_path,
        plot,
        checkpoint,
    )


def starting_model(grid: Grid, cfg: RunConfig, recorder: RunRecorder) -> InitialModel:
    """θ0 and its mask: data-free pruning on the server, or a federated pruning phase.

    ``snip`` and ``ntk-local`` score on client data, so the clients compute the scores
    (``server_app.federated_pruning``); the phase's measured bytes go to ``setup.pruning_phase``.
    """
    if not needs_client_data(cfg):
        return initial_model(cfg)
    model = build_global_model(cfg)
    started = time.perf_counter()
    try:
        mask, report = federated_prune(grid, cfg, model)
    except PruningPhaseError as err:
        log(ERROR, "fedzo: cannot start the run: %s", err)
        raise RunSetupError(str(err)) from None
    apply_mask_(model, mask)
    recorder.set_setup(pruning_phase=report)
    return InitialModel(model, mask, time.perf_counter() - started)


def resume(cfg: RunConfig, server: ZOServer, recorder: RunRecorder) -> int:
    """Load ``resume-from`` into ``server`` and ``recorder``; return the rounds already done."""
    path = Path(cfg.resume_from).expanduser().resolve()
    try:
        state = load_checkpoint(path)
        check_compatible(state, cfg, server.mask, path)
    except CheckpointError as err:
        log(ERROR, "fedzo: cannot resume: %s", err)
        raise RunSetupError(str(err)) from None
    server.load_state_dict(state["server"])
    recorder.data["rounds"] = [
        r for r in state["results"]["rounds"] if r["round"] <= state["round"]
    ]
    recorder.data["resumed_from"] = {"path": str(path), "round": state["round"]}
    recorder.write()
    log(INFO, "fedzo: resumed from %s after round %d", path, state["round"])
    return int(state["round"])


def _serialize_checkpoint(cfg: RunConfig, server: ZOServer) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(
        {
            "config": cfg.to_run_config(),
            "model_state": {k: v.clone() for k, v in server.model.state_dict().items()},
            "mask": server.mask,
            "optimizer": server.optimizer.state_dict(),
        },
        buffer,
    )
    return buffer.getvalue()
