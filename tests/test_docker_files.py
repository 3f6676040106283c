"""Offline checks of docker/ (no Docker engine here) and of the flags deploy/ passes to Flower.

* Both compose files validate against the Compose Specification schema vendored in
  check-jsonschema (``--builtin-schema vendor.compose-spec``; no network), and a typo is caught.
* Every ``--flag`` in a compose command (and in the argv that ``deploy.local`` builds) exists in
  ``--help`` of the installed flower-superlink / flower-supernode / flower-superexec 1.41.0,
  with valid choices; no flag removed since 1.28 (``--plugin-type``, ...) is used.
* Every file they reference exists: Dockerfile, its COPY sources (and the .dockerignore keeps
  them), data folder, and the TLS files that ``deploy/gen_certs.sh`` / ssh-keygen generate;
  every file a command names inside a container is mounted there.
* Image tags are pinned to the installed Flower version; the services are wired consistently.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import flwr
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yml"
COMPOSE_TLS = DOCKER / "compose.tls.yml"
DOCKERFILE = DOCKER / "Dockerfile.superexec"
FLWR_VERSION = "1.41.0"
REMOVED_FLAGS = {  # gone or deprecated in 1.41 (old compose files still use them)
    "--plugin-type",
    "--appio-api-address",
    "--fleet-api-address",
    "--control-api-address",
    "--fleet-api-type",
    "--serverappio-api-address",
    "--clientappio-api-address",
}
FILE_FLAGS = {
    "--ssl-ca-certfile",
    "--ssl-certfile",
    "--ssl-keyfile",
    "--root-certificates",
    "--auth-supernode-private-key",
}
CONTAINER_WORKDIR = Path("/app")  # Flower's images: WORKDIR /app, user app (uid 49999)

sys.path.insert(0, str(ROOT))


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())  # resolves the YAML anchors / merge keys


@cache
def _help(binary: str) -> str:
    exe = Path(sys.executable).parent / binary
    proc = subprocess.run(
        [str(exe if exe.exists() else binary), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "80", "FLWR_TELEMETRY_ENABLED": "0"},  # stable wrapping
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _binary(service: dict) -> str:
    image = service.get("image", "")
    if image.startswith("flwr/superlink:"):
        return "flower-superlink"
    if image.startswith("flwr/supernode:"):
        return "flower-supernode"
    if image.startswith("fedzo-flwr-superexec:"):
        return "flower-superexec"
    raise AssertionError(f"unknown image {image!r}")


def _flags(command: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for i, token in enumerate(command):
        if token.startswith("--"):
            nxt = command[i + 1] if i + 1 < len(command) else None
            out[token] = None if nxt is None or nxt.startswith("--") else nxt
    return out


def _assert_flags_known(binary: str, command: list[str]) -> None:
    text = _help(binary)
    for flag, value in _flags(command).items():
        assert flag not in REMOVED_FLAGS, f"{binary}: {flag} is gone/deprecated in 1.41"
        match = re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])(?: \{{([^}}]*)\}})?", text)
        assert match, f"{flag} is not a flag of {binary} {FLWR_VERSION}"
        if match.group(1) and value is not None:
            assert value in match.group(1).split(","), f"{binary} {flag} {value}: not a choice"
        deprecated = re.search(
            rf"(?<![\w-]){re.escape(flag)}(?![\w-])[^\n]*\n\s+(Deprecated|This argument is dep)",
            text,
        )
        assert not deprecated, f"{binary} {flag} is deprecated in {FLWR_VERSION}"


def _services() -> dict[str, dict]:
    return _load(COMPOSE)["services"]


# ------------------------------------------------------------------------------ schema


def _check_jsonschema() -> list[str]:
    exe = Path(sys.executable).parent / "check-jsonschema"
    if exe.exists():
        return [str(exe)]
    if shutil.which("check-jsonschema"):
        return ["check-jsonschema"]
    pytest.fail("check-jsonschema is missing: pip install -e '.[dev]'", pytrace=False)


def test_compose_files_match_the_compose_spec():
    proc = subprocess.run(
        [
            *_check_jsonschema(),
            "--builtin-schema",
            "vendor.compose-spec",
            str(COMPOSE),
            str(COMPOSE_TLS),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_schema_check_catches_a_typo(tmp_path):
    bad = tmp_path / "compose.yml"
    bad.write_text(COMPOSE.read_text().replace("    ports:\n", "    portz:\n", 1))
    proc = subprocess.run(
        [*_check_jsonschema(), "--builtin-schema", "vendor.compose-spec", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "portz" in proc.stdout, proc.stdout + proc.stderr


# ------------------------------------------------------------------------------ flags


def test_installed_flower_is_the_pinned_version():
    assert flwr.__version__ == FLWR_VERSION


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_TLS], ids=lambda p: p.name)
def test_every_compose_flag_exists_in_flower(path):
    base = _services()
    for name, service in _load(path)["services"].items():
        command = service.get("command")
        if command is None or "entrypoint" in service:
            continue
        assert isinstance(command, list), f"{name}: use the list form of command"
        _assert_flags_known(_binary({**base.get(name, {}), **service}), command)


def test_deploy_cli_flags_exist_in_flower(tmp_path):
    from deploy import local

    layout = local.Layout(tmp_path)
    for mode in local.MODES:
        _assert_flags_known("flower-superlink", local.superlink_argv(layout, mode, 9093)[1:])
        key = tmp_path / "node0" if mode == "tls-auth" else None
        argv = local.supernode_argv(layout, mode, 9093, 9094, "partition-id=0", key)
        _assert_flags_known("flower-supernode", argv[1:])
        assert ("--insecure" in argv) == (mode == "insecure")
    assert "--disable-runtime-dependency-installation" in local.superlink_argv(layout, "tls", 9093)


@pytest.mark.parametrize(
    "data_dir", ["/data", "/srv/my data/cifar", "/tmp/it's here", "C:\\data\\cifar"]
)
def test_node_config_survives_flowers_parser(data_dir):
    from flwr.common.config import parse_config_args

    from deploy import local

    parsed = parse_config_args([local.node_config(3, 8, data_dir)])
    assert parsed == {"partition-id": 3, "num-partitions": 8, "data-dir": data_dir}


def test_compose_node_configs_parse_and_cover_every_partition():
    from flwr.common.config import parse_config_args

    for path in (COMPOSE, COMPOSE_TLS):
        configs = []
        for service in _load(path)["services"].values():
            flags = _flags(service.get("command") or [])
            if "--node-config" in flags:
                configs.append(parse_config_args([flags["--node-config"]]))
        n = len(configs)
        assert n >= 2
        assert sorted(c["partition-id"] for c in configs) == list(range(n))
        assert all(c["num-partitions"] == n and c["data-dir"] == "/data" for c in configs)


# ------------------------------------------------------------------------------ images


def test_image_tags_are_pinned():
    images = [s["image"] for s in _services().values()]
    for image in images:
        assert ":" in image and not image.endswith((":latest", ":nightly", ":unstable")), image
        if image.startswith("flwr/"):
            assert image.split(":", 1)[1] == FLWR_VERSION, image
        else:
            project_version = re.search(
                r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M
            ).group(1)
            assert image == f"fedzo-flwr-superexec:{project_version}", image
    text = DOCKERFILE.read_text()
    assert re.search(rf"^ARG FLWR_VERSION={re.escape(FLWR_VERSION)}$", text, re.M)
    assert re.search(
        r"^FROM flwr/superexec:\$\{FLWR_VERSION\}-py\$\{PYTHON_VERSION\}-ubuntu24\.04$", text, re.M
    )
    assert '--index-url "${TORCH_INDEX_URL}"' in text
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu$", text, re.M)
    pyproject = (ROOT / "pyproject.toml").read_text()
    for pkg in ("torch", "torchvision"):
        pinned = re.search(rf'"{pkg}==([^"]+)"', pyproject).group(1)
        assert f"ARG {pkg.upper()}_VERSION={pinned}" in text, f"{pkg} pin differs from pyproject"
    assert re.search(r'^ENTRYPOINT \["flower-superexec"\]$', text, re.M)


def test_dockerfile_requirements_drop_flwr_and_torch_only(tmp_path):
    """Run the Dockerfile's own requirements step on the real pyproject.toml."""
    text = DOCKERFILE.read_text()
    snippet = re.search(r'RUN python -c "(import tomllib;.*?)" \\\n', text, re.S).group(1)
    code = snippet.replace("\\\n", "\n").replace(
        "/tmp/fedzo-pyproject.toml", str(ROOT / "pyproject.toml")
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    reqs = proc.stdout.split()
    names = {re.split(r"[<>=\[ ]", r)[0] for r in reqs}
    assert not names & {"flwr", "torch", "torchvision"}, reqs
    assert {"flwr-datasets", "numpy", "pydantic", "psutil", "matplotlib"} <= names, reqs


# ------------------------------------------------------------------------------ files


def _dockerignore_keeps(path: str) -> bool:
    keep = True
    for line in (DOCKER / "Dockerfile.superexec.dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        if fnmatch.fnmatch(path, line.lstrip("!")):
            keep = negate
    return keep


def test_build_files_exist_and_reach_the_image():
    for name, service in _services().items():
        build = service.get("build")
        if not build:
            continue
        context = (COMPOSE.parent / build["context"]).resolve()
        assert context == ROOT, f"{name}: build context {context}"
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE
    copies = re.findall(r"^COPY (?:--\S+ )*(\S+) \S+$", DOCKERFILE.read_text(), re.M)
    assert copies, "no COPY in the Dockerfile"
    for source in copies:
        assert (ROOT / source).exists(), f"COPY source {source} missing"
        assert _dockerignore_keeps(source), f"{source} is excluded by the .dockerignore"
    assert not _dockerignore_keeps(".venv") and not _dockerignore_keeps("outputs")


def _bind_mounts(path: Path) -> list[tuple[str, str, str]]:
    """(service, host source, container target) of every bind mount, env defaults applied."""
    mounts = []
    for name, service in _load(path)["services"].items():
        for volume in service.get("volumes", []):
            parts = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", volume).split(":")
            if parts[0].startswith((".", "/")):
                mounts.append((name, parts[0], parts[1]))
    return mounts


def test_mounted_host_files_exist_or_are_generated(tmp_path):
    # TLS material is generated (and git-ignored): generate it the documented way.
    certs = tmp_path / "certs"
    subprocess.run(
        ["bash", str(ROOT / "deploy" / "gen_certs.sh"), str(certs), "DNS:superlink"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    san = subprocess.run(
        ["openssl", "x509", "-in", str(certs / "server.pem"), "-noout", "-ext", "subjectAltName"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "DNS:superlink" in san and "IP Address:127.0.0.1" in san
    seen = 0
    for path in (COMPOSE, COMPOSE_TLS):
        for service, source, _target in _bind_mounts(path):
            seen += 1
            if source.startswith("./certs/"):
                assert (certs / source.removeprefix("./certs/")).is_file(), source
            elif source.startswith("./keys/"):
                assert re.fullmatch(r"\./keys/node\d+", source), source
            else:  # the data folder
                folder = (path.parent / source).resolve()
                assert (folder / "cifar10.npz").is_file(), f"{service}: no data in {folder}"
    assert seen >= 5


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_TLS], ids=lambda p: p.name)
def test_files_named_in_commands_are_mounted(path):
    base = _load(COMPOSE)["services"]
    volumes = set(_load(COMPOSE).get("volumes", {}))
    for name, service in _load(path)["services"].items():
        merged_volumes = {}
        for source in (base.get(name, {}), service):
            for volume in source.get("volumes", []):
                parts = volume.split(":")
                merged_volumes[parts[1]] = parts[0]
        flags = _flags(service.get("command") or [])
        for flag in FILE_FLAGS & set(flags):
            target = str(CONTAINER_WORKDIR / flags[flag])
            assert target in merged_volumes, f"{name}: {flag} {flags[flag]} is not mounted"
        if "--database" in flags:
            folder = str(CONTAINER_WORKDIR / Path(flags["--database"]).parent)
            assert merged_volumes.get(folder) in volumes, f"{name}: database not on a volume"


def test_services_are_wired_consistently():
    services = _services()
    link = services["superlink"]
    link_port = _flags(link["command"])["--port"]
    assert f"127.0.0.1:{link_port}:{link_port}" in link["ports"]  # loopback only
    nodes = [n for n in services if n.startswith("supernode-")]
    for node in nodes:
        flags = _flags(services[node]["command"])
        assert flags["--superlink"] == f"superlink:{link_port}"
        clientapp = services[f"superexec-clientapp-{node.split('-')[1]}"]
        address = _flags(clientapp["command"])["--runtime-api-address"]
        assert address == f"{node}:{flags['--port']}", (node, address)
        assert any(v.endswith(":/data:ro") for v in clientapp["volumes"])
    server = _flags(services["superexec-serverapp"]["command"])
    assert server["--runtime-api-address"] == f"superlink:{link_port}"
    tls = _load(COMPOSE_TLS)["services"]
    assert set(tls) <= set(services), "the TLS override names unknown services"
    for node in nodes:
        assert "--insecure" not in tls[node]["command"]
    assert "--enable-supernode-auth" in tls["superlink"]["command"]
