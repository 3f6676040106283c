"""The pruning phase over Flower messages, for pruners that need client data (snip, ntk-local).

Before round 1 the ServerApp sends every connected node a ``query.prune`` message per scoring
iteration: the current mask (bitmap), the iteration and the node's scoring seed (``snip``: also
θ0 as an ArrayRecord). Each ClientApp answers with its signed mask gradients on its own
examples as float32 bytes; the server adds them weighted by the nodes' example counts, takes
``|·|`` and keeps the global top-k of the schedule (see :mod:`fedzo_flwr.pruning.client`). No
client data leaves a client; the bytes of every message are measured and recorded in
``results.json`` under ``setup.pruning_phase``.
"""

from __future__ import annotations

import time
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from torch import nn

from fedzo_flwr import protocol
from fedzo_flwr.config import RunConfig
from fedzo_flwr.errors import PruningError, ReplyRejected
from fedzo_flwr.protocol.wire import encode_mask
from fedzo_flwr.pruning import client as cp
from fedzo_flwr.sparse.mask import Mask
from server_app.logs import log
from server_app.message_size import message_nbytes
from server_app.nodes import wait_for_nodes

PRUNE_MESSAGE_TYPE = f"{MessageType.QUERY}.{cp.PRUNE_ACTION}"


class PruningPhaseError(PruningError):
    """Too few valid replies to score the mask."""


def parse_prune_reply(
    reply: Message, iteration: int, mask: Mask
) -> tuple[dict[str, torch.Tensor], int]:
    """The signed gradients and example count of one pruning reply.

    Raises
    ------
    ReplyRejected
        An error reply, a missing record, another iteration, a bad example count or a gradient
        payload that is not ``4 · n_w`` bytes of finite float32.
    """
    if reply.has_error():
        raise ReplyRejected(f"client error: {reply.error.reason}")
    record = reply.content.config_records.get(cp.PRUNE_KEY)
    metrics = reply.content.metric_records.get(protocol.METRICS_KEY)
    if record is None or metrics is None:
        raise ReplyRejected("reply lacks the 'prune' or 'metrics' record")
    reported = record.get(cp.ITERATION_KEY)
    if reported != iteration or not isinstance(reported, int):
        raise ReplyRejected(f"reply is for iteration {str(reported)[:20]}, this is {iteration}")
    examples = metrics.get("num-examples")
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
        raise ReplyRejected(f"num-examples must be a positive int, got {examples!r}")
    return cp.decode_gradients(record.get(cp.GRADIENTS_KEY), mask), examples


def federated_prune(grid: Grid, cfg: RunConfig, model: nn.Module) -> tuple[Mask, dict[str, Any]]:
    """Compute the run's mask with ``cfg.prune_method`` from the connected nodes' data.

    Parameters
    ----------
    grid : Grid
        The ServerApp's grid; every connected node takes part (at least ``min-clients``).
    cfg : RunConfig
        ``prune-method`` must be in :data:`fedzo_flwr.pruning.client.DATA_PRUNERS`.
    model : nn.Module
        The global model at θ0 (not modified).

    Returns
    -------
    (Mask, dict)
        The mask (exact kept count, no empty layer) and the phase report for ``results.json``:
        nodes, iterations, measured downlink/uplink bytes (total and per iteration), seconds.

    Raises
    ------
    PruningPhaseError
        If an iteration gets fewer than ``min-clients`` valid replies.
    """
    if cfg.prune_method not in cp.DATA_PRUNERS:
        raise ValueError(f"prune-method {cfg.prune_method!r} needs no pruning phase")
    started = time.perf_counter()
    wanted = max(cfg.min_clients, cfg.clients_per_round, 1)
    node_ids = wait_for_nodes(grid, wanted, cfg.round_timeout, "pruning phase")
    stream = {node: i for i, node in enumerate(node_ids)}
    weights_record = ArrayRecord(model.state_dict()) if cfg.prune_method == "snip" else None
    iterations: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []

    def collect(mask: Mask, t: int) -> list[tuple[dict[str, torch.Tensor], float]]:
        mask_bytes = encode_mask(mask)
        messages, down = [], 0
        message_node: dict[str, int] = {}
        for node in node_ids:
            config = ConfigRecord(
                {
                    cp.ITERATION_KEY: t,
                    cp.SCORING_SEED_KEY: cp.scoring_seed_for(cfg, stream[node], t),
                    protocol.MASK_KEY: mask_bytes,
                }
            )
            content = RecordDict({cp.PRUNE_KEY: config})
            if weights_record is not None:
                content[cp.WEIGHTS_KEY] = weights_record
            message = Message(content, dst_node_id=node, message_type=PRUNE_MESSAGE_TYPE)
            down += message_nbytes(message)
            message_node[message.object_id] = node
            messages.append(message)
        replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout))
        valid: dict[int, tuple[dict[str, torch.Tensor], int]] = {}
        up = 0
        for reply in replies:
            # Error replies made by the SuperLink carry its own id as sender: look the node up
            # by the message the reply answers.
            meta = reply.metadata
            node = message_node.get(meta.reply_to_message_id, meta.src_node_id)
            try:
                if node not in stream:
                    raise ReplyRejected("reply from a node that was not asked")
                if stream[node] in valid:
                    raise ReplyRejected("second reply of this node")
                share = parse_prune_reply(reply, t, mask)
            except ReplyRejected as err:
                log(WARNING, "Pruning iteration %d: dropped reply of node %d: %s", t, node, err)
                failures.append({"iteration": t, "node_id": node, "reason": str(err)})
                continue
            valid[stream[node]] = share
            up += message_nbytes(reply)
        if len(valid) < cfg.min_clients:
            raise PruningPhaseError(
                f"pruning iteration {t}: {len(valid)} valid replies, min-clients is "
                f"{cfg.min_clients}; cannot compute the {cfg.prune_method} mask"
            )
        iterations.append(
            {"iteration": t, "clients": len(valid), "downlink_bytes": down, "uplink_bytes": up}
        )
        log(
            INFO,
            "pruning (%s) iteration %d: %d clients, down %d B, up %d B",
            cfg.prune_method,
            t,
            len(valid),
            down,
            up,
        )
        return [valid[s] for s in sorted(valid)]  # node order: sums ignore arrival order

    mask = cp.phase_mask(model, cfg.prune_method, cfg.density, cp.prune_iterations(cfg), collect)
    report = {
        "method": cfg.prune_method,
        "nodes": len(node_ids),
        "iterations": len(iterations),
        "prune_samples_per_client": cfg.prune_samples,
        "downlink_bytes": sum(i["downlink_bytes"] for i in iterations),
        "uplink_bytes": sum(i["uplink_bytes"] for i in iterations),
        "per_iteration": iterations,
        "failures": failures,
        "seconds": time.perf_counter() - started,
    }
    return mask, report
