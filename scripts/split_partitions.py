r"""Split CIFAR-10/100 into one file per device, so each SuperNode stores only its own part.

::

    python scripts/split_partitions.py --num-partitions 4 --out-dir partitions/ \\
        [--data-dir ../shared/data] [--run-config 'partitioner="dirichlet" alpha=0.5 seed=3407']

writes ``partitions/partition-<i>.npz`` (``x``: uint8 (n, 32, 32, 3) HWC, ``y``: int64 (n,),
``meta``: JSON string of the settings below plus partition-id and num-partitions) for
``i = 0 .. N-1`` and ``partitions/partitions.json`` (the settings, each file's size, label counts
and SHA-256). It uses the same partitioner, settings and seed as a run (``[tool.flwr.app.config]``
of pyproject.toml plus the ``--run-config`` overrides, validated by ``RunConfig``), so
``partition-<i>.npz`` holds exactly what SuperNode ``partition-id=i num-partitions=N`` trains on
in a run with those settings. Copy file ``i`` to device ``i`` (docs/devices.md).

``--device-data-dir /home/pi/fedzo-data`` also writes ``cache/<name>.npz`` per partition: the same
file under the name the ClientApp's on-disk partition cache looks for when the SuperNode has
``data-dir='/home/pi/fedzo-data'`` in its ``--node-config``. Put it in the device's
``$FEDZO_CACHE_DIR`` (default ``~/.cache/fedzo-flwr``) and the ClientApp reads it without ever
loading the full dataset (the folder may stay empty). This works with the current ClientApp; the
script verifies every name by loading it back through ``client_data.load_client_data``
and fails if the cache naming ever changes.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tomllib
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedzo_flwr.config import RunConfig  # noqa: E402
from fedzo_flwr.data import client_data, load_dataset  # noqa: E402
from fedzo_flwr.data.client_data import (  # noqa: E402
    PARTITION_KEYS,
    partition_cache_name,
    partition_of,
)


def run_config(overrides: str) -> RunConfig:
    """``[tool.flwr.app.config]`` defaults plus ``overrides`` (Flower's --run-config syntax)."""
    defaults = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    config = dict(defaults["config"])
    if overrides:
        from flwr.common.config import parse_config_args

        config.update(parse_config_args([overrides]))
    return RunConfig.from_run_config(config)


def cache_name(cfg: RunConfig, device_data_dir: str, pid: int, num_partitions: int) -> str:
    """File name ``load_client_data`` looks for on a device with ``data-dir=device_data_dir``."""
    return partition_cache_name(cfg, device_data_dir, pid, num_partitions)


def verify_cache(
    cfg: RunConfig,
    device_data_dir: str,
    cache_dir: Path,
    pid: int,
    n: int,
    x: np.ndarray,
    y: np.ndarray,
) -> None:
    """Load partition ``pid`` back the way the ClientApp does, from ``cache_dir`` only."""
    device_cfg = cfg.model_copy(update={"data_dir": device_data_dir})
    old = os.environ.get(client_data.CACHE_DIR_ENV)
    os.environ[client_data.CACHE_DIR_ENV] = str(cache_dir)
    client_data._PARTITIONS.clear()
    try:
        original = client_data.partition_of

        def refuse(*_args: object, **_kwargs: object) -> NoReturn:
            raise RuntimeError(
                "the ClientApp's partition-cache naming changed: it did not find "
                f"{cache_dir / cache_name(cfg, device_data_dir, pid, n)}"
            )

        client_data.partition_of = refuse
        got_x, got_y = client_data.load_client_data(device_cfg, pid, n)
    finally:
        client_data.partition_of = original
        client_data._PARTITIONS.clear()
        if old is None:
            os.environ.pop(client_data.CACHE_DIR_ENV, None)
        else:
            os.environ[client_data.CACHE_DIR_ENV] = old
    if not (np.array_equal(got_x, x) and np.array_equal(got_y, y)):
        raise RuntimeError(f"partition {pid} read back from the cache differs")


def split(
    cfg: RunConfig, num_partitions: int, out_dir: Path, device_data_dir: str | None = None
) -> dict[str, Any]:
    """Write every partition file and the manifest; return the manifest."""
    data = load_dataset(cfg.dataset, cfg.resolve_data_dir())
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {k: cfg.to_run_config()[k] for k in PARTITION_KEYS}
    manifest: dict[str, Any] = {
        "num-partitions": num_partitions,
        **settings,
        "node-config": f"partition-id=<i> num-partitions={num_partitions}",
        "partitions": [],
    }
    total = 0
    for pid in range(num_partitions):
        x, y = partition_of(cfg, data, pid, num_partitions)
        meta = json.dumps({**settings, "partition-id": pid, "num-partitions": num_partitions})
        buffer = io.BytesIO()
        # Uncompressed (loads fast on a Pi; images barely compress). `meta` (a str array, no
        # pickle needed) says which run settings produced the file, so a loader can refuse a
        # file that does not match the run config.
        np.savez(buffer, x=x, y=y, meta=np.array(meta))
        raw = buffer.getvalue()
        path = out_dir / f"partition-{pid}.npz"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(raw)
        tmp.replace(path)
        total += len(y)
        cached = None
        if device_data_dir:
            cached = out_dir / "cache" / cache_name(cfg, device_data_dir, pid, num_partitions)
            cached.parent.mkdir(exist_ok=True)
            cached.write_bytes(raw)
            verify_cache(cfg, device_data_dir, cached.parent, pid, num_partitions, x, y)
        counts = np.bincount(y, minlength=int(data.y_train.max()) + 1)
        manifest["partitions"].append(
            {
                "partition-id": pid,
                "file": path.name,
                "examples": len(y),
                "bytes": len(raw),
                "sha256": hashlib.sha256(raw).hexdigest(),
                "label-counts": counts.tolist(),
                **({"cache-file": f"cache/{cached.name}"} if cached else {}),
            }
        )
        print(f"[split] {path}: {len(y)} examples, {len(raw) / 1e6:.1f} MB")
    manifest["examples"] = total
    if device_data_dir:
        manifest["device-data-dir"] = device_data_dir
        manifest["node-config"] += f" data-dir='{device_data_dir}'"
    (out_dir / "partitions.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-partitions", "-n", type=int, required=True)
    parser.add_argument("--out-dir", "-o", type=Path, required=True)
    parser.add_argument(
        "--data-dir",
        default=None,
        help="folder with cifar10.npz (default: data-dir / $FEDZO_DATA_DIR)",
    )
    parser.add_argument(
        "--run-config", default="", help="the run's overrides, e.g. 'partitioner=\"iid\" seed=1'"
    )
    parser.add_argument(
        "--device-data-dir",
        default=None,
        help="absolute data-dir the devices' SuperNodes use: also write "
        "cache/<name>.npz files for their partition cache",
    )
    args = parser.parse_args(argv)
    if args.num_partitions < 1:
        parser.error("--num-partitions must be >= 1")
    cfg = run_config(args.run_config)
    if args.data_dir:
        cfg = cfg.model_copy(update={"data_dir": str(Path(args.data_dir).resolve())})
    device_dir = args.device_data_dir
    if device_dir is not None and (
        not device_dir.startswith("/")
        or "~" in device_dir
        or device_dir != os.path.normpath(device_dir)
    ):
        parser.error("--device-data-dir must be a normalized absolute path (no ~)")
    manifest = split(cfg, args.num_partitions, args.out_dir, device_dir)
    print(
        f"[split] {manifest['examples']} examples in {args.num_partitions} files; "
        f"manifest {args.out_dir / 'partitions.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
