"""Which datasets a data folder holds, and whether a run's dataset is among them.

The ServerApp reads the test set from the deployment's ``data-dir``; a run whose ``dataset``
(run config, default from the app's ``pyproject.toml``) is not in that folder would fail inside
the ServerApp after the deployment had started. ``up`` therefore checks that the folder holds
at least one dataset (or the one asked for), and ``run`` checks the run's own dataset first.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from deploy.errors import DeployError

if TYPE_CHECKING:
    from fedzo_flwr.data.cifar import DatasetSources

# The dataset names and their file and folder names are the loader's own, imported when a
# folder is checked: fedzo_flwr.data imports torch (seconds), which status, down and node skip.


def known_datasets() -> tuple[str, ...]:
    """The datasets the loader reads (:data:`fedzo_flwr.data.cifar.DATASETS`)."""
    from fedzo_flwr.data.cifar import DATASETS

    return DATASETS


def loader_sources(dataset: str) -> DatasetSources:
    """The npz file and torchvision folder the loader accepts for ``dataset``.

    :func:`fedzo_flwr.data.cifar.dataset_sources`; an unknown name raises :class:`DeployError`
    naming the key and the valid datasets.
    """
    from fedzo_flwr.data import cifar

    if dataset not in cifar.DATASETS:
        raise DeployError(f"dataset: unknown {dataset!r}; valid: {', '.join(cifar.DATASETS)}")
    return cifar.dataset_sources(dataset)


def dataset_arg(value: str) -> str:
    """``--dataset``: ``value`` if the loader knows it (argparse ``type``)."""
    try:
        loader_sources(value)
    except DeployError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def has_dataset(data_dir: Path, dataset: str) -> bool:
    """Whether ``data_dir`` holds ``dataset`` in a layout the loader reads."""
    npz, folder = loader_sources(dataset)
    return (data_dir / npz).is_file() or (data_dir / folder).is_dir()


def _expected(dataset: str) -> str:
    npz, folder = loader_sources(dataset)
    return f"{npz} or {folder}/"


def require_data(data_dir: Path, dataset: str | None = None) -> None:
    """Raise :class:`DeployError` unless ``data_dir`` holds ``dataset`` (None: any dataset)."""
    if dataset is None:
        if not any(has_dataset(data_dir, name) for name in known_datasets()):
            expected = ", ".join(_expected(name) for name in known_datasets())
            raise DeployError(f"no dataset in {data_dir} (expected {expected})")
        return
    if not has_dataset(data_dir, dataset):
        raise DeployError(f"no {dataset} in {data_dir} ({_expected(dataset)})")


def check_run_data(dataset: str, folder: Path) -> None:
    """Refuse a run whose ``dataset`` (run config, else the app's default) is not in ``folder``.

    ``folder`` is the ServerApp's ``data-dir``: the run's own, else the deployment's.
    """
    if not has_dataset(folder, dataset):
        raise DeployError(
            f"run-config dataset={dataset!r} needs {_expected(dataset)} in the data-dir "
            f"{folder}; it is not there"
        )
