"""Federated partitions of a labelled dataset, computed with flwr-datasets partitioners.

Schemes (all deterministic for a given ``seed``):

``"iid"``
    The indices are shuffled with ``np.random.default_rng(seed)`` and cut into contiguous
    blocks by ``IidPartitioner`` (which itself has no seed and does not shuffle). Sizes
    differ by at most one; every example is used.
``"dirichlet"``
    ``DirichletPartitioner`` (Yurochkin et al. 2019): for each class, the share given to each
    partition is drawn from ``Dirichlet(alpha)``; resampled (at most 10 tries) until every
    partition holds at least ``min_partition_size`` examples. Smaller ``alpha`` = more skew.
``"shards"``
    ``ShardPartitioner``, the "pathological non-IID" split of McMahan et al. 2017: the data is
    sorted by label, cut into ``num_partitions * shards_per_partition`` shards of
    ``floor(N / (num_partitions * shards_per_partition))`` consecutive examples, and each
    partition gets ``shards_per_partition`` shards at random. A partition therefore has at
    most ``shards_per_partition`` labels when the shard size divides every class count
    (CIFAR-10 with 10 partitions x 2 shards: 2500-example shards), otherwise a shard may
    straddle a class boundary. The ``N mod (num_partitions * shards_per_partition)``
    leftover examples are not used.

``flwr_datasets`` (and ``datasets``) are imported on first use only.
"""

from __future__ import annotations

import hashlib
import math
import threading
import warnings
from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from fedzo_flwr.data.cifar import DatasetArrays

SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "shards")
"""Partition schemes accepted by :func:`partition_indices`."""

_CACHE_SIZE = 32
_PARTITION_CACHE: OrderedDict[tuple[object, ...], tuple[np.ndarray, ...]] = OrderedDict()
_LOCK = threading.Lock()


def clear_partition_cache() -> None:
    """Forget every partitioning computed by :func:`partition_indices`."""
    with _LOCK:
        _PARTITION_CACHE.clear()


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    scheme: str,
    *,
    alpha: float = 0.5,
    shards_per_partition: int = 2,
    seed: int = 0,
    min_partition_size: int = 10,
) -> list[np.ndarray]:
    """Split example indices ``0..len(labels)-1`` into ``num_partitions`` disjoint parts.

    The work is done by flwr-datasets partitioners on an in-memory ``datasets.Dataset``
    with columns ``idx`` and ``label``. Results are cached per process (keyed by the labels'
    length and hash and by the arguments that matter for ``scheme``; the 32 most recent are
    kept), so repeated calls from ClientApps in one process are cheap. The returned arrays
    are shared with the cache and therefore read-only.

    Parameters
    ----------
    labels : np.ndarray
        Integer labels, shape (N,).
    num_partitions : int
        Number of partitions, ``1 <= num_partitions <= N``.
    scheme : str
        One of :data:`SCHEMES` (see the module docstring).
    alpha : float, default 0.5
        Dirichlet concentration (``"dirichlet"`` only), > 0.
    shards_per_partition : int, default 2
        Shards per partition (``"shards"`` only), ``num_partitions * shards_per_partition``
        must not exceed N.
    seed : int, default 0
        Non-negative seed of the partitioner's random generator.
    min_partition_size : int, default 10
        Minimum examples per partition (``"dirichlet"`` only; resampled until met).

    Returns
    -------
    list of np.ndarray
        ``num_partitions`` sorted int64 index arrays; no index appears twice.

    Raises
    ------
    ValueError
        If an argument is invalid (the message names it) or the Dirichlet sampling cannot
        satisfy ``min_partition_size`` within 10 tries.

    """
    y = _check_labels(labels)
    n = len(y)
    _check_int("num_partitions", num_partitions, low=1)
    if num_partitions > n:
        raise ValueError(f"num_partitions ({num_partitions}) exceeds the number of labels ({n})")
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; valid schemes: {', '.join(SCHEMES)}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.number)):
        raise TypeError(f"alpha must be a number, got {type(alpha).__name__}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    _check_int("shards_per_partition", shards_per_partition, low=1)
    _check_int("seed", seed, low=0)
    _check_int("min_partition_size", min_partition_size, low=0)

    if scheme == "iid":
        params: tuple[object, ...] = ()
    elif scheme == "dirichlet":
        if num_partitions * min_partition_size > n:
            raise ValueError(
                f"min_partition_size ({min_partition_size}) x num_partitions ({num_partitions}) "
                f"exceeds the number of labels ({n})"
            )
        params = (float(alpha), int(min_partition_size))
    else:
        if num_partitions * shards_per_partition > n:
            raise ValueError(
                f"shards_per_partition ({shards_per_partition}) x num_partitions "
                f"({num_partitions}) exceeds the number of labels ({n})"
            )
        params = (int(shards_per_partition),)

    digest = hashlib.sha1(y.tobytes(), usedforsecurity=False).hexdigest()
    key = (n, digest, scheme, int(num_partitions), int(seed), *params)
    with _LOCK:
        cached = _PARTITION_CACHE.get(key)
        if cached is not None:
            _PARTITION_CACHE.move_to_end(key)
            return list(cached)
    parts = _compute(
        y,
        int(num_partitions),
        scheme,
        float(alpha),
        int(shards_per_partition),
        int(seed),
        int(min_partition_size),
    )
    with _LOCK:
        _PARTITION_CACHE[key] = parts
        while len(_PARTITION_CACHE) > _CACHE_SIZE:
            _PARTITION_CACHE.popitem(last=False)
    return list(parts)


def client_partition(
    data: DatasetArrays,
    partition_id: int,
    num_partitions: int,
    scheme: str = "iid",
    *,
    alpha: float = 0.5,
    shards_per_partition: int = 2,
    seed: int = 0,
    min_partition_size: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """Return one client's share of the training split, ``(x_uint8, y)``.

    Partitions ``data.y_train`` with :func:`partition_indices` (cached) and gathers the
    partition's images and labels (copies: (n, 32, 32, 3) uint8 and (n,) int64).

    Parameters
    ----------
    data : DatasetArrays
        The dataset, from :func:`~fedzo_flwr.data.cifar.load_dataset`.
    partition_id : int
        Which partition, ``0 <= partition_id < num_partitions``.
    num_partitions, scheme, alpha, shards_per_partition, seed, min_partition_size
        As in :func:`partition_indices`.

    Returns
    -------
    tuple of np.ndarray
        ``(x, y)`` of the partition, in increasing original index order.

    """
    _check_int("partition_id", partition_id, low=0)
    _check_int("num_partitions", num_partitions, low=1)
    if partition_id >= num_partitions:
        raise ValueError(
            f"partition_id ({partition_id}) must be < num_partitions ({num_partitions})"
        )
    idx = partition_indices(
        data.y_train,
        num_partitions,
        scheme,
        alpha=alpha,
        shards_per_partition=shards_per_partition,
        seed=seed,
        min_partition_size=min_partition_size,
    )[partition_id]
    return data.x_train[idx], data.y_train[idx]


def sample_batch(num_examples: int, batch_size: int, seed: int) -> np.ndarray:
    """Draw batch indices without replacement, deterministically from ``seed``.

    Parameters
    ----------
    num_examples : int
        Size of the pool, >= 1; indices are drawn from ``0..num_examples-1``.
    batch_size : int
        Requested batch size, >= 1; ``min(batch_size, num_examples)`` indices are returned.
    seed : int
        Non-negative seed for ``np.random.default_rng``.

    Returns
    -------
    np.ndarray
        Distinct int64 indices, in the generator's (random) order.

    """
    _check_int("num_examples", num_examples, low=1)
    _check_int("batch_size", batch_size, low=1)
    _check_int("seed", seed, low=0)
    rng = np.random.default_rng(seed)
    size = min(batch_size, num_examples)
    return rng.choice(num_examples, size=size, replace=False).astype(np.int64)


def _check_int(name: str, value: object, *, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def _check_labels(labels: np.ndarray) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    if len(y) == 0:
        raise ValueError("labels must not be empty")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must hold integers, got dtype {y.dtype}")
    return np.ascontiguousarray(y, dtype=np.int64)


def _compute(
    y: np.ndarray,
    num_partitions: int,
    scheme: str,
    alpha: float,
    shards_per_partition: int,
    seed: int,
    min_partition_size: int,
) -> tuple[np.ndarray, ...]:
    """Run the flwr-datasets partitioner and return sorted, read-only int64 index arrays."""
    import datasets
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        Partitioner,
        ShardPartitioner,
    )

    idx = np.arange(len(y), dtype=np.int64)
    partitioner: Partitioner
    if scheme == "iid":
        # IidPartitioner cuts contiguous blocks and has no seed: shuffle first.
        idx = np.random.default_rng(seed).permutation(idx)
        partitioner = IidPartitioner(num_partitions=num_partitions)
    elif scheme == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min_partition_size,
            shuffle=False,
            seed=seed,
        )
    else:
        partitioner = ShardPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_shards_per_partition=shards_per_partition,
            shuffle=False,
            seed=seed,
        )
    partitioner.dataset = datasets.Dataset.from_dict({"idx": idx, "label": y[idx]})

    parts = []
    with warnings.catch_warnings():
        # pyarrow >= 25 deprecation triggered inside datasets' sort(); not ours to fix.
        warnings.filterwarnings("ignore", category=FutureWarning, module="pyarrow")
        for pid in range(num_partitions):
            try:
                shard = partitioner.load_partition(pid)
            except ValueError as err:
                if scheme == "dirichlet":
                    raise ValueError(
                        f"Dirichlet partitioning failed for alpha={alpha}, "
                        f"min_partition_size={min_partition_size}, "
                        f"num_partitions={num_partitions}: {err} "
                        "(increase alpha or decrease min_partition_size)"
                    ) from err
                raise
            # datasets 4: slice the rows first, then take the column as numpy.
            part = np.sort(np.asarray(shard.with_format("numpy")[:]["idx"], dtype=np.int64))
            part.setflags(write=False)
            parts.append(part)
    return tuple(parts)
