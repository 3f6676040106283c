"""Fast checks of the deployment tools, no daemons started.

* ``up`` accepts a data folder that holds CIFAR-100 only (and refuses, naming the files it
  looked for, one that holds no dataset or not the one asked for), before anything starts;
* ``run`` refuses a run whose ``dataset`` is not in its ``data-dir`` and passes one that is;
* the checks use the loader's own dataset, file and folder names
  (:func:`fedzo_flwr.data.cifar.dataset_sources`), imported only when a folder is checked.

The ``cifar100`` folders made here are empty placeholders in the layout the loader looks for:
they exercise only the presence check, never the loading of real CIFAR-100.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from deploy import local  # noqa: E402


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port on 127.0.0.1 with a listener: ``up`` stops there, after the data check."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def _up(data: Path, state: Path, port: int, **kwargs: Any) -> None:
    local.up("insecure", 1, data, state, port=port, node_ports=[local.free_port()], **kwargs)


@pytest.mark.parametrize("layout", ["cifar-100-python", "cifar100.npz"])
def test_up_accepts_a_folder_with_cifar100_only(tmp_path, busy_port, layout):
    data = tmp_path / "data"
    data.mkdir()
    if layout.endswith(".npz"):
        (data / layout).write_bytes(b"")
    else:
        (data / layout).mkdir()
    # Past the data check, up stops at the port check: nothing was started.
    with pytest.raises(local.DeployError, match=rf"port\(s\) \[{busy_port}\].*already in use"):
        _up(data, tmp_path / "state", busy_port)
    with pytest.raises(local.DeployError, match="already in use"):
        _up(data, tmp_path / "state", busy_port, dataset="cifar100")


def test_up_refuses_a_folder_without_the_dataset(tmp_path, busy_port):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(local.DeployError) as err:
        _up(empty, tmp_path / "state", busy_port)
    message = str(err.value)
    assert f"no dataset in {empty}" in message
    for name in ("cifar10.npz", "cifar-10-batches-py/", "cifar100.npz", "cifar-100-python/"):
        assert name in message
    only10 = tmp_path / "only10"
    only10.mkdir()
    (only10 / "cifar10.npz").write_bytes(b"")
    with pytest.raises(local.DeployError) as err:
        _up(only10, tmp_path / "state", busy_port, dataset="cifar100")
    assert str(err.value) == f"no cifar100 in {only10} (cifar100.npz or cifar-100-python/)"
    assert not (tmp_path / "state" / "deployment.json").exists()  # refused before anything


def test_data_sources_are_the_loaders(tmp_path):
    from deploy.data import has_dataset, loader_sources
    from fedzo_flwr.data import DATASETS, load_dataset
    from fedzo_flwr.data.cifar import dataset_sources

    # torchvision's folder names (CIFAR10/CIFAR100.base_folder) and the shipped npz names.
    assert dataset_sources("cifar10") == ("cifar10.npz", "cifar-10-batches-py")
    assert dataset_sources("cifar100") == ("cifar100.npz", "cifar-100-python")
    for name in DATASETS:
        npz, folder = dataset_sources(name)
        assert loader_sources(name) == (npz, folder)
        with pytest.raises(FileNotFoundError) as err:  # the loader lists where it looked
            load_dataset(name, ROOT / "no-such-folder")
        assert f"/{npz} (npz file" in str(err.value)
        assert f"/{folder} (torchvision folder" in str(err.value)
        for layout in (npz, folder):  # deploy accepts a folder holding either, nothing else
            data = tmp_path / name / layout.replace(".", "-")
            data.mkdir(parents=True)
            assert not has_dataset(data, name)
            if layout == npz:
                (data / npz).write_bytes(b"")
            else:
                (data / folder).mkdir()
            assert has_dataset(data, name)
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        dataset_sources("imagenet")
    with pytest.raises(local.DeployError) as deploy_err:
        loader_sources("imagenet")
    assert str(deploy_err.value) == "dataset: unknown 'imagenet'; valid: cifar10, cifar100"


def test_the_command_line_does_not_import_torch():
    # status, down and node never look at data: they must not pay for the library's torch.
    code = "import sys, deploy.cli; deploy.cli.build_parser(); print('torch' in sys.modules)"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert proc.stdout.strip() == "False"


def test_up_dataset_option_takes_the_loaders_names(capsys):
    from deploy.cli import build_parser

    assert build_parser().parse_args(["up", "--dataset", "cifar100"]).dataset == "cifar100"
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["up", "--dataset", "imagenet"])
    assert exit_info.value.code == 2
    assert (
        "argument --dataset: dataset: unknown 'imagenet'; valid: cifar10, cifar100"
        in capsys.readouterr().err
    )


def _deployment(tmp_path: Path, data: Path) -> Path:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    local.save_state(local.Layout(state_dir), {"data_dir": str(data), "processes": {}})
    return state_dir


def test_run_refuses_a_dataset_missing_from_the_data_dir(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "cifar-100-python").mkdir(parents=True)
    state_dir = _deployment(tmp_path, data)
    launched: list[list[str]] = []

    def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        launched.append(argv)
        return subprocess.CompletedProcess(argv, 0)

    monkeypatch.setattr(subprocess, "run", run)
    # The app's default dataset (pyproject.toml: cifar10) is not there.
    with pytest.raises(local.DeployError, match=r"dataset='cifar10' needs cifar10\.npz or"):
        local.run_app(state_dir, "num-server-rounds=1")
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(local.DeployError, match=rf"dataset='cifar100' .* {other}"):
        local.run_app(state_dir, f"dataset='cifar100' data-dir='{other}'")
    with pytest.raises(local.DeployError, match="dataset: unknown 'mnist'"):
        local.run_app(state_dir, "dataset='mnist'")
    assert launched == []
    assert local.run_app(state_dir, "dataset='cifar100' num-server-rounds=1") == 0
    (argv,) = launched
    config = argv[argv.index("--run-config") + 1]
    assert config == (
        f"data-dir='{data}' output-dir='{ROOT / 'outputs'}' dataset='cifar100' num-server-rounds=1"
    )
