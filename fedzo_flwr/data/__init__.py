"""Datasets (CIFAR-10/100 as uint8 arrays) and their federated partitions.

>>> from fedzo_flwr.data import load_dataset, client_partition, sample_batch, to_tensor
>>> data = load_dataset("cifar10", "shared/data")  # doctest: +SKIP
>>> x, y = client_partition(data, 0, 10, "dirichlet", alpha=0.5)  # doctest: +SKIP
>>> batch = to_tensor(x[sample_batch(len(x), 64, seed=0)], "cifar10")  # doctest: +SKIP
"""

from __future__ import annotations

from fedzo_flwr.data.cifar import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    DATASETS,
    NORMALIZATION,
    NUM_CLASSES,
    DatasetArrays,
    batch_tensors,
    check_dataset_name,
    clear_cache,
    load_dataset,
    to_tensor,
)
from fedzo_flwr.data.partition import (
    SCHEMES,
    clear_partition_cache,
    client_partition,
    partition_indices,
    sample_batch,
)

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "DATASETS",
    "NORMALIZATION",
    "NUM_CLASSES",
    "SCHEMES",
    "DatasetArrays",
    "batch_tensors",
    "check_dataset_name",
    "clear_cache",
    "clear_partition_cache",
    "client_partition",
    "load_dataset",
    "partition_indices",
    "sample_batch",
    "to_tensor",
]
