"""ClientApp handler of zeroth-order progressive training (``method = zo-progressive``, ours).

A train message names the stage ``t``. The node holds the run's staged model structure and the
staged mask (its bitmap from the first message, then from ``context.state``, as every
zeroth-order node holds its mask), loads blocks ``0..t-1`` from the message's ``frozen`` tensors
(once per stage, then from ``context.state``; :func:`client_app.progressive.load_frozen`) and the
active stage's kept coordinates from ``arrays``, rebuilds the
:class:`~fedzo_flwr.progressive.zo.ActiveStage` and runs
:func:`~fedzo_flwr.progressive.zo.train_stage_round`: the frozen prefix once per batch, then the
K (+1) perturbed passes through block ``t`` and its output module. The reply is a zeroth-order
reply (:func:`client_app.client_app.zo_reply`): K float32 loss differences per local step, the
generator fingerprint over the stage's space when asked, and the stage in the ``zo`` record. A
node lacking the mask or the frozen tensors answers with status ``mask-missing``.
"""

from __future__ import annotations

import torch
from flwr.app import ConfigRecord, Context, Message

from client_app.client_app import (
    STATE_KEY,
    MaskMissing,
    config_value,
    node_data,
    node_partition,
    node_run_config,
    status_reply,
    zo_reply,
)
from client_app.progressive import load_frozen, staged_model
from client_app.replay import received_weights
from fedzo_flwr import protocol
from fedzo_flwr.config import RunConfig
from fedzo_flwr.errors import ConfigError
from fedzo_flwr.progressive.schedule import Step, frozen_names
from fedzo_flwr.progressive.staged import StagedModel
from fedzo_flwr.progressive.zo import (
    ActiveStage,
    apply_staged_mask_,
    staged_mask_template,
    train_stage_round,
)
from fedzo_flwr.protocol import progressive as keys
from fedzo_flwr.protocol.wire import decode_mask
from fedzo_flwr.sparse.mask import Mask

# (model, dataset, split, layers-per-block, seed, mask-id) -> staged mask; one run per process.
_MASKS: dict[tuple[str, str, str, int, int, str], Mask] = {}


def staged_mask_of(
    cfg: RunConfig, config: ConfigRecord, context: Context, staged: StagedModel
) -> Mask:
    """The staged mask the message names: from the message (first contact) or the node state.

    Raises
    ------
    MaskMissing
        The node does not hold the mask ``mask-id`` names (or its cached bytes do not match).
    """
    wanted = config_value(config, protocol.MASK_ID_KEY, str)
    if protocol.MASK_KEY in config:  # first contact: keep the mask in the node's state
        mask_bytes = config_value(config, protocol.MASK_KEY, bytes)
        context.state[STATE_KEY] = ConfigRecord(
            {protocol.MASK_ID_KEY: wanted, protocol.MASK_KEY: mask_bytes}
        )
    key = (cfg.model, cfg.dataset, cfg.stage_split, cfg.layers_per_block, cfg.seed, wanted)
    if key in _MASKS:
        return _MASKS[key]
    state = context.state.config_records.get(STATE_KEY)
    if state is None or state.get(protocol.MASK_ID_KEY) != wanted:
        raise MaskMissing(f"no mask {wanted} cached on this node")
    mask_bytes = config_value(state, protocol.MASK_KEY, bytes)
    if protocol.mask_id(mask_bytes) != wanted:
        raise MaskMissing(f"mask bytes do not match mask-id {wanted}")
    mask = decode_mask(mask_bytes, staged_mask_template(staged))
    _MASKS.clear()
    _MASKS[key] = mask
    return mask


def _stage(config: ConfigRecord, staged: StagedModel) -> int:
    stage = config_value(config, keys.STAGE_KEY, int)
    if not 0 <= stage < staged.num_stages:
        raise ConfigError(f"message names stage {stage}; the model has {staged.num_stages}")
    return stage


def train_zo_progressive(msg: Message, context: Context) -> Message:
    """One round of stage ``t``: reply with the K loss differences per local step."""
    cfg = node_run_config(context)
    if cfg.client_threads:
        torch.set_num_threads(cfg.client_threads)
    config = msg.content.config_records[protocol.CONFIG_KEY]
    staged = staged_model(cfg)
    stage = _stage(config, staged)
    try:
        mask = staged_mask_of(cfg, config, context, staged)
    except MaskMissing as err:
        return status_reply(msg, protocol.STATUS_MASK_MISSING, str(err))
    frozen = frozen_names(staged, Step("grow", stage))
    if frozen:
        wanted = config_value(config, keys.FROZEN_ID_KEY, str)
        missing = load_frozen(msg, context, staged, frozen, wanted)
        if missing is not None:
            return status_reply(msg, protocol.STATUS_MASK_MISSING, missing)
    apply_staged_mask_(staged, mask)  # pruned entries are zero everywhere, whatever was loaded
    active = ActiveStage(staged, stage, mask)
    active.space.scatter_(active.module, received_weights(cfg, msg, context, active.space.sizes))
    partition_id, _ = node_partition(context)
    x, y = node_data(cfg, context)
    seed = config_value(config, protocol.ROUND_SEED_KEY, int)
    result = train_stage_round(cfg, active, x, y, seed, partition_id)
    return zo_reply(msg, context, cfg, result, active.space, {keys.STAGE_KEY: stage})
