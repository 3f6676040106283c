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

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
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


def _deployment(tmp_path: Path, data: Path, **state: Any) -> Path:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    local.save_state(local.Layout(state_dir), {"data_dir": str(data), "processes": {}, **state})
    return state_dir


class FakeFlower:
    """Stands in for the ``flwr`` CLI (``subprocess.run``): answers run, log and ls.

    The JSON it prints has the shape of Flower 1.41's ``--format json`` output
    (``flwr/cli/run/run.py``, ``flwr/cli/ls.py`` ``_to_json``, ``print_json_error``).
    """

    def __init__(self, status: str = "finished:completed", details: str = "", log: str = ""):
        self.status, self.details, self.log = status, details, log
        self.submit: dict[str, Any] = {"success": True, "run-id": "7", "federation-id": ""}
        self.launched: list[list[str]] = []
        self.on_submit: Any = None

    def __call__(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        self.launched.append(argv)
        command = argv[1]
        if command == "run":
            if self.on_submit:
                self.on_submit()
            out = json.dumps(self.submit)
        elif command == "ls":
            run = {"run-id": "7", "status": self.status, "status-details": self.details}
            out = json.dumps({"success": True, "runs": [run]})
        elif command == "log" and "--show" in argv:
            out = self.log
        else:  # flwr log --stream: the log goes to the terminal
            out = ""
        return subprocess.CompletedProcess(argv, 0, stdout=out, stderr="")

    def calls(self, command: str) -> list[list[str]]:
        return [argv for argv in self.launched if argv[1] == command]


def test_run_refuses_a_dataset_missing_from_the_data_dir(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "cifar-100-python").mkdir(parents=True)
    state_dir = _deployment(tmp_path, data)
    flower = FakeFlower()
    monkeypatch.setattr(subprocess, "run", flower)
    # The app's default dataset (pyproject.toml: cifar10) is not there.
    with pytest.raises(local.DeployError, match=r"dataset='cifar10' needs cifar10\.npz or"):
        local.run_app(state_dir, "num-server-rounds=1")
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(local.DeployError, match=rf"dataset='cifar100' .* {other}"):
        local.run_app(state_dir, f"dataset='cifar100' data-dir='{other}'")
    with pytest.raises(local.DeployError, match="dataset: unknown 'mnist'"):
        local.run_app(state_dir, "dataset='mnist'")
    assert flower.launched == []
    assert local.run_app(state_dir, "dataset='cifar100' num-server-rounds=1") == 0
    (argv,) = flower.calls("run")
    config = argv[argv.index("--run-config") + 1]
    assert config == (
        f"data-dir='{data}' output-dir='{ROOT / 'outputs'}' dataset='cifar100' num-server-rounds=1"
    )
    assert argv[-4:-2] == ["--format", "json"]


@pytest.mark.parametrize(
    ("run_config", "message"),
    [
        (
            "densty=0.2",
            "run-config refused before submission: key 'densty': unknown key "
            "(did you mean 'density'?); a run may set only the keys of "
            f"[tool.flwr.app.config] in {ROOT / 'pyproject.toml'}",
        ),
        (
            "k=10 densty=0.2 lrr=0.1",
            "run-config refused before submission: key 'densty': unknown key (did you mean "
            "'density'?); key 'lrr': unknown key (did you mean 'lr'?); a run may set only",
        ),
        (
            "density=1.5",
            "run-config refused before submission: invalid run config: key 'density': Input "
            "should be less than or equal to 1 (got 1.5)",
        ),
        (
            "model='lenet6'",
            "run-config refused before submission: invalid run config: key 'model': unknown "
            "model 'lenet6'; valid models: lenet-gn, lenet5, resnet18, resnet20 (got 'lenet6')",
        ),
        (
            "num-server-rounds = 3",
            "run-config 'num-server-rounds = 3': cannot read 'num-server-rounds = 3'; write "
            "key=value pairs with no spaces around '=' (Flower would silently drop it)",
        ),
    ],
)
def test_run_refuses_a_bad_run_config_before_submission(
    tmp_path, monkeypatch, capsys, data_dir, run_config, message
):
    state_dir = _deployment(tmp_path, data_dir)
    flower = FakeFlower()
    monkeypatch.setattr(subprocess, "run", flower)
    with pytest.raises(local.DeployError) as err:
        local.run_app(state_dir, run_config)
    assert str(err.value).startswith(message)
    # The command line: exit status 1, the message on stderr, nothing submitted.
    assert local.main(["--state-dir", str(state_dir), "run", run_config]) == 1
    assert capsys.readouterr().err == f"[deploy] error: {err.value}\n"
    assert flower.launched == []


def test_run_exits_with_the_runs_outcome(tmp_path, monkeypatch, capsys, data_dir):
    state_dir = _deployment(tmp_path, data_dir)
    details = "ServerApp failed with exception: resume-from: no checkpoint at /nope.pt"
    log = (
        "INFO :      [fedzo] results go to /out/x\n"
        "\x1b[91mERROR \x1b[0m:     [fedzo] cannot resume: resume-from: no checkpoint at /nope.pt\n"
        "ERROR :      ServerApp raised an exception\n"
        "Traceback (most recent call last):\n"
    )
    flower = FakeFlower("finished:failed", details, log)
    monkeypatch.setattr(subprocess, "run", flower)
    assert local.run_app(state_dir, "k=10") == local.EXIT_FAILED == 4
    captured = capsys.readouterr()
    assert captured.out == "[deploy] run 7 submitted; its log: `flwr log 7 fedzo-local`\n"
    assert captured.err == (
        f"[deploy] run 7 finished:failed: {details}\n"
        "[deploy] the ServerApp's errors (flwr log):\n"
        "  ERROR :     [fedzo] cannot resume: resume-from: no checkpoint at /nope.pt\n"
        "  ERROR :      ServerApp raised an exception\n"
    )
    (follow,) = [argv for argv in flower.calls("log") if "--stream" in argv]
    assert follow[1:] == ["log", "7", "fedzo-local", "--stream"]
    assert flower.calls("ls")[0][1:] == ["ls", "fedzo-local", "--run-id", "7", "--format", "json"]

    flower.status, flower.details = "finished:stopped", "Run stopped by user."
    assert local.run_app(state_dir, "k=10") == local.EXIT_FAILED
    assert "[deploy] run 7 finished:stopped: Run stopped by user." in capsys.readouterr().err
    flower.status, flower.details = "finished:completed", ""
    assert local.run_app(state_dir, "k=10") == 0
    assert capsys.readouterr().out.endswith("[deploy] run 7 finished:completed\n")
    assert local.main(["--state-dir", str(state_dir), "run", "k=10"]) == 0
    flower.status = "finished:failed"
    assert local.main(["--state-dir", str(state_dir), "run", "k=10"]) == 4


def test_run_names_the_superlinks_reason_for_a_refusal(tmp_path, monkeypatch, data_dir):
    link_log = tmp_path / "superlink.log"
    link_log.write_text("ERROR :      Could not start run: an older refusal\n")
    state_dir = _deployment(
        tmp_path, data_dir, processes={"superlink": {"name": "superlink", "log": str(link_log)}}
    )
    flower = FakeFlower()
    flower.submit = {
        "success": False,
        # print_json_error: the CLI's captured output, then the error
        "error-message": "Using SuperLink: fedzo-local (127.0.0.1:9093)\n"
        "[code: 15] Invalid run configuration.",
    }

    def superlink_refuses() -> None:  # as Flower's StartRun handler logs it
        with link_log.open("a") as out:
            out.write(
                "ERROR :      Could not start run: Key 'densty' is not present in the main "
                "dictionary\n"
            )

    flower.on_submit = superlink_refuses
    monkeypatch.setattr(subprocess, "run", flower)
    layout = local.Layout(state_dir)
    with pytest.raises(local.DeployError) as err:
        local.submit_run(layout, local.load_state(state_dir), ROOT, "densty=0.2")
    assert str(err.value) == (
        "the SuperLink refused the run: [code: 15] Invalid run configuration.; the SuperLink's "
        "log says: Key 'densty' is not present in the main dictionary"
    )


def _self_signed(path_dir: Path, not_after: datetime) -> None:
    """ca.crt + server.pem (+ keys) that expire at ``not_after``, written with cryptography."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    path_dir.mkdir(parents=True, exist_ok=True)
    for cert_name, key_name in (("ca.crt", "ca.key"), ("server.pem", "server.key")):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_after - timedelta(days=30))
            .not_valid_after(not_after)
            .sign(key, hashes.SHA256())
        )
        (path_dir / cert_name).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (path_dir / key_name).write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )


def _verified(certs: Path) -> None:
    subprocess.run(
        ["openssl", "verify", "-CAfile", str(certs / "ca.crt"), str(certs / "server.pem")],
        check=True,
        capture_output=True,
    )


@pytest.mark.parametrize(
    ("offset", "why"),
    [(timedelta(days=-2), "expired on"), (timedelta(hours=3), "expires on")],
)
def test_up_renews_expired_and_expiring_certificates(tmp_path, offset, why):
    layout = local.Layout(tmp_path / "state")
    now = datetime.now(UTC).replace(microsecond=0)
    _self_signed(layout.certs, now + offset)
    old = (layout.certs / "server.pem").read_bytes()
    assert local.renewal_reason(layout.certs) == (
        f"ca.crt {why} {now + offset:%Y-%m-%d %H:%M} UTC"
        + ("" if offset < timedelta(0) else ", in less than 24 h")
    )
    line = local.ensure_certs(layout)
    assert (layout.certs / "server.pem").read_bytes() != old
    for name in ("ca.crt", "server.pem"):  # gen_certs.sh's 30 days
        remaining = local.expiry(layout.certs / name) - datetime.now(UTC)
        assert timedelta(days=29, hours=23) < remaining <= timedelta(days=30), name
    _verified(layout.certs)
    until = min(local.expiry(layout.certs / n) for n in ("ca.crt", "server.pem"))
    assert line == (
        f"[deploy] TLS certificates in {layout.certs} renewed (ca.crt {why} "
        f"{now + offset:%Y-%m-%d %H:%M} UTC"
        + ("" if offset < timedelta(0) else ", in less than 24 h")
        + f"); valid until {until:%Y-%m-%d %H:%M} UTC"
    )
    assert local.renewal_reason(layout.certs) is None
    kept = (layout.certs / "server.pem").read_bytes()
    assert local.ensure_certs(layout) is None  # valid ones are reused as they are
    assert (layout.certs / "server.pem").read_bytes() == kept


def test_up_names_an_expired_server_certificate_under_a_valid_ca(tmp_path):
    certs = tmp_path / "certs"
    now = datetime.now(UTC).replace(microsecond=0)
    _self_signed(certs, now - timedelta(minutes=5))
    valid = tmp_path / "valid"
    _self_signed(valid, now + timedelta(days=20))
    (certs / "ca.crt").write_bytes((valid / "ca.crt").read_bytes())
    assert local.renewal_reason(certs) == (
        f"server.pem expired on {now - timedelta(minutes=5):%Y-%m-%d %H:%M} UTC"
    )
    (certs / "server.key").unlink()
    assert local.renewal_reason(certs) == "missing server.key"


def test_up_refuses_clearly_when_certificates_cannot_be_renewed(tmp_path, monkeypatch):
    from deploy import certs as certs_module

    layout = local.Layout(tmp_path / "state")
    _self_signed(layout.certs, datetime.now(UTC) - timedelta(days=1))
    broken = tmp_path / "gen_certs.sh"
    broken.write_text("echo 'openssl: command not found' >&2; exit 127\n")
    monkeypatch.setattr(certs_module, "GEN_CERTS", broken)
    with pytest.raises(local.DeployError) as err:
        local.ensure_certs(layout)
    message = str(err.value)
    assert message.startswith(
        f"cannot renew the TLS certificates in {layout.certs} (ca.crt expired"
    )
    assert "gen_certs.sh failed: openssl: command not found; it needs bash and openssl" in message


def test_up_names_the_role_of_each_port_it_refuses(tmp_path, busy_port, data_dir):
    free = local.free_port()
    with pytest.raises(local.DeployError) as err:
        local.up(
            "insecure", 2, data_dir, tmp_path / "state", port=free, node_ports=[busy_port, free]
        )
    assert str(err.value) == (
        f"port(s) [{free}] given twice (SuperLink {free}, SuperNodes {busy_port}, {free}): "
        "every daemon needs its own"
    )
    other = local.free_port()
    with pytest.raises(local.DeployError) as err:
        local.up("insecure", 1, data_dir, tmp_path / "state", port=other, node_ports=[busy_port])
    assert str(err.value) == (
        f"port(s) [{busy_port}] on 127.0.0.1 already in use: {busy_port} (supernode-0's Runtime "
        "API); choose free ones with --port (SuperLink) and --node-port-base (SuperNode i: base+i)"
    )
    assert not (tmp_path / "state" / "deployment.json").exists()  # refused before anything


def test_node_start_refuses_a_port_taken_by_another_supernode(tmp_path, busy_port, data_dir):
    state_dir = _deployment(
        tmp_path, data_dir, mode="insecure", port=local.free_port(), nodes=1, node_ports=[busy_port]
    )
    with pytest.raises(local.DeployError) as err:
        local.start_supernode(state_dir, 0)
    assert str(err.value) == (
        f"port {busy_port} on 127.0.0.1 (supernode-0's Runtime API) is already in use, e.g. by a "
        "flower-supernode started by hand (give that one another --port)"
    )
    assert local.load_state(state_dir)["processes"] == {}  # nothing started


def test_summary_says_which_ports_the_deployment_uses(tmp_path):
    layout = local.Layout(tmp_path)
    state = {
        "mode": "insecure",
        "port": 9093,
        "nodes": 2,
        "node_ports": [9094, 9095],
        "data_dir": "/data",
        "processes": {"superlink": {"pid": 1, "log": str(tmp_path / "l.log")}},
    }
    assert (
        "  ports:     9093 (SuperLink), 9094 (supernode-0's Runtime API), 9095 (supernode-1's "
        "Runtime API) on 127.0.0.1 (a flower-supernode started by hand on this host needs a "
        "--port of its own)\n"
    ) in local.summary(layout, state)
