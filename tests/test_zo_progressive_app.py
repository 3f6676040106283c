"""Zeroth-order progressive training through the real apps (InProcessGrid): zo-progressive.

The server's weights are checked round by round against an independent reconstruction from the
seeds and scalars the clients sent (plain float64 arithmetic: directions regenerated from the
seeds, the example-weighted mean of the loss differences, SGD with momentum restarted at every
stage change); frozen blocks must never move; forged and ill-shaped replies must be counted
rejections; a node's budget must cover the stage's forward-only need.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord
from inprocess_grid import InProcessGrid, app_config, run_server_logged

from client_app.client_app import app as client_app
from client_app.progressive import FROZEN_ID_STATE_KEY, FROZEN_STATE_KEY
from fedzo_flwr.aggregation import client_weights
from fedzo_flwr.config import RunConfig
from fedzo_flwr.errors import ConfigError
from fedzo_flwr.measure.memory_model import zo_breakdown
from fedzo_flwr.progressive import build_staged, device_budget
from fedzo_flwr.progressive.memory import forward_stage_memory, full_backprop_memory
from fedzo_flwr.protocol.wire import encode_scalars
from fedzo_flwr.run.setup import initial_model
from fedzo_flwr.seeding import model_seed
from fedzo_flwr.zo.directions import DirectionGenerator

K, SIGMA, LR, MOMENTUM = 8, 1e-3, 0.05, 0.9
SETTINGS = {
    "method": "zo-progressive",
    "num-server-rounds": 5,
    "eval-every": 5,
    "k": K,
    "sigma": SIGMA,
    "optimizer": "momentum",
    "lr": LR,
    "momentum": MOMENTUM,
    "pace": "fixed",
    "stage-rounds": "2",
    "prune-iterations": 2,
    "prune-repeats": 1,
    "checkpoint-every": 0,
}
# LeNet-5, stage split: block t's tensors.
BLOCKS = {0: ["conv1.weight", "conv1.bias"], 1: ["conv2.weight", "conv2.bias"]}


def run(tmp_path, data_dir, name, num_nodes=4, intercept=None, intercept_for=None, **overrides):
    """One run; ``intercept_for(grid)`` may build an interceptor that needs the grid."""
    config = app_config(
        **{
            "data-dir": str(data_dir),
            "output-dir": str(tmp_path),
            "run-name": name,
            **SETTINGS,
            **overrides,
        }
    )
    grid = InProcessGrid(client_app, num_nodes, config, intercept=intercept, message_ids=True)
    if intercept_for is not None:
        grid.intercept = intercept_for(grid)
    lines = run_server_logged(grid, config)
    results = json.loads((tmp_path / name / "results.json").read_text())
    return grid, results, lines, config


def train_messages(grid):
    return [m for m in grid.sent if m.metadata.message_type == "train"]


def cfg_of(message):
    return message.content.config_records["config"]


def tampered(reply, **changes):
    """A copy of a zeroth-order reply with fields of its ``zo`` record replaced."""
    zo = reply.content.config_records["zo"]
    reply.content.config_records["zo"] = ConfigRecord({**dict(zo), **changes})
    return reply


class Reconstruction:
    """The server's update rule rebuilt from the replies alone (float64, no library server)."""

    def __init__(self, staged, mask) -> None:
        self.staged = staged
        self.mask = mask
        self.stage = -1

    def layout(self, stage):
        params = self.staged.stage_parameters(stage)
        out = []
        for name, p in params.items():
            flat = p.detach().reshape(-1)
            idx = (
                torch.nonzero(self.mask[name].reshape(-1)).reshape(-1)
                if name in self.mask
                else None
            )
            out.append((name, p, idx if idx is not None else torch.arange(flat.numel())))
        return out

    def kept(self, stage):
        parts = [p.detach().reshape(-1)[idx] for _, p, idx in self.layout(stage)]
        return torch.cat(parts).to(torch.float64)

    def step(self, stage, replies):
        """One round: ``replies`` = [(num_examples, seed, deltas)] of the valid replies."""
        if stage != self.stage:  # a fresh optimizer over the new stage's space
            self.stage, self.buffer = stage, None
        layout = self.layout(stage)
        sizes = [int(idx.numel()) for _, _, idx in layout]
        weights = client_weights([n for n, _, _ in replies], "examples", 0.5)
        seeds = {seed for _, seed, _ in replies}
        assert len(seeds) == 1  # seed-mode shared: one seed per round
        mean = sum(w * d.astype(np.float64) for w, (_, _, d) in zip(weights, replies)) / sum(
            weights
        )
        generator = DirectionGenerator(sizes, seeds.pop(), "gaussian")
        grad = sum(
            (mean[j] / (SIGMA * K)) * generator.direction(j).to(torch.float64) for j in range(K)
        )
        self.buffer = grad if self.buffer is None else MOMENTUM * self.buffer + grad
        theta = self.kept(stage) - LR * self.buffer
        with torch.no_grad():
            for (_, p, idx), part in zip(layout, torch.split(theta, sizes)):
                p.view(-1)[idx] = part.to(torch.float32)
        return theta


def test_weights_equal_an_independent_reconstruction_frozen_blocks_never_move(tmp_path, data_dir):
    """Five rounds, stages 0, 0, 1, 1, 2 (pace fixed, 2 rounds a stage), 4 nodes.

    Round 3 (first of stage 1): node 3 reports a forged generator fingerprint (refused for
    good). Round 4: node 0 sends K - 1 scalars (ill-shaped), node 1 claims stage 0 (forged).
    Each is a counted rejection, and the reconstruction uses only the remaining replies.
    """
    replies: dict[int, list[tuple[int, object]]] = {}

    def intercept(node_index, message, reply):
        if message.metadata.message_type != "train":
            return reply
        rnd = cfg_of(message)["server-round"]
        if rnd == 3 and node_index == 3:
            reply = tampered(reply, fingerprint="0" * 16)
        if rnd == 4 and node_index == 0:
            zo = reply.content.config_records["zo"]
            short = np.frombuffer(bytes(zo["deltas"]), dtype="<f4")[: K - 1]
            reply = tampered(reply, deltas=encode_scalars(short))
        if rnd == 4 and node_index == 1:
            reply = tampered(reply, stage=0)
        replies.setdefault(rnd, []).append((node_index, reply))
        return reply

    grid, results, lines, config = run(tmp_path, data_dir, "exact", intercept=intercept)
    rounds = {r["round"]: r for r in results["rounds"]}
    assert [rounds[r]["stage"] for r in range(1, 6)] == [0, 0, 1, 1, 2]
    changes = results["final"]["stage_changes"]
    assert [(c["round"], c["to"]["stage"], c["reason"]) for c in changes] == [
        (2, 1, "schedule"),
        (4, 2, "schedule"),
    ]
    assert "[fedzo] Round 2: stage change zo 0 -> 1 (schedule)" in lines
    # Counted rejections, with their reasons; the refused node is never asked again.
    assert [r["clients"] for r in (rounds[n] for n in range(1, 6))] == [4, 4, 3, 1, 3]
    assert [x["node_id"] for x in rounds[3]["rejected"]] == [grid.node_ids[3]]
    assert "direction generator disagrees" in rounds[3]["rejected"][0]["reason"]
    reasons = {x["node_id"]: x["reason"] for x in rounds[4]["rejected"]}
    assert set(reasons) == {grid.node_ids[0], grid.node_ids[1]}
    assert "deltas" in reasons[grid.node_ids[0]]
    assert "reply is for stage 0, this round trains stage 1" in reasons[grid.node_ids[1]]
    assert results["final"]["rejected_replies"] == 3
    assert all(m.metadata.dst_node_id != grid.node_ids[3] for m in train_messages(grid)[-6:])

    # The model's mask is zo-pruned's (the same data-free NTK-SAP call on the same θ0).
    saved = torch.load(tmp_path / "exact" / "model.pt", weights_only=True)
    mask = saved["mask"]
    cfg = RunConfig.from_run_config(config)
    for name, m in initial_model(cfg).mask.items():
        assert torch.equal(mask[name], m), name
    staged = build_staged("lenet5", 10, seed=model_seed(cfg.seed))
    with torch.no_grad():
        for p, n in [(p, n) for n, p in staged.model.named_parameters()]:
            if n in mask:
                p.mul_(mask[n])
        for t, module in enumerate(staged.output_modules):
            for n, p in module.named_parameters():
                if f"output.{t}.{n}" in mask:
                    p.mul_(mask[f"output.{t}.{n}"])
    rebuilt = Reconstruction(staged, mask)
    gap = 0.0  # largest |server - reconstruction| seen (printed: the measured tolerance)
    sent = {}  # round -> {node: message}
    for message in train_messages(grid):
        sent.setdefault(cfg_of(message)["server-round"], {})[message.metadata.dst_node_id] = message
    for rnd in range(1, 6):
        stage = rounds[rnd]["stage"]
        # What every node received this round is the reconstruction so far, exactly in float32.
        kept = rebuilt.kept(stage).to(torch.float32)
        for message in sent[rnd].values():
            received = message.content.array_records["arrays"]["kept"].numpy()
            np.testing.assert_allclose(received, kept.numpy(), rtol=0, atol=1e-7)
            gap = max(gap, float(np.abs(received - kept.numpy()).max()))
        valid = []
        for node_index, reply in replies[rnd]:
            rejected = {x["node_id"] for x in rounds[rnd]["rejected"]}
            if grid.node_ids[node_index] in rejected:
                continue
            zo = reply.content.config_records["zo"]
            metrics = reply.content.metric_records["metrics"]
            deltas = np.frombuffer(bytes(zo["deltas"]), dtype="<f4")
            valid.append((int(metrics["num-examples"]), int(zo["step-seeds"][0]), deltas))
        rebuilt.step(stage, valid)
    # model.pt after round 5: every tensor of the staged model equals the reconstruction.
    final = saved["model_state"]
    for name, p in staged.model.named_parameters():
        np.testing.assert_allclose(final[name].numpy(), p.detach().numpy(), rtol=0, atol=1e-7)
        gap = max(gap, float(np.abs(final[name].numpy() - p.detach().numpy()).max()))
    print(f"largest gap between the server and the reconstruction: {gap:.3g}")
    assert rebuilt.kept(1).abs().max() > 1e-2  # real weights, not a vacuous comparison
    for name, p in staged.output_modules.named_parameters():
        value = saved["output_modules"][name].numpy()
        np.testing.assert_allclose(value, p.detach().numpy(), rtol=0, atol=1e-7)
    for name, m in mask.items():  # pruned entries stay zero
        tensor = (
            saved["output_modules"][name.removeprefix("output.")]
            if name.startswith("output.")
            else final[name]
        )
        assert torch.count_nonzero(tensor[~m]) == 0, name

    # Frozen blocks never move: block 0 travels in rounds 3 and 5 (stages 1 and 2), block 1 in
    # round 5, bit-identical to each other and to model.pt; stage 0 sends none.
    carried = {
        (rnd, node): m.content.array_records["frozen"]
        for rnd, by_node in sent.items()
        for node, m in by_node.items()
        if "frozen" in m.content.array_records
    }
    assert sorted({rnd for rnd, _ in carried}) == [3, 5]
    assert all(list(rec.keys()) == BLOCKS[0] for (rnd, _), rec in carried.items() if rnd == 3)
    assert all(
        list(rec.keys()) == BLOCKS[0] + BLOCKS[1] for (rnd, _), rec in carried.items() if rnd == 5
    )
    for record in carried.values():
        for name in record.keys():
            assert np.array_equal(record[name].numpy(), final[name].numpy()), name
    # A node's frozen set travels once per stage; the mask once per node; the fingerprint seed
    # with a node's first message of each stage.
    for rnd, by_node in sent.items():
        for node, message in by_node.items():
            first = rnd == 1
            assert ("mask" in cfg_of(message)) == first
            assert ("fingerprint-seed" in cfg_of(message)) == (rnd in (1, 3, 5)), (rnd, node)
            assert cfg_of(message)["stage"] == rounds[rnd]["stage"]
    # Client cost per round: the stage's FLOPs (prefix once + K+1 active passes) and the scalars.
    setup = results["setup"]["zo_progressive"]
    assert setup["stage_dims"] == [rebuilt.kept(t).numel() for t in range(3)]
    for rnd in range(1, 6):
        flops = setup["client_round_forward_flops"][rounds[rnd]["stage"]]
        assert set(rounds[rnd]["forward_flops"]["per_client"].values()) == {flops}
    assert setup["client_round_forward_flops"][2] < setup["zo_pruned_client_round_forward_flops"]


def test_a_node_below_a_stages_forward_only_need_is_never_selected(tmp_path, data_dir):
    grid, results, _, config = run(
        tmp_path,
        data_dir,
        "budgets",
        num_nodes=8,
        **{"memory-profile": "profl-uniform", "num-server-rounds": 3, "k": 4},
    )
    cfg = RunConfig.from_run_config(config)
    staged = build_staged("lenet5", 10, seed=model_seed(cfg.seed))
    mask = torch.load(tmp_path / "budgets" / "model.pt", weights_only=True)["mask"]
    needs = [forward_stage_memory(staged, t, 32, mask).total_bytes for t in range(3)]
    assert results["setup"]["zo_progressive"]["stage_need_bytes"] == needs
    full = full_backprop_memory(staged.model, 32).total_bytes
    budget = {
        node: device_budget("profl-uniform", pid, full).budget_bytes
        for pid, node in enumerate(grid.node_ids)
    }
    fits = {t: {n for n in grid.node_ids if budget[n] >= needs[t]} for t in range(3)}
    assert 0 < len(fits[0]) < len(grid.node_ids)  # the population separates
    rounds = {r["round"]: r for r in results["rounds"]}
    for message in train_messages(grid):
        stage = cfg_of(message)["stage"]
        assert message.metadata.dst_node_id in fits[stage]
    for rnd in (1, 2, 3):
        stage = rounds[rnd]["stage"]
        assert rounds[rnd]["eligible"] == len(fits[stage]) == rounds[rnd]["clients"]
        assert set(rounds[rnd]["ineligible"]) == set(grid.node_ids) - fits[stage]
        assert rounds[rnd]["stage_need_bytes"] == needs[stage]
    # Every stage needs less than a zo-pruned client step (lean engine, the same forward-only
    # accounting) on the same θ0 and mask; on LeNet-5 only a little (the input batch and the
    # first block's activations dominate both).
    init = initial_model(cfg)
    whole = zo_breakdown(init.model, init.mask, torch.zeros(32, 3, 32, 32)).total_bytes
    assert all(need < whole for need in needs) and max(needs) > 0.9 * whole


@pytest.mark.parametrize(
    ("overrides", "keys"),
    [
        ({"downlink": "replay"}, "keys 'downlink' and 'method'"),
        ({"prune-method": "synflow"}, "keys 'prune-method' and 'method'"),
        ({"resume-from": "/tmp/x.pt"}, "keys 'resume-from' and 'method'"),
        ({"fraction-evaluate": 0.5}, "keys 'method' and 'fraction-evaluate'"),
    ],
)
def test_unsupported_combinations_are_refused_naming_the_keys(overrides, keys):
    RunConfig.from_run_config({"method": "zo-progressive"})  # the method itself is valid
    with pytest.raises(ConfigError, match=keys):
        RunConfig.from_run_config({"method": "zo-progressive", **overrides})


def test_a_node_that_lost_its_frozen_tensors_says_so_and_gets_them_again(tmp_path, data_dir):
    """Six rounds, stages 0, 0, 0, 1, 1, 1: node 0 loses its cached frozen block after round 4."""

    def intercept_for(grid):
        def intercept(node_index, message, reply):
            if message.metadata.message_type == "train" and node_index == 0:
                if cfg_of(message)["server-round"] == 4:  # a restarted node: its cache is gone
                    state = grid.contexts[grid.node_ids[0]].state
                    del state.array_records[FROZEN_STATE_KEY]
                    del state.config_records[FROZEN_ID_STATE_KEY]
            return reply

        return intercept

    grid, results, _, _ = run(
        tmp_path,
        data_dir,
        "lost",
        intercept_for=intercept_for,
        **{"num-server-rounds": 6, "stage-rounds": "3", "k": 4},
    )
    rounds = {r["round"]: r for r in results["rounds"]}
    assert [rounds[r]["stage"] for r in range(1, 7)] == [0, 0, 0, 1, 1, 1]
    node = grid.node_ids[0]
    [lost] = rounds[5]["rejected"]
    assert lost["node_id"] == node and lost["reason"].startswith("mask-missing: no frozen tensors")
    assert rounds[6]["clients"] == 4 and rounds[6]["rejected"] == []
    to_node = {
        cfg_of(m)["server-round"]: m for m in train_messages(grid) if m.metadata.dst_node_id == node
    }
    carries = {rnd: "frozen" in m.content.array_records for rnd, m in to_node.items()}
    assert carries == {1: False, 2: False, 3: False, 4: True, 5: False, 6: True}
    assert "mask" in cfg_of(to_node[6]) and "mask" not in cfg_of(to_node[5])
