"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Folder holding the real datasets (``cifar10.npz``).

    ``$FEDZO_DATA_DIR`` if set, else ``shared/data`` beside the repository root. Fails (does not
    skip) when the folder or ``cifar10.npz`` is missing: CI always provides it.
    """
    env = os.environ.get("FEDZO_DATA_DIR")
    path = Path(env).expanduser().resolve() if env else SHARED_DATA_DIR
    source = "$FEDZO_DATA_DIR" if env else "the default (shared/data beside the repository)"
    if not (path / "cifar10.npz").is_file() and not (path / "cifar-10-batches-py").is_dir():
        pytest.fail(
            f"CIFAR-10 data not found in {path} (from {source}): expected {path / 'cifar10.npz'}"
            " (see shared/data/README.md). Set FEDZO_DATA_DIR to the folder holding it.",
            pytrace=False,
        )
    return path
