"""Data-dependent foresight pruning done federatedly: the one implementation, Flower-free.

``snip`` and ``ntk-local`` score weights on **client** data, and the server never reads client
data. So the server runs a pruning phase before round 1 (``server_app/federated_pruning.py``
carries it over Flower messages; :func:`local_ntk_mask` runs the same phase in one process):

1. for each iteration ``t = 1..T`` (``T = prune-iterations`` for ``ntk-local``, 1 for ``snip``)
   the server sends every node the current mask, ``t`` and a scoring seed (``snip``: also the
   initial weights θ0, whose gradients it scores);
2. each client computes its **signed** mask gradients ``G_c`` on ``prune-samples`` examples of
   its partition (:func:`client_prune_gradients`: :func:`client_ntk_gradients` or
   :func:`~fedzo_flwr.pruning.baselines.snip_gradients`) and uploads them as float32 bytes
   (``4 · n_w`` bytes);
3. the server forms ``S = |Σ_c p_c G_c| · [m = 1]`` with ``p_c`` proportional to the clients'
   example counts (:func:`aggregate_scores`) and keeps the global top ``kept_target(d_t, n)``
   with ``d_t = d^(t/T)`` (:func:`phase_mask`; SNIP is one-shot).

This is our reconstruction of the federated form of NTK-SAP (method note (a)): the NTK trace
over the union of client data is the sum of local traces, so local scores add; with
data-dependent inputs the cross-client terms are dropped. Client ``c`` draws its weights with
``scoring_seed(seed, c, t)``; with one client scoring the Gaussian stream
:func:`~fedzo_flwr.pruning.ntk_sap.gaussian_inputs` the mask is exactly the data-free
:func:`~fedzo_flwr.pruning.ntk_sap.ntk_sap_mask`. ``snip`` is SNIP with the per-client gradients
of the mean cross-entropy added with weights ``p_c`` before ``|·|``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from fedzo_flwr.config import RunConfig
from fedzo_flwr.data import sample_batch, to_tensor
from fedzo_flwr.errors import ReplyRejected
from fedzo_flwr.protocol.wire import decode_scalars, encode_scalars
from fedzo_flwr.pruning.baselines import snip_gradients
from fedzo_flwr.pruning.common import (
    check_result,
    iterative_prune,
    one_shot_prune,
    reject_batchnorm,
)
from fedzo_flwr.pruning.ntk_sap import (
    NTKSAPConfig,
    model_reinit,
    ntk_mask_gradients,
    scores_from_gradients,
    scoring_seed,
)
from fedzo_flwr.seeding import prune_batch_seed, pruning_seed
from fedzo_flwr.sparse.mask import Mask, dense_mask

__all__ = [
    "DATA_PRUNERS",
    "GRADIENTS_KEY",
    "ITERATION_KEY",
    "PRUNE_ACTION",
    "PRUNE_KEY",
    "SCORING_SEED_KEY",
    "WEIGHTS_KEY",
    "Collect",
    "aggregate_scores",
    "check_weights",
    "client_ntk_gradients",
    "client_prune_gradients",
    "decode_gradients",
    "encode_gradients",
    "local_ntk_mask",
    "needs_client_data",
    "ntk_config",
    "phase_mask",
    "prune_batch",
    "prune_iterations",
    "prune_seed",
    "scoring_seed_for",
]

#: ``collect(mask, t)``: the signed mask gradients and weight ``(G_c, w_c)`` of every client with
#: a valid share of iteration ``t`` under ``mask``, in a fixed client order.
Collect = Callable[[Mask, int], Sequence[tuple[dict[str, torch.Tensor], float]]]

#: Pruners that score on client data (run as a federated phase before round 1).
DATA_PRUNERS: frozenset[str] = frozenset({"ntk-local", "snip"})

# Wire keys of the phase (Flower-free strings, shared by the ServerApp and the ClientApp).
#: The ClientApp handles message type ``query.prune`` (``@app.query(PRUNE_ACTION)``).
PRUNE_ACTION = "prune"
PRUNE_KEY = "prune"  # ConfigRecord in both directions
WEIGHTS_KEY = "weights"  # ArrayRecord with θ0 (snip only)
ITERATION_KEY = "iteration"
SCORING_SEED_KEY = "scoring-seed"
GRADIENTS_KEY = "gradients"  # float32 bytes, 4 · n_w


def needs_client_data(cfg: RunConfig) -> bool:
    """Whether the run prunes with a data-dependent pruner (a federated pruning phase)."""
    return cfg.pruned and cfg.prune_method in DATA_PRUNERS


def prune_iterations(cfg: RunConfig) -> int:
    """Scoring iterations of the phase: ``prune-iterations`` for ``ntk-local``, 1 for ``snip``."""
    return cfg.prune_iterations if cfg.prune_method == "ntk-local" else 1


def prune_seed(cfg: RunConfig) -> int:
    """Base seed of the pruning draws (the same one the data-free pruners use)."""
    return pruning_seed(cfg.seed)


def ntk_config(cfg: RunConfig) -> NTKSAPConfig:
    """NTK-SAP settings of the run (``prune-iterations``, ``prune-repeats``)."""
    return NTKSAPConfig.for_run(cfg)


def scoring_seed_for(cfg: RunConfig, stream: int, iteration: int) -> int:
    """The seed the server assigns to client ``stream`` at ``iteration`` (ntk-local draws)."""
    return scoring_seed(prune_seed(cfg), stream, iteration)


def prune_batch(
    cfg: RunConfig, x_uint8: np.ndarray, y: np.ndarray, partition_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``prune-samples`` examples a client scores on (fixed for the whole phase)."""
    idx = np.sort(
        sample_batch(len(y), cfg.prune_samples, prune_batch_seed(prune_seed(cfg), partition_id))
    )
    return to_tensor(x_uint8[idx], cfg.dataset), torch.as_tensor(y[idx], dtype=torch.long)


def client_ntk_gradients(
    model: nn.Module,
    model_name: str,
    mask: Mask,
    batches: Iterable[torch.Tensor],
    config: NTKSAPConfig,
    seed: int,
) -> dict[str, torch.Tensor]:
    """A client's share of one federated NTK-SAP iteration: its signed mask gradients.

    Parameters
    ----------
    model : nn.Module
        Model at θ0 (never modified); with ``config.reinit == "weights"`` its biases and
        normalisation parameters are used as they are, so every client must hold the same θ0.
    model_name : str
        Registry name (initialiser of the weight draws).
    mask : Mask
        Current global mask, broadcast by the server.
    batches : iterable of Tensor
        The client's input batches (or ``(x, y)`` pairs); re-iterable, ``config.repeats`` passes.
    config : NTKSAPConfig
        ``epsilon``, ``repeats`` and ``reinit`` are used (batch layout comes from ``batches``).
    seed : int
        Server-assigned seed of the weight draws and perturbations for this client and iteration.
    """
    return ntk_mask_gradients(
        model,
        mask,
        batches,
        reinit=model_reinit(model_name, config.reinit),
        generator=torch.Generator().manual_seed(seed),
        epsilon=config.epsilon,
        passes=config.repeats,
    )


def client_prune_gradients(
    cfg: RunConfig,
    model: nn.Module,
    mask: Mask,
    x_uint8: np.ndarray,
    y: np.ndarray,
    partition_id: int,
    seed: int,
) -> dict[str, torch.Tensor]:
    """A client's share of one scoring iteration: signed mask gradients on its own data.

    Parameters
    ----------
    cfg : RunConfig
        ``prune-method`` (``ntk-local`` or ``snip``), ``prune-samples``, ``prune-repeats``.
    model : nn.Module
        The architecture; for ``snip`` it must hold θ0 (SNIP scores the initial weights).
    mask : Mask
        The current global mask (dense for ``snip``).
    x_uint8, y : np.ndarray
        The client's partition.
    partition_id : int
        Selects which examples are scored.
    seed : int
        Scoring seed assigned by the server (``ntk-local``'s weight draws; unused by ``snip``).
    """
    x, target = prune_batch(cfg, x_uint8, y, partition_id)
    if cfg.prune_method == "snip":
        return snip_gradients(model, mask, x, target)
    if cfg.prune_method == "ntk-local":
        return client_ntk_gradients(model, cfg.model, mask, [x], ntk_config(cfg), seed)
    raise ValueError(f"prune-method {cfg.prune_method!r} does not score on client data")


def encode_gradients(grads: dict[str, torch.Tensor], mask: Mask) -> bytes:
    """Signed gradients as little-endian float32 bytes, tensors in mask order."""
    flat = torch.cat([grads[n].reshape(-1).to(torch.float32) for n in mask])
    return encode_scalars(flat.detach().cpu().numpy())


def decode_gradients(data: object, mask: Mask) -> dict[str, torch.Tensor]:
    """Inverse of :func:`encode_gradients`, for an untrusted upload.

    Raises
    ------
    ReplyRejected
        If ``data`` is not bytes, not exactly ``4 · n_w`` bytes, or holds NaN or inf.
    """
    if not isinstance(data, bytes):
        raise ReplyRejected(f"gradients must be bytes, got {type(data).__name__}")
    total = sum(m.numel() for m in mask.values())
    try:
        flat = torch.from_numpy(decode_scalars(data, expected_count=total))
    except ValueError as err:
        raise ReplyRejected(f"bad gradients: {err}") from None
    out, offset = {}, 0
    for name, m in mask.items():
        out[name] = flat[offset : offset + m.numel()].reshape(m.shape)
        offset += m.numel()
    if not all(bool(torch.isfinite(g).all()) for g in out.values()):
        raise ReplyRejected("gradients contain NaN or inf")
    return out


def check_weights(weights: Sequence[float], num_clients: int) -> list[float]:
    """The client weights as floats, after checking there is one per client, finite, >= 0.

    Raises
    ------
    ValueError
        If there is no client, the lengths differ, a weight is negative or not finite, or all
        weights are zero.
    """
    if num_clients < 1:
        raise ValueError("federated pruning needs at least one client")
    values = [float(w) for w in weights]
    if len(values) != num_clients:
        raise ValueError(f"weights has {len(values)} entries for {num_clients} clients")
    if any(not math.isfinite(w) or w < 0 for w in values) or sum(values) <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all 0, got {values}")
    return values


def aggregate_scores(
    grads: Sequence[dict[str, torch.Tensor]], weights: Sequence[float], mask: Mask
) -> dict[str, torch.Tensor]:
    """``|Σ_c p_c G_c| · [m = 1]`` with ``p_c = weights_c / Σ weights`` (summed in order).

    Raises
    ------
    ValueError
        If the weights fail :func:`check_weights`.
    """
    values = check_weights(weights, len(grads))
    total_weight = sum(values)
    total: dict[str, torch.Tensor] | None = None
    for g, w in zip(grads, values, strict=True):
        p = w / total_weight
        if total is None:
            total = {n: p * g[n] for n in mask}
        else:
            for n in mask:
                total[n] += p * g[n]
    assert total is not None
    return scores_from_gradients(total, mask)


def phase_mask(
    model: nn.Module, method: str, density: float, iterations: int, collect: Collect
) -> Mask:
    """The server half of the phase: aggregate the clients' shares and prune, per iteration.

    Parameters
    ----------
    model : nn.Module
        The global model at θ0 (only names and shapes are read).
    method : str
        ``snip`` (one shot, under the dense mask) or ``ntk-local`` (``iterations`` rounds of the
        exponential schedule).
    density : float
        Final kept fraction; exact count ``kept_target(density, n)``.
    iterations : int
        Scoring iterations (:func:`prune_iterations`).
    collect : Collect
        Gathers the clients' ``(G_c, w_c)`` of one iteration (over Flower, or in process).

    Returns
    -------
    Mask
        Valid mask, exact kept count, no empty layer.
    """
    if method not in DATA_PRUNERS:
        raise ValueError(f"prune-method {method!r} does not score on client data")

    def score(mask: Mask, t: int) -> dict[str, torch.Tensor]:
        shares = collect(mask, t)
        return aggregate_scores([g for g, _ in shares], [w for _, w in shares], mask)

    if method == "snip":
        mask = one_shot_prune(model, density, score(dense_mask(model), 1))
    else:
        mask = iterative_prune(model, density, iterations, score, method="NTK-SAP (client data)")
    return check_result(model, mask, density, method)


def local_ntk_mask(
    model: nn.Module,
    model_name: str,
    density: float,
    client_batches: Sequence[Iterable[torch.Tensor]],
    weights: Sequence[float] | None = None,
    config: NTKSAPConfig | None = None,
    seed: int = 0,
) -> Mask:
    """The ``ntk-local`` phase in one process: client ``c`` scores its own batches.

    Parameters
    ----------
    model : nn.Module
        Architecture to prune; not modified.
    model_name : str
        Registry name (initialiser of the weight draws).
    density : float
        Final kept fraction in (0, 1].
    client_batches : sequence of iterables of Tensor
        One re-iterable of input batches per client (``(x, y)`` pairs are accepted, ``y``
        ignored).
    weights : sequence of float, optional
        ``p_c`` (e.g. local sample counts); default uniform. A client of weight 0 is not asked.
    config : NTKSAPConfig, optional
        ``epsilon``, ``repeats``, ``iterations``.
    seed : int
        Base seed; client ``c`` scores iteration ``t`` with ``scoring_seed(seed, c, t)``.
    """
    config = NTKSAPConfig() if config is None else config
    model_reinit(model_name)  # fail early on an unknown model name
    reject_batchnorm(model, "NTK-SAP (client data)")
    inputs = list(client_batches)
    p = check_weights([1.0] * len(inputs) if weights is None else weights, len(inputs))

    def collect(mask: Mask, t: int) -> list[tuple[dict[str, torch.Tensor], float]]:
        return [
            (client_ntk_gradients(model, model_name, mask, b, config, scoring_seed(seed, c, t)), w)
            for c, (b, w) in enumerate(zip(inputs, p, strict=True))
            if w != 0.0
        ]

    return phase_mask(model, "ntk-local", density, config.iterations, collect)
