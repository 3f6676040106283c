"""Which datasets a data folder holds, and whether a run's dataset is among them.

The ServerApp reads the test set from the deployment's ``data-dir``; a run whose ``dataset``
(run config, default from the app's ``pyproject.toml``) is not in that folder would fail inside
the ServerApp after the deployment had started. ``up`` therefore checks that the folder holds
at least one dataset (or the one asked for), and ``run`` checks the run's own dataset first.
"""

from __future__ import annotations

from pathlib import Path

from deploy.errors import DeployError

DATA_SOURCES: dict[str, tuple[str, str]] = {
    "cifar10": ("cifar10.npz", "cifar-10-batches-py"),
    "cifar100": ("cifar100.npz", "cifar-100-python"),
}
"""Per dataset: the npz file and torchvision's python folder that the loader accepts
(:func:`fedzo_flwr.data.load_dataset` reads the npz first, else the folder)."""


def has_dataset(data_dir: Path, dataset: str) -> bool:
    """Whether ``data_dir`` holds ``dataset`` in a layout the loader reads."""
    npz, folder = DATA_SOURCES[dataset]
    return (data_dir / npz).is_file() or (data_dir / folder).is_dir()


def _expected(dataset: str) -> str:
    npz, folder = DATA_SOURCES[dataset]
    return f"{npz} or {folder}/"


def require_data(data_dir: Path, dataset: str | None = None) -> None:
    """Raise :class:`DeployError` unless ``data_dir`` holds ``dataset`` (None: any dataset)."""
    if dataset is None:
        if not any(has_dataset(data_dir, name) for name in DATA_SOURCES):
            expected = ", ".join(_expected(name) for name in DATA_SOURCES)
            raise DeployError(f"no dataset in {data_dir} (expected {expected})")
        return
    if dataset not in DATA_SOURCES:
        raise DeployError(f"dataset: unknown {dataset!r}; valid: {', '.join(DATA_SOURCES)}")
    if not has_dataset(data_dir, dataset):
        raise DeployError(f"no {dataset} in {data_dir} ({_expected(dataset)})")


def check_run_data(dataset: str, folder: Path) -> None:
    """Refuse a run whose ``dataset`` (run config, else the app's default) is not in ``folder``.

    ``folder`` is the ServerApp's ``data-dir``: the run's own, else the deployment's.
    """
    if dataset not in DATA_SOURCES:
        raise DeployError(f"dataset: unknown {dataset!r}; valid: {', '.join(DATA_SOURCES)}")
    if not has_dataset(folder, dataset):
        raise DeployError(
            f"run-config dataset={dataset!r} needs {_expected(dataset)} in the data-dir "
            f"{folder}; it is not there"
        )
