"""Reliability through the real ServerApp, strategy and ClientApp: bad replies, failures, resume."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from inprocess_grid import InProcessGrid, app_config, server_context, superlink_error

from client_app.client_app import app as client_app
from fedzo_flwr import protocol
from fedzo_flwr.config import RunConfig
from fedzo_flwr.errors import CheckpointError
from fedzo_flwr.protocol.wire import encode_scalars
from fedzo_flwr.run import checkpoint
from fedzo_flwr.run.checkpoint import load_checkpoint, save_checkpoint
from server_app.server_app import RunSetupError
from server_app.server_app import app as server_app

BASE = {
    "k": 12,
    "prune-iterations": 2,
    "prune-repeats": 1,
    "eval-every": 2,
    # One lr-schedule horizon for every run here, so runs of 2, 4 and 6 rounds of the default
    # (cosine) schedule are the same trajectory and resume one another.
    "lr-schedule-rounds": 8,
}
TIMING_KEYS = {"client_seconds", "client_peak_mem_bytes", "client_extra_mem_bytes", "round_seconds"}


def run(
    tmp_path,
    data_dir,
    name,
    num_nodes=3,
    intercept=None,
    node_config=None,
    message_ids=False,
    **overrides,
):
    config = app_config(
        **{
            "data-dir": str(data_dir),
            "output-dir": str(tmp_path),
            "run-name": name,
            "num-server-rounds": 2,
            **BASE,
            **overrides,
        }
    )
    grid = InProcessGrid(client_app, num_nodes, config, intercept, message_ids)
    for index, extra in (node_config or {}).items():
        grid.contexts[grid.node_ids[index]].node_config.update(extra)
    server_app(grid, server_context(config))
    run_dir = tmp_path / name
    return grid, json.loads((run_dir / "results.json").read_text()), run_dir


def replace_zo(message: Message, reply: Message, **changes) -> Message:
    """A copy of the reply to ``message`` with some ``zo`` record values replaced."""
    zo = dict(reply.content.config_records[protocol.ZO_KEY])
    zo.update(changes)
    metrics = reply.content.metric_records[protocol.METRICS_KEY]
    return Message(
        RecordDict({protocol.ZO_KEY: ConfigRecord(zo), protocol.METRICS_KEY: metrics}),
        reply_to=message,
    )


def deltas_of(reply: Message) -> np.ndarray:
    raw = reply.content.config_records[protocol.ZO_KEY][protocol.DELTAS_KEY]
    return np.frombuffer(raw, dtype="<f4").copy()


def sent_weights(grid: InProcessGrid, server_round: int) -> np.ndarray:
    for m in grid.sent:
        if m.content.config_records["config"]["server-round"] == server_round:
            return m.content.array_records["arrays"]["kept"].numpy()
    raise AssertionError(f"no message for round {server_round}")


def metrics_only(results: dict) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in results["rounds"]]


# ----------------------------------------------------------------------- bad replies


def test_every_kind_of_bad_reply_is_rejected_and_the_round_goes_on(tmp_path, data_dir):
    def misbehave(node, message, reply):
        server_round = message.content.config_records["config"]["server-round"]
        zo_changes = {
            (1, 1): {protocol.DELTAS_KEY: encode_scalars(np.full(12, np.nan))},
            (1, 2): {protocol.DELTAS_KEY: encode_scalars(np.zeros(7))},
            (1, 3): {protocol.DELTAS_KEY: encode_scalars(np.full(12, 1e6))},
            (2, 1): {protocol.ROUND_KEY: 7},
            (2, 2): {protocol.STEP_SEEDS_KEY: [123]},
        }.get((node, server_round))
        if zo_changes is not None:
            return replace_zo(message, reply, **zo_changes)
        if (node, server_round) == (2, 3):  # metrics record missing required keys
            zo = reply.content.config_records[protocol.ZO_KEY]
            content = {protocol.ZO_KEY: zo, protocol.METRICS_KEY: MetricRecord({"num-examples": 5})}
            return Message(RecordDict(content), reply_to=message)
        return reply

    _, results, _ = run(
        tmp_path, data_dir, "bad", num_nodes=4, intercept=misbehave, **{"num-server-rounds": 3}
    )
    rounds = {r["round"]: r for r in results["rounds"] if r["round"]}
    reasons = {r: [x["reason"] for x in rounds[r]["rejected"]] for r in rounds}
    assert "NaN" in reasons[1][0] and "round 7" in reasons[1][1]
    assert "shape (12,)" in reasons[2][0] or "12" in reasons[2][0]
    assert "step seeds" in reasons[2][1]
    assert "exceeds the bound" in reasons[3][0] and "lacks metric" in reasons[3][1]
    assert all(rounds[r]["clients"] == 2 and not rounds[r].get("skipped") for r in rounds)
    assert results["final"]["rejected_replies"] == 6


def test_too_few_valid_replies_skip_the_round_and_keep_the_model(tmp_path, data_dir):
    def nan_in_round_2(node, message, reply):
        if node == 0 and message.content.config_records["config"]["server-round"] == 2:
            return replace_zo(
                message, reply, **{protocol.DELTAS_KEY: encode_scalars(np.full(12, np.inf))}
            )
        return reply

    grid, results, _ = run(
        tmp_path,
        data_dir,
        "skip",
        intercept=nan_in_round_2,
        **{"num-server-rounds": 3, "min-clients": 3},
    )
    rounds = {r["round"]: r for r in results["rounds"]}
    assert rounds[2]["skipped"] is True and rounds[2]["clients"] == 2
    assert not np.array_equal(sent_weights(grid, 1), sent_weights(grid, 2))  # round 1 stepped
    assert np.array_equal(sent_weights(grid, 2), sent_weights(grid, 3))  # round 2 did not


def test_client_exception_and_vanished_node_are_tolerated(tmp_path, data_dir):
    def vanish(node, message, reply):
        return (
            None
            if node == 2 and message.content.config_records["config"]["server-round"] == 2
            else reply
        )

    # Node 1 crashes inside the real ClientApp on every round (its data folder does not exist).
    _, results, _ = run(
        tmp_path,
        data_dir,
        "crash",
        intercept=vanish,
        node_config={1: {"data-dir": str(tmp_path / "missing")}},
    )
    rounds = {r["round"]: r for r in results["rounds"] if r["round"]}
    assert rounds[1]["clients"] == 2 and rounds[2]["clients"] == 1
    assert "FileNotFoundError" in rounds[1]["rejected"][0]["reason"]
    assert "missing" in rounds[1]["rejected"][0]["reason"]
    assert results["final"]["accuracy"] is not None


@pytest.mark.parametrize("method", ["zo-pruned", "fedavg"])
def test_superlink_error_replies_name_the_node_they_answer(tmp_path, data_dir, method):
    # The SuperLink answers for an unreachable node with its own id (0) as the sender.
    def unreachable(node, message, reply):
        if node == 1 and message.metadata.message_type == "train":
            return superlink_error(message, "node unavailable")
        return reply

    grid, results, _ = run(
        tmp_path,
        data_dir,
        "superlink",
        intercept=unreachable,
        message_ids=True,
        method=method,
        **{"local-batches": 1},
    )
    rounds = {r["round"]: r for r in results["rounds"] if r["round"]}
    for entry in rounds.values():
        assert entry["rejected"] == [
            {"node_id": grid.node_ids[1], "reason": "client error: node unavailable"}
        ]


def test_pruning_phase_failures_name_the_node_they_answer(tmp_path, data_dir):
    def unreachable(node, message, reply):
        if node == 1 and message.metadata.message_type == "query.prune":
            return superlink_error(message, "node unavailable")
        return reply

    grid, results, _ = run(
        tmp_path,
        data_dir,
        "prune-fail",
        intercept=unreachable,
        message_ids=True,
        **{"num-server-rounds": 1, "prune-method": "snip", "prune-samples": 16},
    )
    phase = results["setup"]["pruning_phase"]
    assert phase["failures"] == [
        {"iteration": 1, "node_id": grid.node_ids[1], "reason": "client error: node unavailable"}
    ]
    assert phase["per_iteration"][0]["clients"] == 2


# ------------------------------------------------------- generator agreement, memory budget


def test_node_whose_generator_disagrees_is_refused(tmp_path, data_dir):
    def other_cpu(node, message, reply):
        if node == 1 and protocol.FINGERPRINT_KEY in reply.content.config_records[protocol.ZO_KEY]:
            return replace_zo(message, reply, **{protocol.FINGERPRINT_KEY: "0" * 64})
        return reply

    grid, results, _ = run(
        tmp_path, data_dir, "fp", intercept=other_cpu, **{"num-server-rounds": 3}
    )
    rounds = {r["round"]: r for r in results["rounds"] if r["round"]}
    assert "direction generator disagrees" in rounds[1]["rejected"][0]["reason"]
    assert "rademacher" in rounds[1]["rejected"][0]["reason"]
    assert [rounds[r]["clients"] for r in (1, 2, 3)] == [2, 2, 2]
    refused = grid.node_ids[1]
    later = [m for m in grid.sent if m.content.config_records["config"]["server-round"] > 1]
    assert later and all(m.metadata.dst_node_id != refused for m in later)
    # The honest nodes proved agreement with the server's own fingerprint.
    first = [m for m in grid.sent if m.content.config_records["config"]["server-round"] == 1]
    assert all(protocol.FINGERPRINT_SEED_KEY in m.content.config_records["config"] for m in first)


def test_node_with_too_small_memory_budget_is_skipped(tmp_path, data_dir):
    grid, results, _ = run(
        tmp_path,
        data_dir,
        "budget",
        node_config={2: {"memory-budget-mb": 1}},
        **{"num-server-rounds": 3},
    )
    rounds = {r["round"]: r for r in results["rounds"] if r["round"]}
    small = grid.node_ids[2]
    assert rounds[1]["clients"] == 3  # its budget is learned from its first reply
    assert rounds[2]["clients"] == rounds[3]["clients"] == 2
    assert rounds[3]["skipped_for_memory"] == [small]
    assert not [
        m
        for m in grid.sent
        if m.metadata.dst_node_id == small
        and m.content.config_records["config"]["server-round"] > 1
    ]


# ------------------------------------------------------------------- robust aggregation


@pytest.mark.parametrize("seed_mode", ["shared"])
def test_robust_aggregation_resists_one_adversarial_client_of_ten(tmp_path, data_dir, seed_mode):
    rng = np.random.default_rng(0)
    garbage = rng.uniform(-5, 5, size=12)  # within max-abs-delta: passes validation

    def adversary(node, message, reply):
        return (
            replace_zo(message, reply, **{protocol.DELTAS_KEY: encode_scalars(garbage)})
            if node == 3
            else reply
        )

    deviation = {}
    for method in ("mean", "trimmed-mean", "median"):
        settings = {
            "aggregation": method,
            "num-server-rounds": 1,
            "optimizer": "sgd",
            "lr": 0.1,
            "seed-mode": seed_mode,
            "partitioner": "iid",
            "eval-every": 1,
        }
        run(tmp_path, data_dir, f"honest-{method}", num_nodes=10, **settings)
        run(tmp_path, data_dir, f"attacked-{method}", num_nodes=10, intercept=adversary, **settings)
        h = torch.load(tmp_path / f"honest-{method}" / "model.pt", weights_only=True)
        a = torch.load(tmp_path / f"attacked-{method}" / "model.pt", weights_only=True)
        deviation[method] = float(
            sum(
                torch.linalg.vector_norm(a["model_state"][k] - h["model_state"][k]) ** 2
                for k in h["model_state"]
            )
            ** 0.5
        )
    assert deviation["mean"] > 5 * deviation["trimmed-mean"]
    assert deviation["mean"] > 5 * deviation["median"]


# ------------------------------------------------------------- checkpoint and resume


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("full")
    _, results, run_dir = run(
        tmp, data_dir, "full", **{"num-server-rounds": 4, "checkpoint-every": 2, "ema": 0.5}
    )
    return results, run_dir


def test_same_seed_gives_identical_results(tmp_path, data_dir, uninterrupted):
    results, run_dir = uninterrupted
    _, again, again_dir = run(
        tmp_path, data_dir, "again", **{"num-server-rounds": 4, "checkpoint-every": 2, "ema": 0.5}
    )
    assert metrics_only(again) == metrics_only(results)
    a = torch.load(run_dir / "model.pt", weights_only=True)["model_state"]
    b = torch.load(again_dir / "model.pt", weights_only=True)["model_state"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, data_dir, uninterrupted):
    results, run_dir = uninterrupted
    # A run stopped after round 2 (its checkpoint is all that survives)...
    _, _, stopped = run(
        tmp_path, data_dir, "stopped", **{"num-server-rounds": 2, "checkpoint-every": 2, "ema": 0.5}
    )
    # ...resumed to round 4.
    _, resumed, resumed_dir = run(
        tmp_path,
        data_dir,
        "resumed",
        **{
            "num-server-rounds": 4,
            "checkpoint-every": 2,
            "ema": 0.5,
            "resume-from": str(stopped / "checkpoint.pt"),
        },
    )
    assert resumed["resumed_from"]["round"] == 2
    full = {r["round"]: r for r in metrics_only(results)}
    again = {r["round"]: r for r in metrics_only(resumed)}
    for r in (3, 4):
        for key in ("train_loss", "grad_norm", "clients"):
            assert again[r][key] == full[r][key], (r, key)
    assert again[4]["accuracy"] == full[4]["accuracy"] and again[4]["loss"] == full[4]["loss"]
    a = torch.load(run_dir / "model.pt", weights_only=True)
    b = torch.load(resumed_dir / "model.pt", weights_only=True)
    assert all(torch.equal(a["model_state"][k], b["model_state"][k]) for k in a["model_state"])
    assert torch.equal(a["optimizer"]["theta"], b["optimizer"]["theta"])


def test_resume_mid_warmup_with_the_recipe_knobs_is_bit_identical(tmp_path, data_dir):
    """Warm-up, cosine, Adam betas, weight decay and per-client clipping survive a checkpoint."""
    knobs = {
        "checkpoint-every": 2,
        "warmup-rounds": 3,
        "lr-schedule": "cosine",
        "lr-schedule-rounds": 6,
        "adam-beta1": 0.8,
        "adam-beta2": 0.95,
        "weight-decay": 5e-4,
        "clip": 0.05,
        "clip-scope": "client",
    }
    _, full, full_dir = run(tmp_path, data_dir, "full", **{"num-server-rounds": 4, **knobs})
    _, _, stopped = run(tmp_path, data_dir, "stopped", **{"num-server-rounds": 2, **knobs})
    _, resumed, resumed_dir = run(
        tmp_path,
        data_dir,
        "resumed",
        **{"num-server-rounds": 4, "resume-from": str(stopped / "checkpoint.pt"), **knobs},
    )
    assert resumed["resumed_from"]["round"] == 2
    first = {r["round"]: r for r in metrics_only(full)}
    again = {r["round"]: r for r in metrics_only(resumed)}
    for r in (3, 4):  # the resumed node's first message carries the mask: bytes differ
        for key in ("train_loss", "grad_norm", "clients"):  # every trained round has them
            assert key in first[r] and again[r][key] == first[r][key], (r, key)
        for key in ("accuracy", "loss"):  # evaluated rounds only: the same rounds in both
            assert again[r].get(key) == first[r].get(key), (r, key)
    assert again[4]["accuracy"] == first[4]["accuracy"]
    a = torch.load(full_dir / "model.pt", weights_only=True)
    b = torch.load(resumed_dir / "model.pt", weights_only=True)
    assert torch.equal(a["optimizer"]["theta"], b["optimizer"]["theta"])
    assert a["optimizer"]["steps"] == b["optimizer"]["steps"] == 4
    # A resume with another warm-up is refused by name.
    with pytest.raises(RunSetupError, match=r"different settings .*warmup-rounds"):
        run(
            tmp_path,
            data_dir,
            "other",
            **{
                "num-server-rounds": 4,
                "resume-from": str(stopped / "checkpoint.pt"),
                **knobs,
                "warmup-rounds": 5,
            },
        )


def test_bad_checkpoints_are_refused(tmp_path, data_dir, uninterrupted):
    _, run_dir = uninterrupted
    good = run_dir / "checkpoint.pt"  # taken after round 4
    state = load_checkpoint(good)
    assert state["round"] == 4
    common = {"num-server-rounds": 6, "ema": 0.5, "checkpoint-every": 2}

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:1000])
    altered = tmp_path / "altered.pt"
    payload = bytearray(good.read_bytes())
    payload[-100] ^= 0xFF  # a byte of the tensors
    altered.write_bytes(bytes(payload))
    other_mask = tmp_path / "other_mask.pt"
    mask = {k: v.clone() for k, v in state["mask"].items()}
    flat = mask["fc1.weight"].view(-1)
    flat[0] = ~flat[0]
    save_checkpoint(
        other_mask,
        RunConfig.from_run_config(state["config"]),
        4,
        mask,
        state["server"],
        state["results"],
    )
    cases = [
        (truncated, {}, "not a readable checkpoint"),
        (altered, {}, "corrupt"),
        (other_mask, {}, "mask .* differs"),
        (good, {"model": "lenet-gn"}, "different settings .*model: checkpoint 'lenet5'"),
        (good, {"density": 0.2}, "different settings .*density"),
        (tmp_path / "absent.pt", {}, "no checkpoint at"),
    ]
    for path, overrides, needle in cases:
        config = app_config(
            **{
                "data-dir": str(data_dir),
                "output-dir": str(tmp_path),
                **BASE,
                **common,
                "resume-from": str(path),
                **overrides,
            }
        )
        grid = InProcessGrid(client_app, 2, config)
        with pytest.raises(RunSetupError, match=needle):
            server_app(grid, server_context(config))
        assert grid.sent == []  # refused before anything was sent: never half-loaded


# ------------------------------------------------------------------ per-device data files


def test_partition_file_is_used_and_a_mismatched_one_refused(tmp_path, data_dir):
    import subprocess
    import sys

    from inprocess_grid import ROOT

    out = tmp_path / "parts"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "split_partitions.py"),
            "-n",
            "3",
            "-o",
            str(out),
            "--run-config",
            f'data-dir="{data_dir}"',
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    files = sorted(out.glob("partition-*.npz"))
    assert len(files) == 3
    # Every node trains from its own file, with no dataset folder at all ...
    nodes = {
        i: {"partition-file": str(files[i]), "data-dir": str(tmp_path / "none")} for i in range(3)
    }
    _, results, _ = run(tmp_path, data_dir, "files", node_config=nodes)
    assert all(r["clients"] == 3 for r in results["rounds"] if r["round"])
    # ... and a node given another device's file is refused with the reason.
    nodes[1]["partition-file"] = str(files[2])
    _, results, _ = run(tmp_path, data_dir, "swapped", node_config=nodes)
    reason = results["rounds"][1]["rejected"][0]["reason"]
    assert "partition-id: file 2 vs run 1" in reason


class _Exploit:
    """Unpickling this runs a shell command: what a crafted checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_checkpoints_are_refused_without_running_code(tmp_path):
    """Neither a code-carrying tensor part nor an old-style pickle envelope is ever unpickled."""
    marker = tmp_path / "pwned"
    exploit = _Exploit(marker)
    # 1. A well-formed header whose (correctly hashed) tensor part carries an object.
    buffer = io.BytesIO()
    torch.save({"mask": {}, "server": exploit}, buffer)
    tensors = buffer.getvalue()
    header = json.dumps(
        {
            "format": checkpoint.FORMAT,
            "version": checkpoint.CHECKPOINT_VERSION,
            "round": 1,
            "config": {},
            "results": {},
            "tensors_sha256": hashlib.sha256(tensors).hexdigest(),
            "tensors_bytes": len(tensors),
        }
    ).encode()
    crafted = tmp_path / "crafted.pt"
    crafted.write_bytes(checkpoint.MAGIC + len(header).to_bytes(8, "little") + header + tensors)
    with pytest.raises(CheckpointError, match="other than tensors"):
        load_checkpoint(crafted)
    # 2. The version-1 format: a pickle envelope (now refused by its magic bytes, unread).
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps({"format": "fedzo-flwr-checkpoint", "payload": exploit}))
    with pytest.raises(CheckpointError, match="not a fedzo-flwr checkpoint of version 2"):
        load_checkpoint(legacy)
    assert not marker.exists()
    # The exploit is real: unpickling it does run the command.
    pickle.loads(pickle.dumps(exploit))
    assert marker.exists()
