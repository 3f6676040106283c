"""Every seed stream of fedzo-flwr, in one place.

Every random draw comes from a generator seeded with :func:`derive_seed` of a parent seed and a
stream key. The keys are named here and nowhere else, so two streams can never collide by
accident and a reader finds what seeds what on one page:

==============================  =======================================  ===========================
stream                          seed                                     used for
==============================  =======================================  ===========================
:func:`model_seed`              ``(run seed, "model")``                  θ0, the initial weights
:func:`partition_seed`          ``run seed`` itself                      the clients' partitions
:func:`pruning_seed`            ``(run seed, "prune")``                  every draw of the pruner
:func:`fingerprint_seed`        ``(run seed, "fing")``                   the generator check
:func:`round_seed`              ``(run seed, round)``                    the round's broadcast seed
:func:`client_step_seeds`       ``(round seed, slot, step)``             a client's local ZO steps
:func:`direction_block_seed`    ``(step seed, k, tensor)``               block ``t`` of ``u_k``
:func:`batch_seed`              ``(step seed, "batc", partition)``       a ZO client's mini-batch
:func:`fedavg_batches_seed`     ``(round seed, "fp", partition)``        a FedAvg client's batches
:func:`prune_batch_seed`        ``(pruning seed, "da", partition)``      client examples to score
:func:`node_sample_seed`        ``(run seed, round, "samp")``            the nodes of a round
:func:`evaluate_sample_seed`    ``(run seed, round, "eval")``            nodes evaluating a round
==============================  =======================================  ===========================

So the run-config ``seed`` alone decides θ0, the mask's pruning draws, the partitions, node
sampling and every round's seeds: two runs that differ only in ``seed`` differ in all of them
(what ``benchmarks/paper_comparison.py --seeds`` relies on). Two progressive-training keys have
seeds of their own: ``pace-seed`` (the pace rule's coordinate sample) and ``memory-seed`` (the
simulated device budgets); neither enters a zeroth-order or FedAvg run.

The partition stream is the run seed itself, not a derived one, so that the partitions stay
bit-identical to the releases before this table named it (the partitioners seed their own
``np.random.default_rng`` / flwr-datasets generator with it).

The integer tags are ASCII spelled as hex (``0x6D6F64656C`` = ``"model"``), kept as integers so
that every stream is bit-identical to the releases that introduced it. The pruners' own
sub-streams (``"ntk-sap/inputs"``, ``"ntk-sap/weights"``, ``"random-mask"``) are string keys
under :func:`pruning_seed`, defined next to the code that draws them.

:func:`derive_seed` hashes the keys with BLAKE2b, so it is identical on every platform and
Python version (unlike ``hash()``) and different key tuples give unrelated streams.
"""

from __future__ import annotations

import hashlib
from enum import IntEnum
from typing import Literal

SeedMode = Literal["shared", "per-client"]


class Stream(IntEnum):
    """Integer tags of the named streams (ASCII as hex)."""

    MODEL = 0x6D6F64656C  # "model"
    PRUNE = 0x7072756E65  # "prune"
    FINGERPRINT = 0x66696E67  # "fing"
    BATCH = 0x62617463  # "batc"
    FEDAVG_BATCHES = 0x6670  # "fp"
    PRUNE_DATA = 0x6461  # "da"
    NODE_SAMPLE = 0x73616D70  # "samp"
    EVALUATE_SAMPLE = 0x6576616C  # "eval"


def derive_seed(seed: int, *keys: int | str) -> int:
    """Derive an independent 63-bit seed from ``seed`` and a tuple of stream keys.

    Parameters
    ----------
    seed : int
        Base seed.
    *keys : int or str
        Stream identifiers, e.g. ``(round,)`` or ``("ntk-sap/weights", client, iteration)``.

    Returns
    -------
    int
        A seed in ``[0, 2**63)`` suitable for :meth:`torch.Generator.manual_seed` and NumPy.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    text = "/".join(
        [str(seed), *(f"{_key_type(k)}:{int(k) if isinstance(k, int) else k}" for k in keys)]
    )
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _key_type(key: int | str) -> str:
    # A Stream member hashes as the plain int it stands for (bit-identical streams).
    return "str" if isinstance(key, str) else "int"


def model_seed(run_seed: int) -> int:
    """Seed of θ0, the initial weights."""
    return derive_seed(run_seed, Stream.MODEL)


def partition_seed(run_seed: int) -> int:
    """Seed of the partitioner that splits the training set among the clients.

    The run seed itself (see the module docstring: kept for bit-identical partitions).
    """
    if isinstance(run_seed, bool) or not isinstance(run_seed, int):
        raise TypeError(f"seed must be an int, got {type(run_seed).__name__}")
    return run_seed


def pruning_seed(run_seed: int) -> int:
    """Parent seed of every draw the pruner makes (server-side or federated)."""
    return derive_seed(run_seed, Stream.PRUNE)


def fingerprint_seed(run_seed: int) -> int:
    """Seed of the direction-generator fingerprint every node reproduces at first contact."""
    return derive_seed(run_seed, Stream.FINGERPRINT)


def round_seed(run_seed: int, server_round: int) -> int:
    """The seed the server broadcasts in round ``server_round`` (fresh every round)."""
    return derive_seed(run_seed, server_round)


def client_step_seeds(
    seed_of_round: int, seed_mode: SeedMode | str, partition_id: int, local_steps: int
) -> list[int]:
    """Seeds of a client's local steps in one round.

    ``shared``: identical for all clients; ``per-client``: distinct per partition, so a round
    explores ``clients x K`` directions. The server recomputes them to check every reply.
    """
    slot = 0 if seed_mode == "shared" else int(partition_id) + 1
    return [derive_seed(seed_of_round, slot, step) for step in range(local_steps)]


def direction_block_seed(step_seed: int, k: int, tensor: int) -> int:
    """Seed of the block of direction ``u_k`` that covers KeptSpace tensor ``tensor``.

    Direction ``k`` of a step is the concatenation, in KeptSpace order, of one block per
    tensor, each drawn from its own generator: any layer's block can be drawn alone
    (protocol version 2; version 1 drew a direction whole from ``(step seed, k)``).
    """
    return derive_seed(step_seed, k, tensor)


def batch_seed(step_seed: int, partition_id: int) -> int:
    """Seed of the mini-batch a zeroth-order client draws for one step."""
    return derive_seed(step_seed, Stream.BATCH, partition_id)


def fedavg_batches_seed(seed_of_round: int, partition_id: int) -> int:
    """Seed of the mini-batch order of a FedAvg client's round."""
    return derive_seed(seed_of_round, Stream.FEDAVG_BATCHES, partition_id)


def prune_batch_seed(seed_of_pruning: int, partition_id: int) -> int:
    """Seed of the examples a client scores in a federated pruning phase."""
    return derive_seed(seed_of_pruning, Stream.PRUNE_DATA, partition_id)


def node_sample_seed(run_seed: int, server_round: int) -> int:
    """Seed of the choice of nodes in ``server_round``."""
    return derive_seed(run_seed, server_round, Stream.NODE_SAMPLE)


def evaluate_sample_seed(run_seed: int, server_round: int) -> int:
    """Seed of the choice of nodes for federated evaluation in ``server_round``."""
    return derive_seed(run_seed, server_round, Stream.EVALUATE_SAMPLE)
