"""Which datasets a data folder holds, and whether a run's dataset is among them.

The ServerApp reads the test set from the deployment's ``data-dir``; a run whose ``dataset``
(run config, default from the app's ``pyproject.toml``) is not in that folder would fail inside
the ServerApp after the deployment had started. ``up`` therefore checks that the folder holds
at least one dataset (or the one asked for), and ``run`` checks the run's own dataset first.
"""

from __future__ import annotations

import tomllib
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


def default_dataset(app_dir: Path) -> str:
    """The ``dataset`` of the app's ``[tool.flwr.app.config]`` (``cifar10`` if not set)."""
    path = app_dir / "pyproject.toml"
    try:
        config = tomllib.loads(path.read_text())["tool"]["flwr"]["app"]["config"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "cifar10"
    return str(config.get("dataset", "cifar10"))


def check_run_data(run_config: str, data_dir: str, app_dir: Path) -> None:
    """Refuse a run whose ``dataset`` is missing from the ServerApp's ``data-dir``.

    ``run_config`` is the ``--run-config`` string as given to ``flwr run``; it is parsed with
    Flower's own parser. A string Flower cannot parse is left for ``flwr run`` to report.
    """
    import click
    from flwr.common.config import parse_config_args

    try:
        overrides = parse_config_args([run_config]) if run_config.strip() else {}
    except click.ClickException:
        return
    dataset = str(overrides.get("dataset", default_dataset(app_dir)))
    folder = Path(str(overrides.get("data-dir") or data_dir)).expanduser()
    if dataset not in DATA_SOURCES:
        raise DeployError(f"dataset: unknown {dataset!r}; valid: {', '.join(DATA_SOURCES)}")
    if not has_dataset(folder, dataset):
        raise DeployError(
            f"run-config dataset={dataset!r} needs {_expected(dataset)} in the data-dir "
            f"{folder}; it is not there"
        )
