"""CIFAR-10 / CIFAR-100 loading, validation and per-batch normalisation.

Images are kept in memory as ``uint8`` HWC arrays (CIFAR-10 train is 150 MB that way; a float32
copy would be 614 MB, too much for ten simulated clients in one process) and converted to
normalised float32 NCHW tensors one batch at a time with :func:`to_tensor`.

Two on-disk formats are understood, looked for in this order inside ``data_dir``:

1. ``<name>.npz`` (e.g. ``cifar10.npz``, the project's shipped format): arrays ``x_train``
   (N, 32, 32, 3) uint8, ``y_train`` (N,) int64, ``x_test``, ``y_test`` and ``classes``.
2. torchvision's python folder (``cifar-10-batches-py`` / ``cifar-100-python``), read with
   ``torchvision.datasets.CIFAR10/CIFAR100(root=data_dir, download=False)``.

:func:`dataset_sources` names both for a dataset (the one definition; ``deploy`` checks a data
folder with it).

Loaded datasets are cached per process (see :func:`load_dataset`, :func:`clear_cache`).
"""

from __future__ import annotations

import hashlib
import threading
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from fedzo_flwr.errors import DataError

DATASETS: tuple[str, ...] = ("cifar10", "cifar100")
"""Names accepted by :func:`load_dataset` and :func:`to_tensor`."""

CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN: tuple[float, float, float] = (0.5071, 0.4865, 0.4409)
CIFAR100_STD: tuple[float, float, float] = (0.2673, 0.2564, 0.2762)

NORMALIZATION: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
}
"""Per-channel ``(mean, std)`` of the training pixels / 255, by dataset name."""

SHIPPED_CIFAR10_FILENAME = "cifar10.npz"
SHIPPED_CIFAR10_SIZE = 169_611_021
SHIPPED_CIFAR10_SHA256 = "579b96fbe2b1ed8ec084996a9da7841cebf6866e6b670ccda1bbc14aa8ed4849"

IMAGE_SHAPE: tuple[int, int, int] = (32, 32, 3)
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
_TORCHVISION_CLASSES = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}
_NPZ_ARRAYS = ("x_train", "y_train", "x_test", "y_test", "classes")
_CHUNK = 1 << 20

_DATASET_CACHE: dict[tuple[str, str], DatasetArrays] = {}
_SHA256_CACHE: dict[tuple[str, int, int], str] = {}
_LOCK = threading.Lock()


class DatasetSources(NamedTuple):
    """The names, inside a data folder, that :func:`load_dataset` reads a dataset from.

    Attributes
    ----------
    npz_file : str
        The npz file (e.g. ``cifar10.npz``), read first when present.
    torchvision_folder : str
        torchvision's python-format folder (e.g. ``cifar-10-batches-py``), read otherwise.

    """

    npz_file: str
    torchvision_folder: str


_SOURCES: dict[str, DatasetSources] = {
    "cifar10": DatasetSources("cifar10.npz", "cifar-10-batches-py"),
    "cifar100": DatasetSources("cifar100.npz", "cifar-100-python"),
}


@dataclass(frozen=True)
class DatasetArrays:
    """A whole image-classification dataset held as read-only numpy arrays.

    Attributes
    ----------
    name : str
        Dataset name, one of :data:`DATASETS`.
    x_train, x_test : np.ndarray
        Images, shape (N, 32, 32, 3), dtype uint8, HWC, RGB, 0..255.
    y_train, y_test : np.ndarray
        Labels, shape (N,), dtype int64, in ``[0, num_classes)``.
    classes : tuple of str
        Label names; ``classes[k]`` names label ``k``.

    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(classes)``)."""
        return len(self.classes)


def check_dataset_name(dataset: str) -> str:
    """Return ``dataset`` if it is one of :data:`DATASETS`, else raise ``ValueError``."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(DATASETS)}")
    return dataset


def dataset_sources(name: str) -> DatasetSources:
    """The file and folder names :func:`load_dataset` accepts for ``name``, in lookup order.

    Raises
    ------
    ValueError
        If ``name`` is not one of :data:`DATASETS`.

    """
    return _SOURCES[check_dataset_name(name)]


def clear_cache() -> None:
    """Forget every dataset loaded by :func:`load_dataset` and every checksum computed."""
    with _LOCK:
        _DATASET_CACHE.clear()
        _SHA256_CACHE.clear()


def load_dataset(name: str, data_dir: str | Path, *, verify: bool = True) -> DatasetArrays:
    """Load a CIFAR dataset from ``data_dir``, validated, as uint8/int64 arrays.

    Results are cached in a module-level dict keyed by ``(name, resolved data_dir)``: the
    first call in a process reads the files (about a second for ``cifar10.npz``), later
    calls return the same :class:`DatasetArrays` object. Its arrays are read-only so the
    shared copy cannot be modified by one caller behind another's back. Call
    :func:`clear_cache` to force a re-read (e.g. after the files changed).

    Parameters
    ----------
    name : str
        ``"cifar10"`` or ``"cifar100"``.
    data_dir : str or Path
        Folder holding ``<name>.npz`` or torchvision's ``cifar-10-batches-py`` /
        ``cifar-100-python`` folder. The npz is preferred when both exist.
    verify : bool, default True
        Check the sha256 of the shipped ``cifar10.npz`` (only when the file has the shipped
        size, 169,611,021 bytes). The checksum is computed once per process per
        ``(path, size, mtime)``.

    Returns
    -------
    DatasetArrays
        The dataset; images (N, 32, 32, 3) uint8, labels (N,) int64.

    Raises
    ------
    ValueError
        If ``name`` is unknown.
    DataError
        If the files are corrupt, truncated, fail the checksum or hold arrays of the wrong
        shape, dtype or label range (the message names the file).
    FileNotFoundError
        If neither format is present; the message lists every path looked at and how to
        obtain the data.

    """
    check_dataset_name(name)
    root = Path(data_dir).expanduser().resolve()
    key = (name, str(root))
    with _LOCK:
        cached = _DATASET_CACHE.get(key)
        if cached is not None:
            return cached
        sources = dataset_sources(name)
        npz_path = root / sources.npz_file
        folder = root / sources.torchvision_folder
        if npz_path.is_file():
            if verify:
                _verify_shipped_checksum(npz_path)
            arrays = _read_npz(npz_path)
            data = _validated(name, arrays, source=str(npz_path))
        elif folder.is_dir():
            data = _validated(name, _read_torchvision(name, root, folder), source=str(folder))
        else:
            raise FileNotFoundError(_not_found_message(name, root, npz_path, folder))
        _DATASET_CACHE[key] = data
        return data


def to_tensor(
    x_uint8: np.ndarray, dataset: str, device: torch.device | str | None = None
) -> torch.Tensor:
    """Convert a uint8 HWC image batch into a normalised float32 NCHW tensor.

    ``out[b, c] = (x[b, :, :, c] / 255 - mean[c]) / std[c]`` with the dataset's
    :data:`NORMALIZATION` statistics.

    Parameters
    ----------
    x_uint8 : np.ndarray
        Batch of shape (B, H, W, 3), dtype uint8.
    dataset : str
        Dataset name selecting the mean/std, one of :data:`DATASETS`.
    device : torch.device or str, optional
        Where to put the result; the uint8 batch is moved before conversion (4x less to
        copy than float32).

    Returns
    -------
    torch.Tensor
        Contiguous float32 tensor of shape (B, 3, H, W).

    Raises
    ------
    ValueError
        If ``dataset`` is unknown or ``x_uint8`` is not a (B, H, W, 3) uint8 array.

    """
    check_dataset_name(dataset)
    x = np.asarray(x_uint8)
    if x.dtype != np.uint8:
        raise ValueError(f"x_uint8 must have dtype uint8, got {x.dtype}")
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"x_uint8 must have shape (B, H, W, 3), got {x.shape}")
    if not x.flags.writeable:  # torch.from_numpy warns on read-only arrays; a batch copy is cheap
        x = x.copy()
    t = torch.from_numpy(x).to(device).permute(0, 3, 1, 2)
    mean, std = NORMALIZATION[dataset]
    mean_t = torch.tensor(mean, dtype=torch.float32, device=t.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=t.device).view(1, 3, 1, 1)
    out = t.to(torch.float32).div_(255.0).sub_(mean_t).div_(std_t)
    return out.contiguous()


def batch_tensors(
    x_uint8: np.ndarray, y: np.ndarray, idx: np.ndarray, dataset: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mini-batch ``idx`` of a partition as model inputs and int64 targets.

    ``(to_tensor(x_uint8[idx], dataset), y[idx] as a torch.long tensor)``: the batch every
    client (zeroth-order, FedAvg, progressive) trains on.
    """
    return to_tensor(x_uint8[idx], dataset), torch.as_tensor(y[idx], dtype=torch.long)


def _not_found_message(name: str, root: Path, npz_path: Path, folder: Path) -> str:
    tv_class = _TORCHVISION_CLASSES[name]
    lines = [f"{name} not found. Looked for:"]
    if not root.is_dir():
        lines.append(f"  {root} (data_dir: does not exist or is not a folder)")
    lines += [
        f"  {npz_path} (npz file: missing)",
        f"  {folder} (torchvision folder: missing)",
        "To get the data:",
    ]
    if name == "cifar10":
        lines.append(
            f"  - copy {SHIPPED_CIFAR10_FILENAME} from the project's shared data "
            "(shared/data/ beside the repository, see its README.md) into data_dir, or"
        )
    lines.append(
        f"  - on a machine with internet run torchvision.datasets.{tv_class}"
        f"(root={str(root)!r}, download=True) and copy {folder.name}/ into data_dir."
    )
    return "\n".join(lines)


def _file_sha256(path: Path) -> str:
    """Return the hex sha256 of ``path``, streamed in 1 MiB chunks, cached per process."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    digest = _SHA256_CACHE.get(key)
    if digest is None:
        h = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        digest = h.hexdigest()
        _SHA256_CACHE[key] = digest
    return digest


def _verify_shipped_checksum(path: Path) -> None:
    """Check the sha256 of the shipped ``cifar10.npz`` (a file of the shipped size only)."""
    if path.name != SHIPPED_CIFAR10_FILENAME or path.stat().st_size != SHIPPED_CIFAR10_SIZE:
        return
    digest = _file_sha256(path)
    if digest != SHIPPED_CIFAR10_SHA256:
        raise DataError(
            f"{path}: sha256 mismatch (got {digest}, expected {SHIPPED_CIFAR10_SHA256}); "
            "the file is corrupt. Copy it again from the project's shared data, or pass "
            "verify=False to skip this check."
        )


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Read the required arrays of an npz file; corrupt/truncated files raise ``DataError``."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in _NPZ_ARRAYS if k in npz.files}
    except (zipfile.BadZipFile, EOFError, zlib.error, OSError, ValueError) as err:
        raise DataError(
            f"{path}: cannot read npz file (truncated or corrupt?): {type(err).__name__}: {err}"
        ) from err
    missing = [k for k in _NPZ_ARRAYS if k not in arrays]
    if missing:
        raise DataError(
            f"{path}: missing array(s) {', '.join(missing)}; expected {', '.join(_NPZ_ARRAYS)}"
        )
    return arrays


def _read_torchvision(name: str, root: Path, folder: Path) -> dict[str, np.ndarray]:
    """Read torchvision's python-format folder via its dataset class (no transforms)."""
    import pickle

    from torchvision import datasets as tv_datasets

    cls = getattr(tv_datasets, _TORCHVISION_CLASSES[name])
    try:
        train = cls(root=str(root), train=True, download=False)
        test = cls(root=str(root), train=False, download=False)
    except (RuntimeError, OSError, EOFError, KeyError, pickle.UnpicklingError, ValueError) as err:
        raise DataError(
            f"{folder}: torchvision could not read the folder (incomplete or corrupt?): "
            f"{type(err).__name__}: {err}"
        ) from err
    return {
        "x_train": np.asarray(train.data),
        "y_train": np.asarray(train.targets),
        "x_test": np.asarray(test.data),
        "y_test": np.asarray(test.targets),
        "classes": np.asarray(train.classes),
    }


def _validated(name: str, arrays: dict[str, np.ndarray], source: str) -> DatasetArrays:
    """Check shapes, dtypes and label ranges; return read-only contiguous arrays."""
    num_classes = NUM_CLASSES[name]
    classes = tuple(str(c) for c in np.asarray(arrays["classes"]).reshape(-1))
    if len(classes) != num_classes:
        raise DataError(f"{source}: expected {num_classes} class names, got {len(classes)}")
    out: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        x = np.asarray(arrays[f"x_{split}"])
        y = np.asarray(arrays[f"y_{split}"])
        if x.ndim != 4 or x.shape[1:] != IMAGE_SHAPE:
            raise DataError(f"{source}: x_{split} must have shape (N, 32, 32, 3), got {x.shape}")
        if x.dtype != np.uint8:
            raise DataError(f"{source}: x_{split} must have dtype uint8, got {x.dtype}")
        if y.ndim != 1:
            raise DataError(f"{source}: y_{split} must have shape (N,), got {y.shape}")
        if not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{source}: y_{split} must hold integers, got dtype {y.dtype}")
        if len(x) != len(y):
            raise DataError(
                f"{source}: x_{split} has {len(x)} images but y_{split} has {len(y)} labels"
            )
        if len(y) == 0:
            raise DataError(f"{source}: the {split} split is empty")
        if y.min() < 0 or y.max() >= num_classes:
            raise DataError(
                f"{source}: y_{split} labels must lie in [0, {num_classes}), "
                f"got range [{y.min()}, {y.max()}]"
            )
        x = np.ascontiguousarray(x)
        y = np.ascontiguousarray(y, dtype=np.int64)
        x.setflags(write=False)
        y.setflags(write=False)
        out[f"x_{split}"], out[f"y_{split}"] = x, y
    return DatasetArrays(name=name, classes=classes, **out)
