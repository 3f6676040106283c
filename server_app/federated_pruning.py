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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from torch import nn

from fedzo_flwr import protocol
from fedzo_flwr.config import RunConfig
from fedzo_flwr.errors import PruningError, ReplyRejected
from fedzo_flwr.protocol import validate
from fedzo_flwr.protocol.wire import encode_mask
from fedzo_flwr.pruning import client as cp
from fedzo_flwr.sparse.mask import Mask
from server_app.identity import Claim, PartitionRegistry
from server_app.logs import log
from server_app.message_size import message_nbytes
from server_app.nodes import wait_for_nodes

PRUNE_MESSAGE_TYPE = f"{MessageType.QUERY}.{cp.PRUNE_ACTION}"


class PruningPhaseError(PruningError):
    """Too few valid replies to score the mask."""


@dataclass(frozen=True)
class PruneReply:
    """A validated pruning-phase reply: the node's signed gradients and its claims."""

    gradients: dict[str, torch.Tensor]
    num_examples: int
    partition_id: int
    num_partitions: int


def parse_prune_reply(reply: Message, iteration: int, mask: Mask) -> PruneReply:
    """The signed gradients, example count and partition of one pruning reply.

    Every field is read through :mod:`fedzo_flwr.protocol.validate`.

    Raises
    ------
    ReplyRejected
        An error reply, a missing record, another iteration, a bad example count or partition,
        or a gradient payload that is not ``4 · n_w`` bytes of finite float32.
    """
    if reply.has_error():
        raise ReplyRejected(f"client error: {reply.error.reason}")
    record = reply.content.config_records.get(cp.PRUNE_KEY)
    metrics = reply.content.metric_records.get(protocol.METRICS_KEY)
    if record is None or metrics is None:
        raise ReplyRejected("reply lacks the 'prune' or 'metrics' record")
    reported = validate.require_int(record, cp.ITERATION_KEY, low=0)
    if reported != iteration:
        raise ReplyRejected(f"reply is for iteration {reported}, this is {iteration}")
    examples = validate.require_int(metrics, "num-examples", low=1, high=validate.MAX_EXAMPLES)
    num_partitions = validate.require_int(
        metrics, protocol.NUM_PARTITIONS_KEY, low=1, high=validate.MAX_PARTITIONS
    )
    partition_id = validate.require_int(metrics, "partition-id", low=0, high=num_partitions - 1)
    gradients = cp.decode_gradients(record.get(cp.GRADIENTS_KEY), mask)
    return PruneReply(gradients, examples, partition_id, num_partitions)


def screen_prune_replies(
    replies: Iterable[Message],
    message_node: Mapping[str, int],
    stream: Mapping[int, int],
    iteration: int,
    mask: Mask,
    registry: PartitionRegistry,
) -> tuple[dict[int, tuple[dict[str, torch.Tensor], int]], int, list[dict[str, Any]]]:
    """The valid replies of one scoring iteration, keyed by the node's scoring stream.

    Each reply is handled inside one guard: a ``ReplyRejected`` or any other exception its
    content provokes drops that reply alone (logged, and listed in the returned failures with
    the node id and the reason). A node must have been asked, reply once, and hold its
    partition by the rules of :class:`~server_app.identity.PartitionRegistry` (the bindings
    made here carry over to the training rounds).

    Returns
    -------
    (dict, int, list)
        ``stream -> (gradients, num-examples)``, the measured uplink bytes of the valid replies,
        and the failures.
    """
    valid: dict[int, tuple[dict[str, torch.Tensor], int]] = {}
    failures: list[dict[str, Any]] = []
    up = 0
    for reply in replies:
        # Error replies made by the SuperLink carry its own id as sender: look the node up by
        # the message the reply answers.
        meta = reply.metadata
        node = message_node.get(meta.reply_to_message_id, meta.src_node_id)
        try:
            if node not in stream:
                raise ReplyRejected("reply from a node that was not asked")
            if stream[node] in valid:
                raise ReplyRejected("second reply of this node")
            parsed = parse_prune_reply(reply, iteration, mask)
            claim = Claim(parsed.partition_id, parsed.num_examples, parsed.num_partitions)
            registry.check(node, claim)
            size = message_nbytes(reply)
        except Exception as err:  # content must never end the run
            reason = validate.rejection_reason(err)
            log(
                WARNING,
                "Pruning iteration %d: dropped reply of node %d: %s",
                iteration,
                node,
                reason,
            )
            failures.append({"iteration": iteration, "node_id": node, "reason": reason})
            continue
        registry.bind(node, claim)
        valid[stream[node]] = (parsed.gradients, parsed.num_examples)
        up += size
    return valid, up, failures


def federated_prune(
    grid: Grid, cfg: RunConfig, model: nn.Module, registry: PartitionRegistry | None = None
) -> tuple[Mask, dict[str, Any]]:
    """Compute the run's mask with ``cfg.prune_method`` from the connected nodes' data.

    Parameters
    ----------
    grid : Grid
        The ServerApp's grid; every connected node takes part (at least ``min-clients``).
    cfg : RunConfig
        ``prune-method`` must be in :data:`fedzo_flwr.pruning.client.DATA_PRUNERS`.
    model : nn.Module
        The global model at θ0 (not modified).
    registry : PartitionRegistry, optional
        Where the nodes' partition claims are checked and bound (hand the same one to the
        training strategy, so that the bindings hold for the whole run).

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
    registry = PartitionRegistry() if registry is None else registry
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
        valid, up, dropped = screen_prune_replies(replies, message_node, stream, t, mask, registry)
        failures.extend(dropped)
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
