"""A real deployment on loopback: SuperLink + 2 SuperNodes over TLS with SuperNode authentication.

One deployment (``deploy.local.up(mode="tls-auth")``, free ports chosen at run time, its own state
directory and Flower homes) serves the four tests, in this order:

* the real app runs 2 rounds on CIFAR-10 with both nodes and writes ``results.json``;
* a run the ServerApp refuses (``resume-from`` a missing checkpoint) makes ``run`` exit
  :data:`deploy.runs.EXIT_FAILED` with the ServerApp's error, and a run config the SuperLink
  refuses is reported with the SuperLink's reason (no ServerApp is started for it);
* a SuperNode whose key was never registered is refused;
* a SuperNode killed (SIGKILL) in the middle of a round does not crash the server: the round
  proceeds with the surviving node once the SuperLink marks the dead one offline, and the run
  completes.

Everything is stopped by PID in the fixture's ``finally`` (``deploy.local.down``). In deployment
every ClientApp message starts a fresh Python process (~10-30 s with torch), so the runs use tiny
settings (K=10, 2 NTK-SAP iterations).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from deploy import local  # noqa: E402

pytestmark = pytest.mark.slow

NODES = 2
SMALL = "k=10 prune-iterations=2 prune-repeats=1"
RUN_TIMEOUT = 420


def _distinct_free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = local.free_port()
        if port not in ports:
            ports.append(port)
    return ports


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, data_dir):
    state_dir = tmp_path_factory.mktemp("deploy")
    port, *node_ports = _distinct_free_ports(1 + NODES)
    try:
        local.up(
            "tls-auth",
            NODES,
            data_dir,
            state_dir,
            port=port,
            node_ports=node_ports,
            timeout=180,
            quiet=True,
        )
        yield state_dir
    finally:
        local.down(state_dir, quiet=True)
        state = local.load_state(state_dir)
        if state is not None:
            still = [r["name"] for r in state["processes"].values() if local.is_running(r)]
            assert not still, f"processes left running after down: {still}"


def _ensure_nodes_online(state_dir: Path) -> dict:
    """Restart any SuperNode a previous test stopped, then wait until all are online."""
    state = local.load_state(state_dir)
    records = []
    for i in range(NODES):
        record = state["processes"][f"supernode-{i}"]
        if not local.is_running(record):
            record = local.start_supernode(state_dir, i)
        records.append(record)
    local.wait_online(local.Layout(Path(state_dir)), records, NODES, timeout=150)
    return local.load_state(state_dir)


class _Run:
    """``flwr run ... --stream`` in the background, its output collected line by line."""

    def __init__(self, state_dir: Path, run_config: str) -> None:
        self.started = time.monotonic()
        self.lines: list[tuple[float, str]] = []
        self.proc = local.run_app(
            state_dir,
            run_config,
            background=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.monotonic() - self.started, line))

    @property
    def log(self) -> str:
        return "".join(line for _, line in self.lines)

    def wait_for(self, pattern: str, count: int = 1, timeout: float = RUN_TIMEOUT) -> float:
        """Seconds since start when ``pattern`` had appeared ``count`` times."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hits = [t for t, line in list(self.lines) if re.search(pattern, line)]
            if len(hits) >= count:
                return hits[count - 1]
            if self.proc.poll() is not None and not self.reader.is_alive():
                break
            time.sleep(0.5)
        raise AssertionError(f"{pattern!r} x{count} not seen; output:\n{self.log[-4000:]}")

    def finish(self, timeout: float = RUN_TIMEOUT) -> int:
        try:
            rc = self.proc.wait(timeout=max(1.0, timeout - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            self.proc.kill()  # the flwr CLI we started; the daemons go in the fixture's down
            self.proc.wait()
            raise AssertionError(f"flwr run timed out; output:\n{self.log[-4000:]}") from None
        self.reader.join(timeout=10)
        return rc


def _results(out: Path, name: str, log: str) -> dict:
    path = out / name / "results.json"
    assert path.is_file(), f"no {path}; run output:\n{log[-4000:]}"
    return json.loads(path.read_text())


def test_tls_auth_deployment_runs_two_rounds(deployment, tmp_path):
    state = _ensure_nodes_online(deployment)
    layout = local.Layout(Path(deployment))
    # TLS on the SuperLink, CA-verified CLI connection, registered keys on both nodes.
    assert state["mode"] == "tls-auth"
    link_log = Path(state["processes"]["superlink"]["log"]).read_text()
    assert f"running on https://127.0.0.1:{state['port']}" in link_log
    cli_config = (layout.cli_home / "config.toml").read_text()
    assert "root-certificates" in cli_config and "insecure" not in cli_config
    node_ids = set()
    for i in range(NODES):
        argv = state["processes"][f"supernode-{i}"]["argv"]
        assert "--insecure" not in argv and "--auth-supernode-private-key" in argv
        found = re.findall(
            r"SuperNode ID: (\d+)", Path(state["processes"][f"supernode-{i}"]["log"]).read_text()
        )
        node_ids.add(int(found[-1]))
    assert node_ids == set(state["registered"].values())

    out = tmp_path / "out"
    run = _Run(
        deployment,
        f'num-server-rounds=2 eval-every=2 {SMALL} output-dir="{out}" run-name="tls-auth"',
    )
    rc = run.finish()
    results = _results(out, "tls-auth", run.log)
    assert rc == 0, run.log[-4000:]
    trained = [r for r in results["rounds"] if r["round"]]
    assert [r["round"] for r in trained] == [1, 2]
    for entry in trained:
        assert entry["clients"] == NODES and not entry["rejected"], entry
        assert set(entry["uplink_bytes"]["per_client"]) == {"0", "1"}  # both partitions
    assert "accuracy" in trained[-1]
    assert results["final"]["rounds"] == 2
    assert "[fedzo] round 2/2" in run.log


def test_a_failed_run_exits_non_zero_and_says_why(deployment, tmp_path):
    state = _ensure_nodes_online(deployment)
    layout = local.Layout(Path(deployment))
    # A setting only the ServerApp can judge (the checkpoint path is on its side): it raises,
    # the SuperLink records finished:failed, and `run` says so and why.
    out = tmp_path / "out"
    missing = (tmp_path / "no-such-checkpoint.pt").resolve()
    run = _Run(
        deployment,
        f"num-server-rounds=1 {SMALL} resume-from='{missing}' "
        f'output-dir="{out}" run-name="failed"',
    )
    rc = run.finish()
    assert rc != 0, run.log[-4000:]  # flwr run --stream alone exits 0 here
    assert rc == local.EXIT_FAILED, run.log[-4000:]
    details = f"ServerApp failed with exception: resume-from: no checkpoint at {missing}"
    verdicts = [line for line in run.log.splitlines() if "finished:" in line]
    assert verdicts[-1].endswith(f"finished:failed: {details}"), run.log[-4000:]
    errors = run.log[run.log.index("[deploy] the ServerApp's errors (flwr log):") :]
    assert f"[fedzo] cannot resume: resume-from: no checkpoint at {missing}" in errors
    # The verdict is the SuperLink's own record of the run.
    run_id = re.findall(r"\[deploy\] run (\d+) submitted", run.log)[0]
    listed = local.flwr_cli(layout, "ls", local.CONNECTION, "--run-id", run_id, "--format", "json")
    (record,) = json.loads(listed.stdout)["runs"]
    assert (record["status"], record["status-details"]) == ("finished:failed", details)

    # A key the app does not declare, past the launcher's own check: the SuperLink's refusal
    # reaches the CLI as "[code: 15]" only; `run` adds the reason from the SuperLink's log.
    with pytest.raises(local.DeployError) as err:
        local.submit_run(layout, state, local.ROOT, "densty=0.2")
    assert str(err.value) == (
        "the SuperLink refused the run: [code: 15] Invalid run configuration.; the SuperLink's "
        "log says: Key 'densty' is not present in the main dictionary"
    )


def test_unregistered_supernode_is_refused(deployment, tmp_path):
    state = _ensure_nodes_online(deployment)
    key = local.make_key(tmp_path / "stranger")  # a valid key pair nobody registered
    record = local.start_supernode(
        deployment, 0, name="unregistered", key=key, port=local.free_port()
    )
    try:
        rc = local.wait_exit(record, timeout=120)
    finally:
        local.stop_process(deployment, "unregistered")  # no-op if it exited
    # flwr_exit logs the Flower exit code (305: cannot connect) and exits with OS status 1.
    assert rc is not None and rc != 0, "the unregistered SuperNode kept running"
    assert local.flower_exit_code(record) == 305, local.log_tail(record["log"])
    link_log = Path(state["processes"]["superlink"]["log"]).read_text()
    assert "No SuperNode found with the given public key" in link_log
    nodes = local.list_supernodes(local.Layout(Path(deployment)))
    assert len(nodes) == NODES and all(n["status"] == "online" for n in nodes), nodes


def test_supernode_killed_mid_round_does_not_crash_the_server(deployment, tmp_path):
    _ensure_nodes_online(deployment)
    out = tmp_path / "out"
    run = _Run(
        deployment,
        f"num-server-rounds=3 eval-every=3 min-clients=1 {SMALL} "
        f'output-dir="{out}" run-name="node-killed"',
    )
    try:
        run.wait_for(r"configure_train: 2 nodes", count=2)  # round 2 sent to both nodes
        time.sleep(2)
        local.stop_process(deployment, "supernode-1", kill=True)  # a crash, no goodbye
        killed_at = time.monotonic() - run.started
    finally:
        rc = run.finish()
    results = _results(out, "node-killed", run.log)
    assert rc == 0, run.log[-4000:]
    rounds = {r["round"]: r for r in results["rounds"]}
    assert set(rounds) == {0, 1, 2, 3}
    assert rounds[1]["clients"] == NODES
    # Round 2: the SuperLink answers for the dead node with a NODE_UNAVAILABLE error reply once
    # its heartbeat lapses (2 x 30 s); the round goes on with the survivor (min-clients=1).
    assert rounds[2]["clients"] == 1 and not rounds[2].get("skipped"), rounds[2]
    assert any("Node Unavailable" in r["reason"] for r in rounds[2]["rejected"]), rounds[2]
    # Round 3 samples only the node still online.
    assert rounds[3]["clients"] == 1 and not rounds[3]["rejected"], rounds[3]
    assert results["final"]["rounds"] == 3 and "accuracy" in rounds[3]
    unavailable_at = run.wait_for(r"Node Unavailable", timeout=1)
    print(f"node killed at {killed_at:.0f}s; error reply at {unavailable_at:.0f}s")
    assert not local.is_running(local.load_state(deployment)["processes"]["supernode-1"])
