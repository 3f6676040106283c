"""A client's share of the data: its partition, cut once and cached in memory and on disk.

The training images and labels of partition ``i`` of ``n`` under the run's partitioner settings
(:data:`PARTITION_KEYS`), from the full dataset or from a per-device partition file written by
``scripts/split_partitions.py``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

from fedzo_flwr.config import RunConfig
from fedzo_flwr.data.cifar import DatasetArrays, load_dataset
from fedzo_flwr.data.partition import client_partition
from fedzo_flwr.errors import DataError
from fedzo_flwr.files import atomic_write_bytes
from fedzo_flwr.logs import get_logger
from fedzo_flwr.seeding import partition_seed

logger = get_logger(__name__)

CACHE_DIR_ENV = "FEDZO_CACHE_DIR"
MEMORY_CACHE_SIZE = 4
"""Partitions kept in memory per process (least recently used dropped first).

A simulation actor serves many partitions over a run; holding all of them would grow with the
number of clients. The disk cache keeps every partition, so a dropped one is re-read, not
re-cut."""
_PARTITIONS: OrderedDict[tuple[object, ...], tuple[np.ndarray, np.ndarray]] = OrderedDict()


def _remember(key: tuple[object, ...], arrays: tuple[np.ndarray, np.ndarray]) -> None:
    _PARTITIONS[key] = arrays
    _PARTITIONS.move_to_end(key)
    while len(_PARTITIONS) > MEMORY_CACHE_SIZE:
        _PARTITIONS.popitem(last=False)


def partition_cache_dir() -> Path:
    """Where partitions are cached on disk: ``$FEDZO_CACHE_DIR`` or ``~/.cache/fedzo-flwr``."""
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "fedzo-flwr")


def load_client_data(
    cfg: RunConfig, partition_id: int, num_partitions: int
) -> tuple[np.ndarray, np.ndarray]:
    """The training images and labels of one client's partition (uint8 HWC, int64).

    Cached in memory, the :data:`MEMORY_CACHE_SIZE` most recently used partitions (simulation
    actors live across rounds), and on disk as an uncompressed ``.npz`` (a deployed SuperNode
    starts a fresh ClientApp process per message), so the dataset is decompressed and
    partitioned once per node, not once per round.
    """
    data_dir = str(cfg.resolve_data_dir())
    key = partition_key(cfg, data_dir, partition_id, num_partitions)
    hit = _PARTITIONS.get(key)
    if hit is not None:
        _PARTITIONS.move_to_end(key)
        return hit
    path = partition_cache_dir() / partition_cache_name(cfg, data_dir, partition_id, num_partitions)
    if path.is_file():
        try:
            with np.load(path) as cached:
                arrays = (cached["x"], cached["y"])
            _remember(key, arrays)
            return arrays
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            logger.warning("Ignoring unreadable partition cache %s", path)
    data = load_dataset(cfg.dataset, cfg.resolve_data_dir())
    x, y = partition_of(cfg, data, partition_id, num_partitions)
    try:
        buffer = io.BytesIO()
        np.savez(buffer, x=x, y=y)
        atomic_write_bytes(path, buffer.getvalue())
    except OSError as err:  # a read-only home must not stop training
        logger.warning("Could not cache partition at %s: %s", path, err)
    _remember(key, (x, y))
    return x, y


PARTITION_KEYS = (
    "dataset",
    "partitioner",
    "alpha",
    "shards-per-client",
    "min-partition-size",
    "seed",
)
"""The run-config keys that decide a client's partition (all the others do not)."""


def partition_key(
    cfg: RunConfig, data_dir: str, partition_id: int, num_partitions: int
) -> tuple[object, ...]:
    """What identifies one client's partition: the data folder and :data:`PARTITION_KEYS`."""
    settings = cfg.to_run_config()
    return (
        str(Path(data_dir)),
        *(settings[k] for k in PARTITION_KEYS),
        partition_id,
        num_partitions,
    )


def partition_cache_name(
    cfg: RunConfig, data_dir: str, partition_id: int, num_partitions: int
) -> str:
    """File name of a cached partition: ``<dataset>-p<i>of<n>-<digest of its key>.npz``."""
    key = partition_key(cfg, data_dir, partition_id, num_partitions)
    digest = hashlib.sha256(repr(key).encode()).hexdigest()[:16]
    return f"{cfg.dataset}-p{partition_id}of{num_partitions}-{digest}.npz"


def partition_of(
    cfg: RunConfig, data: DatasetArrays, partition_id: int, num_partitions: int
) -> tuple[np.ndarray, np.ndarray]:
    """One client's ``(x, y)`` of ``data`` under the run's partitioner settings."""
    return client_partition(
        data,
        partition_id,
        num_partitions,
        cfg.partitioner,
        alpha=cfg.alpha,
        shards_per_partition=cfg.shards_per_client,
        seed=partition_seed(cfg.seed),
        min_partition_size=cfg.min_partition_size,
    )


def load_partition_file(
    path: str | Path, cfg: RunConfig, partition_id: int, num_partitions: int
) -> tuple[np.ndarray, np.ndarray]:
    """Load a per-device partition file written by ``scripts/split_partitions.py``.

    The file records the settings that produced it; any disagreement with this run (dataset,
    partitioner, alpha, shards, seed, partition id or count) is refused, so a device can never
    silently train on another partition.
    """
    path = Path(path).expanduser()
    try:
        with np.load(path) as data:
            x, y, meta = data["x"], data["y"], json.loads(str(data["meta"]))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise DataError(f"partition-file {path} is not a readable partition file ({err})") from None
    expected = {k: cfg.to_run_config()[k] for k in PARTITION_KEYS}
    expected.update({"partition-id": partition_id, "num-partitions": num_partitions})
    wrong = {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) != v}
    if wrong:
        details = ", ".join(f"{k}: file {a!r} vs run {b!r}" for k, (a, b) in wrong.items())
        raise DataError(f"partition-file {path} was made for other settings ({details})")
    if x.dtype != np.uint8 or x.ndim != 4 or len(x) != len(y):
        raise DataError(f"partition-file {path} holds arrays of the wrong shape or dtype")
    return x, y
