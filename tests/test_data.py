"""Tests for fedzo_flwr.data: CIFAR loading/validation, normalisation, partitions, batches."""

from __future__ import annotations

import os
import pickle
import re
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from fedzo_flwr.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    DATASETS,
    SCHEMES,
    DatasetArrays,
    clear_partition_cache,
    client_partition,
    load_dataset,
    partition_indices,
    sample_batch,
    to_tensor,
)
from fedzo_flwr.data import cifar as cifar_module
from fedzo_flwr.data.cifar import SHIPPED_CIFAR10_SIZE

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


# ---------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="session")
def cifar10(data_dir: Path) -> DatasetArrays:
    """The real CIFAR-10, loaded once per test session (with sha256 verification)."""
    try:
        return load_dataset("cifar10", data_dir)
    except FileNotFoundError as err:  # conftest already checks; keep the reason explicit
        pytest.fail(f"real CIFAR-10 is required for these tests: {err}", pytrace=False)


@pytest.fixture(scope="session")
def labels(cifar10: DatasetArrays) -> np.ndarray:
    return cifar10.y_train


def _tiny_arrays(n_train: int = 20, n_test: int = 10, num_classes: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
        "y_train": np.arange(n_train, dtype=np.int64) % num_classes,
        "x_test": rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
        "y_test": np.arange(n_test, dtype=np.int64) % num_classes,
        "classes": np.array([f"class{i}" for i in range(num_classes)]),
    }


def _write_tiny_npz(folder: Path, name: str = "cifar10.npz", **overrides) -> Path:
    """Write a small npz in the shipped format; ``key=None`` drops an array."""
    arrays = _tiny_arrays()
    arrays.update(overrides)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    np.savez_compressed(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def _write_torchvision_folder(root: Path, dataset: str, n_per_file: int = 4):
    """Write tiny self-made batches in torchvision's python-pickle CIFAR layout (not CIFAR).

    Returns the expected (x_train, y_train, x_test, y_test, classes) in our HWC layout.
    """
    rng = np.random.default_rng(1)
    if dataset == "cifar10":
        folder, label_key, meta = root / "cifar-10-batches-py", "labels", "batches.meta"
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        test_files, meta_key, num_classes = ["test_batch"], "label_names", 10
    else:
        folder, label_key, meta = root / "cifar-100-python", "fine_labels", "meta"
        train_files, test_files, meta_key, num_classes = (
            ["train"],
            ["test"],
            "fine_label_names",
            100,
        )
    folder.mkdir(parents=True)
    out = {}
    for split, files in (("train", train_files), ("test", test_files)):
        xs, ys = [], []
        for name in files:
            data = rng.integers(0, 256, (n_per_file, 3 * 32 * 32), dtype=np.uint8)  # CHW planes
            targets = rng.integers(0, num_classes, n_per_file).tolist()
            with (folder / name).open("wb") as f:
                pickle.dump({"data": data, label_key: targets}, f)
            xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys.extend(targets)
        out[f"x_{split}"], out[f"y_{split}"] = np.concatenate(xs), np.array(ys)
    classes = [f"name{i}" for i in range(num_classes)]
    with (folder / meta).open("wb") as f:
        pickle.dump({meta_key: classes}, f)
    out["classes"] = tuple(classes)
    return out


def _skip_torchvision_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision checks the md5 of the real CIFAR files; our self-made files cannot match."""
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


def _max_class_fraction(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean over partitions of the largest class share (0.1 = balanced CIFAR-10, 1 = one class)."""
    return float(np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]))


# ---------------------------------------------------------------------------------------------
# the shipped CIFAR-10


def test_shipped_cifar10_loads(cifar10: DatasetArrays) -> None:
    d = cifar10
    assert d.name == "cifar10"
    assert d.x_train.shape == (50000, 32, 32, 3) and d.x_train.dtype == np.uint8
    assert d.y_train.shape == (50000,) and d.y_train.dtype == np.int64
    assert d.x_test.shape == (10000, 32, 32, 3) and d.x_test.dtype == np.uint8
    assert d.y_test.shape == (10000,) and d.y_test.dtype == np.int64
    assert d.classes == CIFAR10_CLASSES and d.num_classes == 10
    np.testing.assert_array_equal(np.bincount(d.y_train), np.full(10, 5000))
    np.testing.assert_array_equal(np.bincount(d.y_test), np.full(10, 1000))
    assert d.classes[d.y_train[0]] == "frog"
    mean = d.x_train.mean(axis=(0, 1, 2), dtype=np.float64) / 255.0
    np.testing.assert_allclose(mean, CIFAR10_MEAN, atol=1e-3)
    # Cached arrays are shared between callers: they must be read-only.
    assert not d.x_train.flags.writeable and not d.y_train.flags.writeable


def test_load_dataset_is_cached_and_checksum_computed_once(
    cifar10: DatasetArrays, data_dir: Path
) -> None:
    start = time.perf_counter()
    again = load_dataset("cifar10", data_dir)
    assert again is cifar10
    assert time.perf_counter() - start < 0.5
    npz = (data_dir / "cifar10.npz").resolve()
    if npz.is_file() and npz.stat().st_size == SHIPPED_CIFAR10_SIZE:
        assert any(key[0] == str(npz) for key in cifar_module._SHA256_CACHE)


def test_cifar100_missing_names_both_locations(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("cifar100", tmp_path)
    msg = str(info.value)
    assert str(tmp_path / "cifar100.npz") in msg
    assert str(tmp_path / "cifar-100-python") in msg
    assert "download=True" in msg


# ---------------------------------------------------------------------------------------------
# to_tensor


def test_to_tensor_shape_dtype_and_normalisation(cifar10: DatasetArrays) -> None:
    x = cifar10.x_train[:10000]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # read-only input must not trigger torch's warning
        t = to_tensor(x, "cifar10")
    assert t.shape == (10000, 3, 32, 32) and t.dtype == torch.float32 and t.is_contiguous()
    assert torch.all(t.mean(dim=(0, 2, 3)).abs() < 0.02)
    assert torch.all((t.std(dim=(0, 2, 3)) - 1).abs() < 0.02)
    # One pixel by hand: channel c of image 5 at (7, 11).
    for c in range(3):
        expected = (x[5, 7, 11, c] / 255.0 - CIFAR10_MEAN[c]) / CIFAR10_STD[c]
        assert t[5, c, 7, 11].item() == pytest.approx(expected, abs=1e-5)


def test_to_tensor_cifar100_stats_and_device() -> None:
    x = np.full((2, 32, 32, 3), 128, dtype=np.uint8)
    t10, t100 = to_tensor(x, "cifar10", device="cpu"), to_tensor(x, "cifar100")
    assert t10.device.type == "cpu" and not torch.equal(t10, t100)


@pytest.mark.parametrize(
    ("x", "dataset", "match"),
    [
        (np.zeros((2, 32, 32, 3), np.float32), "cifar10", "x_uint8"),
        (np.zeros((32, 32, 3), np.uint8), "cifar10", "x_uint8"),
        (np.zeros((2, 3, 32, 32), np.uint8), "cifar10", "x_uint8"),
        (np.zeros((2, 32, 32, 3), np.uint8), "mnist", "dataset"),
    ],
)
def test_to_tensor_rejects_bad_input(x: np.ndarray, dataset: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        to_tensor(x, dataset)


# ---------------------------------------------------------------------------------------------
# load_dataset errors and formats (small self-made files)


def test_unknown_dataset_names_argument(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"dataset 'foo'.*cifar10, cifar100"):
        load_dataset("foo", tmp_path)
    assert DATASETS == ("cifar10", "cifar100")


def test_missing_dir_raises_file_not_found_naming_paths(tmp_path: Path) -> None:
    missing = tmp_path / "does-not-exist"
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("cifar10", missing)
    msg = str(info.value)
    assert str(missing) in msg
    assert str(missing / "cifar10.npz") in msg and str(missing / "cifar-10-batches-py") in msg
    assert "shared" in msg and "CIFAR10(root=" in msg and "download=True" in msg


def test_tiny_npz_loads_and_casts_labels(tmp_path: Path) -> None:
    arrays = _tiny_arrays()
    _write_tiny_npz(tmp_path, y_train=arrays["y_train"].astype(np.int32))
    d = load_dataset("cifar10", tmp_path)
    assert d.x_train.shape == (20, 32, 32, 3) and d.x_test.shape == (10, 32, 32, 3)
    assert d.y_train.dtype == np.int64 and d.y_test.dtype == np.int64
    np.testing.assert_array_equal(d.x_train, arrays["x_train"])
    np.testing.assert_array_equal(d.y_train, arrays["y_train"])
    assert d.classes == tuple(f"class{i}" for i in range(10))


def test_truncated_npz_raises_value_error_naming_file(tmp_path: Path) -> None:
    good = _write_tiny_npz(tmp_path / "good")
    blob = good.read_bytes()
    truncated = tmp_path / "truncated" / "cifar10.npz"
    truncated.parent.mkdir()
    truncated.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match=re.escape(str(truncated.resolve()))):
        load_dataset("cifar10", truncated.parent)

    corrupt = tmp_path / "corrupt" / "cifar10.npz"
    corrupt.parent.mkdir()
    middle = len(blob) // 2
    corrupt.write_bytes(
        blob[:middle] + bytes(b ^ 0xFF for b in blob[middle : middle + 64]) + blob[middle + 64 :]
    )
    with pytest.raises(ValueError, match=re.escape(str(corrupt.resolve()))):
        load_dataset("cifar10", corrupt.parent)


def test_shipped_size_file_with_wrong_checksum(tmp_path: Path) -> None:
    fake = tmp_path / "cifar10.npz"
    with fake.open("wb") as f:  # sparse file of the shipped size, all zeros
        f.truncate(SHIPPED_CIFAR10_SIZE)
    with pytest.raises(ValueError, match="sha256 mismatch"):
        load_dataset("cifar10", tmp_path)
    # verify=False skips the checksum; the zeros are then no zip file at all.
    with pytest.raises(ValueError, match=re.escape(str(fake.resolve()))):
        load_dataset("cifar10", tmp_path, verify=False)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"x_train": np.zeros((20, 32, 32), np.uint8)}, "x_train"),
        ({"x_test": np.zeros((10, 3, 32, 32), np.uint8)}, "x_test"),
        ({"x_train": np.zeros((20, 32, 32, 3), np.float32)}, "uint8"),
        ({"y_train": np.zeros((20, 1), np.int64)}, "y_train"),
        ({"y_train": np.zeros(19, np.int64)}, "y_train"),
        ({"y_test": np.full(10, 0.5)}, "y_test"),
        ({"y_test": np.full(10, 10)}, "labels must lie"),
        ({"y_train": np.full(20, -1)}, "labels must lie"),
        ({"classes": np.array(["a", "b"])}, "class names"),
        ({"x_test": None}, "missing array"),
    ],
)
def test_bad_npz_arrays_raise_value_error(tmp_path: Path, overrides: dict, match: str) -> None:
    path = _write_tiny_npz(tmp_path, **overrides)
    with pytest.raises(ValueError, match=match) as info:
        load_dataset("cifar10", tmp_path)
    assert str(path.resolve()) in str(info.value)


def test_npz_preferred_over_torchvision_folder(tmp_path: Path) -> None:
    _write_torchvision_folder(tmp_path, "cifar10")
    _write_tiny_npz(tmp_path)
    d = load_dataset("cifar10", tmp_path)
    assert len(d.y_train) == 20  # from the npz, not the 5 x 4 torchvision batches


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_loader_torchvision_path_with_small_self_made_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dataset: str
) -> None:
    """Our loader's torchvision branch on tiny self-made files in torchvision's layout."""
    expected = _write_torchvision_folder(tmp_path, dataset)
    _skip_torchvision_md5(monkeypatch)
    d = load_dataset(dataset, tmp_path)
    assert d.name == dataset and d.classes == expected["classes"]
    for key in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(d, key), expected[key])
    assert d.x_train.dtype == np.uint8 and d.y_train.dtype == np.int64
    assert d.x_train.flags.c_contiguous


def test_torchvision_folder_failing_md5_is_value_error(tmp_path: Path) -> None:
    _write_torchvision_folder(tmp_path, "cifar10")  # self-made files never match torchvision's md5
    with pytest.raises(
        ValueError, match=re.escape(str(tmp_path.resolve() / "cifar-10-batches-py"))
    ):
        load_dataset("cifar10", tmp_path)


# ---------------------------------------------------------------------------------------------
# partitions on the real CIFAR-10 labels


@pytest.mark.parametrize("scheme", SCHEMES)
def test_partitions_disjoint_sorted_and_deterministic(labels: np.ndarray, scheme: str) -> None:
    clear_partition_cache()
    first = partition_indices(labels, 10, scheme, seed=0)
    assert len(first) == 10
    for part in first:
        assert part.dtype == np.int64 and part.ndim == 1 and len(part) > 0
        assert np.all(np.diff(part) > 0)  # sorted, no repeats
        assert part.min() >= 0 and part.max() < len(labels)
        assert not part.flags.writeable
    everything = np.concatenate(first)
    assert len(np.unique(everything)) == len(everything)  # disjoint

    clear_partition_cache()  # recompute from scratch: determinism, not the cache
    again = partition_indices(labels, 10, scheme, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))

    other = partition_indices(labels, 10, scheme, seed=1)
    assert any(not np.array_equal(a, b) for a, b in zip(first, other))


def test_partition_cache_returns_same_result_quickly(labels: np.ndarray) -> None:
    first = partition_indices(labels, 10, "dirichlet", alpha=0.3, seed=3)
    start = time.perf_counter()
    again = partition_indices(labels, 10, "dirichlet", alpha=0.3, seed=3)
    assert time.perf_counter() - start < 0.1
    assert again is not first and all(a is b for a, b in zip(first, again))


def test_iid_sizes_balanced_and_cover_everything(labels: np.ndarray) -> None:
    parts = partition_indices(labels, 10, "iid", seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(50000))
    assert _max_class_fraction(labels, parts) < 0.15

    small = partition_indices(np.arange(103) % 4, 7, "iid", seed=0)
    sizes = [len(p) for p in small]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 103


def test_dirichlet_small_alpha_is_more_skewed(labels: np.ndarray) -> None:
    start = time.perf_counter()
    skewed = partition_indices(labels, 10, "dirichlet", alpha=0.1, seed=0)
    assert time.perf_counter() - start < 30  # resampling for min_partition_size stays quick
    flat = partition_indices(labels, 10, "dirichlet", alpha=100.0, seed=0)
    iid = partition_indices(labels, 10, "iid", seed=0)
    for parts in (skewed, flat):
        assert min(len(p) for p in parts) >= 10  # min_partition_size
        assert sum(len(p) for p in parts) == 50000  # Dirichlet uses every example
    s_skewed, s_flat, s_iid = (_max_class_fraction(labels, p) for p in (skewed, flat, iid))
    assert s_skewed > s_flat + 0.2
    assert s_skewed > s_iid + 0.2
    assert s_flat < 0.2


def test_shards_cifar10_ten_by_two(labels: np.ndarray) -> None:
    """2500-example shards of label-sorted CIFAR-10: each shard is one class."""
    parts = partition_indices(labels, 10, "shards", shards_per_partition=2, seed=0)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(50000))
    for part in parts:
        assert len(part) == 5000
        counts = np.bincount(labels[part], minlength=10)
        assert np.count_nonzero(counts) <= 2
        assert np.all(counts % 2500 == 0)


def test_shards_general_guarantee(labels: np.ndarray) -> None:
    """ShardPartitioner guarantees equal shards of floor(N / (P * k)) label-sorted examples.

    With 7 x 2 shards the size is 3571 (< 5000 per class), so a shard spans at most two classes
    and a partition at most 2 * 2 labels; the 50000 mod 14 = 6 leftover examples are unused.
    """
    parts = partition_indices(labels, 7, "shards", shards_per_partition=2, seed=0)
    shard_size = 50000 // 14
    assert [len(p) for p in parts] == [2 * shard_size] * 7
    assert sum(len(p) for p in parts) == 50000 - 6
    for part in parts:
        assert np.count_nonzero(np.bincount(labels[part], minlength=10)) <= 4


def test_client_partition_gathers_the_right_rows(cifar10: DatasetArrays) -> None:
    x, y = client_partition(cifar10, 3, 10, "shards", seed=0)
    idx = partition_indices(cifar10.y_train, 10, "shards", seed=0)[3]
    assert x.shape == (len(idx), 32, 32, 3) and x.dtype == np.uint8
    np.testing.assert_array_equal(x, cifar10.x_train[idx])
    np.testing.assert_array_equal(y, cifar10.y_train[idx])
    with pytest.raises(ValueError, match="partition_id"):
        client_partition(cifar10, 10, 10, "iid")


# ---------------------------------------------------------------------------------------------
# sample_batch


def test_sample_batch_deterministic_and_in_range() -> None:
    a = sample_batch(5000, 64, seed=7)
    assert a.dtype == np.int64 and a.shape == (64,)
    assert len(np.unique(a)) == 64 and a.min() >= 0 and a.max() < 5000
    np.testing.assert_array_equal(a, sample_batch(5000, 64, seed=7))
    assert not np.array_equal(a, sample_batch(5000, 64, seed=8))
    np.testing.assert_array_equal(a, np.random.default_rng(7).choice(5000, 64, replace=False))
    whole = sample_batch(10, 64, seed=0)
    np.testing.assert_array_equal(np.sort(whole), np.arange(10))


# ---------------------------------------------------------------------------------------------
# bad arguments

_SMALL_LABELS = np.arange(100) % 10


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_partitions": 0}, "num_partitions"),
        ({"num_partitions": 101}, "num_partitions"),
        ({"scheme": "pathological"}, "scheme"),
        ({"scheme": "dirichlet", "alpha": 0.0}, "alpha"),
        ({"scheme": "dirichlet", "alpha": -1.0}, "alpha"),
        ({"scheme": "dirichlet", "alpha": float("nan")}, "alpha"),
        ({"shards_per_partition": 0}, "shards_per_partition"),
        ({"scheme": "shards", "shards_per_partition": 11}, "shards_per_partition"),
        ({"seed": -1}, "seed"),
        ({"min_partition_size": -1}, "min_partition_size"),
        ({"scheme": "dirichlet", "min_partition_size": 11}, "min_partition_size"),
        ({"labels": np.zeros((10, 10), np.int64)}, "labels"),
        ({"labels": np.zeros(100, np.float32)}, "labels"),
        ({"labels": np.zeros(0, np.int64)}, "labels"),
    ],
)
def test_partition_bad_arguments(kwargs: dict, name: str) -> None:
    args = {"labels": _SMALL_LABELS, "num_partitions": 10, "scheme": "iid", **kwargs}
    labels, num_partitions, scheme = (
        args.pop("labels"),
        args.pop("num_partitions"),
        args.pop("scheme"),
    )
    with pytest.raises(ValueError, match=name):
        partition_indices(labels, num_partitions, scheme, **args)


def test_unknown_scheme_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="iid, dirichlet, shards"):
        partition_indices(_SMALL_LABELS, 2, "natural")


@pytest.mark.filterwarnings("ignore:The specified min_partition_size")
def test_dirichlet_unsatisfiable_min_size_names_alpha() -> None:
    # 100 examples, 10 partitions of at least 10 each: only an exactly even draw would do.
    with pytest.raises(ValueError, match=r"alpha=0\.05, min_partition_size=10"):
        partition_indices(_SMALL_LABELS, 10, "dirichlet", alpha=0.05, min_partition_size=10)


@pytest.mark.parametrize(
    ("args", "name"),
    [((0, 4, 0), "num_examples"), ((10, 0, 0), "batch_size"), ((10, 4, -1), "seed")],
)
def test_sample_batch_bad_arguments(args: tuple[int, int, int], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        sample_batch(*args)


@pytest.mark.filterwarnings("ignore:The specified min_partition_size")
def test_min_partition_size_decides_how_many_dirichlet_clients_fit(
    tmp_path, data_dir, monkeypatch
) -> None:
    # CIFAR-10 under Dirichlet(0.5): 2,000 clients with >= 10 examples each cannot be drawn in
    # 10 tries; with >= 1 example each they can, and the run config carries the setting.
    from fedzo_flwr.config import RunConfig
    from fedzo_flwr.data.client_data import load_client_data

    monkeypatch.setenv("FEDZO_CACHE_DIR", str(tmp_path))
    base = {"data-dir": str(data_dir), "partitioner": "dirichlet", "alpha": 0.5}
    strict = RunConfig.from_run_config(base)
    loose = RunConfig.from_run_config({**base, "min-partition-size": 1})
    assert strict.min_partition_size == 10 and loose.min_partition_size == 1
    with pytest.raises(ValueError, match="min_partition_size=10"):
        load_client_data(strict, 0, 2000)
    x, y = load_client_data(loose, 0, 2000)
    assert len(y) >= 1 and x.shape == (len(y), 32, 32, 3)
    cached = [p.name for p in tmp_path.iterdir()]  # one partition file, under the cache dir
    assert len(cached) == 1 and cached[0].startswith("cifar10-p0of2000-")


def test_partition_memory_cache_is_a_bounded_lru(tmp_path, data_dir, monkeypatch) -> None:
    # An actor serving many clients keeps only the MEMORY_CACHE_SIZE most recently used
    # partitions in memory; an evicted one comes back from the disk cache, equal but new.
    from fedzo_flwr.config import RunConfig
    from fedzo_flwr.data import client_data

    monkeypatch.setenv("FEDZO_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(client_data, "_PARTITIONS", type(client_data._PARTITIONS)())
    cfg = RunConfig.from_run_config({"data-dir": str(data_dir), "partitioner": "iid"})
    size = client_data.MEMORY_CACHE_SIZE
    assert size == 4
    first = {i: client_data.load_client_data(cfg, i, 50) for i in range(size + 2)}
    assert len(client_data._PARTITIONS) == size
    assert len(list(tmp_path.iterdir())) == size + 2  # the disk cache keeps them all
    # Partitions 2..5 are in memory: the very same arrays come back.
    again = client_data.load_client_data(cfg, 2, 50)
    assert again[0] is first[2][0] and again[1] is first[2][1]
    # Partition 0 was evicted: re-read from disk (equal values, new arrays), evicting 3 (the
    # least recently used now that 2 was just used).
    reread = client_data.load_client_data(cfg, 0, 50)
    assert reread[0] is not first[0][0]
    np.testing.assert_array_equal(reread[0], first[0][0])
    np.testing.assert_array_equal(reread[1], first[0][1])
    assert len(client_data._PARTITIONS) == size
    assert client_data.load_client_data(cfg, 2, 50)[0] is first[2][0]
    assert client_data.load_client_data(cfg, 3, 50)[0] is not first[3][0]
