"""What a result depends on besides its config: the machine, the library versions, the lock file.

A run is bit-exact on one machine and one set of library versions; on another CPU its float
results may drift (README, "Reproducibility"). So every ``results.json`` (written by
:class:`~fedzo_flwr.run.results.RunRecorder`) and every benchmark JSON (through
``benchmarks/machine.py``) carries :func:`environment`::

    {"machine":  {"cpu", "cores", "arch", "os", "distribution", "python"},
     "versions": {"torch", "torchvision", "flwr", "numpy", "pydantic"},
     "torch_build": "2.14.1+cu130",
     "lock_file": "scripts/constraints.txt", "lock_sha256": "<hex digest>"}

Versions are read from the installed distributions' metadata (:mod:`importlib.metadata`), so
nothing is imported to learn them (``flwr`` stays out of the library); a library that is not
installed reads ``None``. The lock file is looked up relative to this source tree; in an
installed wheel there is none and both lock fields are ``None``.
"""

from __future__ import annotations

import hashlib
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

LIBRARIES: tuple[str, ...] = ("torch", "torchvision", "flwr", "numpy", "pydantic")
"""The distributions whose versions a result records."""

LOCK_FILE = "scripts/constraints.txt"
"""The lock file (every dependency pinned), relative to the repository root."""

SOURCE_ROOT = Path(__file__).resolve().parents[1]
"""The folder holding the ``fedzo_flwr`` package: the repository root in a checkout."""


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _distribution() -> str | None:
    try:
        return platform.freedesktop_os_release().get("PRETTY_NAME")
    except OSError:
        return None


def machine() -> dict[str, Any]:
    """The machine: CPU model, logical cores, architecture, OS (kernel and distribution), Python.

    Returns
    -------
    dict
        ``{"cpu", "cores", "arch", "os", "distribution", "python"}``; ``distribution`` is the
        ``PRETTY_NAME`` of ``/etc/os-release`` (``None`` where there is none).
    """
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "arch": platform.machine(),
        "os": platform.platform(),
        "distribution": _distribution(),
        "python": platform.python_version(),
    }


def library_versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str | None]:
    """The installed version of each distribution in ``names`` (``None``: not installed).

    Parameters
    ----------
    names : tuple of str
        Distribution names, as pip knows them.

    Returns
    -------
    dict
        ``{name: version or None}``, in the order of ``names``.
    """
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def lock_file_path(root: Path = SOURCE_ROOT) -> Path | None:
    """The lock file of the source tree at ``root``, or ``None`` outside a checkout.

    A checkout holds ``pyproject.toml`` and ``scripts/constraints.txt`` beside the package; an
    installed wheel (``site-packages/fedzo_flwr``) has neither.
    """
    path = root / LOCK_FILE
    return path if (root / "pyproject.toml").is_file() and path.is_file() else None


def lock_file_sha256(root: Path = SOURCE_ROOT) -> str | None:
    """SHA-256 (hex) of the lock file's bytes, or ``None`` when :func:`lock_file_path` is."""
    path = lock_file_path(root)
    return None if path is None else hashlib.sha256(path.read_bytes()).hexdigest()


def _torch_build() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return str(torch.__version__)


def environment(root: Path = SOURCE_ROOT) -> dict[str, Any]:
    """Everything a result records about where it was made (see the module docstring).

    Parameters
    ----------
    root : Path
        The source tree whose lock file is hashed (default: the one this package lives in).

    Returns
    -------
    dict
        ``{"machine", "versions", "torch_build", "lock_file", "lock_sha256"}``. ``lock_file`` is
        the relative path ``scripts/constraints.txt`` (never an absolute path) or ``None``;
        ``torch_build`` is ``torch.__version__`` (it names the CUDA or CPU build).
    """
    digest = lock_file_sha256(root)
    return {
        "machine": machine(),
        "versions": library_versions(),
        "torch_build": _torch_build(),
        "lock_file": None if digest is None else LOCK_FILE,
        "lock_sha256": digest,
    }
