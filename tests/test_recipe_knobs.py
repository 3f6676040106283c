"""The server-recipe knobs against hand-computed references: Adam betas, the warm-up and cosine
learning-rate schedule, per-client clipping, and their config keys and checkpoint state."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedzo_flwr.config import RunConfig
from fedzo_flwr.errors import ConfigError
from fedzo_flwr.models import build_model
from fedzo_flwr.pruning import prune
from fedzo_flwr.seeding import client_step_seeds
from fedzo_flwr.sparse.mask import apply_mask_
from fedzo_flwr.zo.reconstruct import (
    ScalarStep,
    accumulate_steps,
    gradient_from_coefficients,
    gradients_from_coefficients,
)
from fedzo_flwr.zo.replay import SeedGroup, round_gradient
from fedzo_flwr.zo.server import ClientUpdate, ZOServer
from fedzo_flwr.zo.server_optimizer import OptimizerSettings, ServerOptimizer
from fedzo_flwr.zo.settings import ZOSettings, optimizer_settings

# ------------------------------------------------------------------- learning-rate schedule


def test_linear_warmup_lr_sequence_is_exact():
    settings = OptimizerSettings(lr=0.01, warmup_rounds=4)
    assert [settings.lr_at(t) for t in range(1, 8)] == pytest.approx(
        [0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01, 0.01], rel=1e-15, abs=0
    )
    assert OptimizerSettings(lr=0.01).lr_at(1) == 0.01  # no warm-up: the lr itself, exactly


def test_cosine_schedule_after_warmup_matches_the_formula():
    settings = OptimizerSettings(lr=0.02, warmup_rounds=2, lr_schedule="cosine", total_steps=6)
    # Steps 3..6 start 0/4, 1/4, 2/4 and 3/4 of the way through the decay (CosineAnnealingLR).
    decay = [0.02 * (1 + math.cos(math.pi * p)) / 2 for p in (0.0, 0.25, 0.5, 0.75)]
    got = [settings.lr_at(t) for t in range(1, 7)]
    assert got == pytest.approx([0.01, 0.02, *decay], rel=1e-15, abs=0)
    assert got[2] == 0.02  # the first step after the warm-up: the full lr
    assert got[4] == pytest.approx(0.01, rel=1e-15)  # half way: half the lr
    assert got[5] > 0  # the last round still learns
    assert settings.lr_at(7) == pytest.approx(0.0, abs=1e-18)  # past the horizon: 0
    assert settings.lr_at(9) == pytest.approx(0.0, abs=1e-18)


def test_cosine_schedule_equals_torch_cosine_annealing_lr():
    """Without a warm-up the sequence is ``CosineAnnealingLR(T_max=total_steps)``'s."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.03)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=9)
    settings = OptimizerSettings(lr=0.03, lr_schedule="cosine", total_steps=9)
    for t in range(1, 10):
        assert settings.lr_at(t) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15)
        opt.step()
        sched.step()


def test_sgd_steps_follow_the_warmup_sequence():
    """θ_t = θ_{t-1} - lr_t g with lr_t from the warm-up: the optimizer uses the schedule."""
    g = torch.tensor([1.0, -2.0, 0.5])
    opt = ServerOptimizer(torch.zeros(3), OptimizerSettings(name="sgd", lr=0.4, warmup_rounds=4))
    expected = torch.zeros(3)
    for t in range(1, 7):
        opt.step(g)
        expected = expected - (0.4 * min(t, 4) / 4) * g
        torch.testing.assert_close(opt.weights, expected, rtol=0, atol=1e-7)


def test_adam_with_betas_warmup_and_cosine_matches_torch_adam():
    gen = torch.Generator().manual_seed(7)
    theta = torch.randn(40, generator=gen)
    settings = OptimizerSettings(
        name="adam",
        lr=0.05,
        betas=(0.8, 0.95),
        weight_decay=5e-4,
        warmup_rounds=3,
        lr_schedule="cosine",
        total_steps=10,
    )
    reference = torch.nn.Parameter(theta.clone())
    ref_opt = torch.optim.Adam([reference], lr=0.05, betas=(0.8, 0.95), weight_decay=5e-4)
    ours = ServerOptimizer(theta, settings)
    for t in range(1, 11):
        lr = 0.05 * t / 3 if t <= 3 else 0.05 * (1 + math.cos(math.pi * (t - 4) / 7)) / 2
        for group in ref_opt.param_groups:
            group["lr"] = lr
        g = torch.randn(40, generator=gen)
        reference.grad = g.clone()
        ref_opt.step()
        ours.step(g)
        torch.testing.assert_close(ours.weights, reference.detach(), rtol=1e-6, atol=1e-7)


def test_adam_beta2_changes_the_step():
    """β2 reaches the optimizer: 0.99 and 0.999 give different second steps."""
    g1, g2 = torch.tensor([1.0, 0.1]), torch.tensor([0.1, 1.0])
    runs = []
    for beta2 in (0.99, 0.999):
        opt = ServerOptimizer(torch.zeros(2), OptimizerSettings(betas=(0.9, beta2)))
        opt.step(g1)
        opt.step(g2)
        runs.append(opt.weights.clone())
    assert not torch.equal(runs[0], runs[1])


def test_a_resumed_optimizer_continues_the_schedule():
    settings = OptimizerSettings(
        name="adam", lr=0.1, warmup_rounds=5, lr_schedule="cosine", total_steps=12
    )
    a = ServerOptimizer(torch.ones(4), settings)
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(4, generator=gen) for _ in range(9)]
    for g in grads[:3]:  # stopped in the middle of the warm-up
        a.step(g)
    b = ServerOptimizer(torch.zeros(4), settings)
    b.load_state_dict(a.state_dict())
    for g in grads[3:]:
        a.step(g)
        b.step(g)
        assert torch.equal(a.weights, b.weights)
    assert b.steps == 9 and b.optimizer.param_groups[0]["lr"] == settings.lr_at(9)


# --------------------------------------------------------------------------- clipping


def test_round_clip_scope_clips_in_the_optimizer_and_client_scope_does_not():
    g = torch.tensor([-4.0, 2.0])
    round_ = ServerOptimizer(torch.zeros(2), OptimizerSettings(name="sgd", lr=1.0, clip=1.0))
    round_.step(g)
    assert torch.equal(round_.weights, torch.tensor([1.0, -0.5]))
    client = ServerOptimizer(
        torch.zeros(2), OptimizerSettings(name="sgd", lr=1.0, clip=1.0, clip_scope="client")
    )
    client.step(g)
    assert torch.equal(client.weights, torch.tensor([4.0, -2.0]))
    assert client.settings.group_clip == 1.0 and client.settings.round_clip == 0.0


def test_batched_reconstruction_matches_one_row_at_a_time():
    sizes = [30, 7, 100]
    rng = np.random.default_rng(0)
    rows = rng.normal(0, 1, (5, 12)).astype(np.float32)
    together = gradients_from_coefficients(sizes, 99, rows, "gaussian", block_bytes=4 * 137 * 5)
    for i, row in enumerate(rows):
        alone = gradient_from_coefficients(sizes, 99, row, "gaussian")
        torch.testing.assert_close(together[i], alone, rtol=1e-6, atol=1e-6)


def _client_groups(k: int, clients: int, steps: int) -> tuple[list[SeedGroup], list[int]]:
    rng = np.random.default_rng(3)
    sizes = [50, 13]
    shares = rng.dirichlet(np.ones(clients))
    seeds = tuple(int(s) for s in rng.integers(1, 2**62, steps))
    groups = [
        SeedGroup(
            float(share),
            seeds if c % 2 == 0 else tuple(s + c for s in seeds),  # some share seeds
            rng.normal(0, 0.5, (steps, k)).astype(np.float32),
        )
        for c, share in enumerate(shares)
    ]
    return groups, sizes


def test_per_client_clipping_against_a_hand_reference():
    settings = ZOSettings(k=6, sigma=1e-3)
    groups, sizes = _client_groups(6, clients=5, steps=2)
    clip = 0.4
    expected = torch.zeros(sum(sizes))
    clipped_any = False
    for group in groups:
        estimate = sum(
            gradient_from_coefficients(sizes, seed, row, "gaussian")
            for seed, row in zip(group.seeds, group.coefficients, strict=True)
        )
        peak = float(estimate.abs().max())
        clipped_any |= peak > clip
        expected += group.share * estimate * min(1.0, clip / peak)
    assert clipped_any
    got = round_gradient(sizes, groups, settings, clip=clip)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert float(got.abs().max()) <= clip * (1 + 1e-6)  # a mean of vectors inside the ball
    unclipped = round_gradient(sizes, groups, settings)
    assert not torch.allclose(got, unclipped)


def _server(**overrides: object) -> ZOServer:
    cfg = RunConfig(**{"k": 16, "density": 0.2, "optimizer": "sgd", "lr": 1.0, **overrides})  # type: ignore[arg-type]
    model = build_model("lenet5", 10, seed=3)
    mask = prune("random", model, "lenet5", cfg.density, seed=5)
    apply_mask_(model, mask)
    return ZOServer(cfg, model, mask)


def _updates(server: ZOServer, clients: int) -> list[ClientUpdate]:
    rng = np.random.default_rng(11)
    cfg = server.cfg
    out = []
    for pid in range(clients):
        seeds = client_step_seeds(server.round_seed(1), cfg.seed_mode, pid, cfg.local_steps)
        scale = 10.0 ** (pid - 2)  # clients of very different gradient sizes
        steps = [ScalarStep(s, rng.normal(0, 1e-3 * scale, cfg.k)) for s in seeds]
        out.append(ClientUpdate(pid, int(rng.integers(20, 200)), steps, 2.3))
    return out


def test_server_clips_every_client_before_aggregating():
    server = _server(**{"clip": 0.05, "clip-scope": "client", "max-client-share": 1.0})
    before = server.kept_values().clone()
    updates = _updates(server, clients=4)
    server.apply_round(updates, 1)
    assert server.last_update is not None and len(server.last_update.groups) == 4
    total = sum(u.num_examples for u in updates)
    expected = torch.zeros_like(before)
    for u in updates:
        g = accumulate_steps(server.space.sizes, u.steps, server.settings)
        expected += u.num_examples / total * g * min(1.0, 0.05 / float(g.abs().max()))
    torch.testing.assert_close(before - server.kept_values(), expected, rtol=1e-4, atol=1e-6)
    # Clipping the round instead is another step (the large client would dominate it).
    other = _server(**{"clip": 0.05, "clip-scope": "round", "max-client-share": 1.0})
    other.apply_round(updates, 1)
    assert not torch.allclose(other.kept_values(), server.kept_values(), atol=1e-4)


# ------------------------------------------------------------------------------ config


def test_config_keys_reach_the_optimizer_settings():
    cfg = RunConfig.from_run_config(
        {
            "adam-beta1": 0.8,
            "adam-beta2": 0.95,
            "warmup-rounds": 7,
            "lr-schedule": "cosine",
            "num-server-rounds": 40,
            "clip": 0.3,
            "clip-scope": "client",
        }
    )
    settings = optimizer_settings(cfg)
    assert settings.betas == (0.8, 0.95)
    assert (settings.warmup_rounds, settings.lr_schedule, settings.total_steps) == (7, "cosine", 40)
    assert (settings.clip, settings.clip_scope) == (0.3, "client")
    default = optimizer_settings(RunConfig())
    assert default.betas == (0.9, 0.99) and default.lr_at(1) == default.lr


@pytest.mark.parametrize(
    ("keys", "named"),
    [
        ({"adam-beta2": 1.0}, "adam-beta2"),
        ({"adam-beta1": -0.1}, "adam-beta1"),
        ({"warmup-rounds": -1}, "warmup-rounds"),
        ({"lr-schedule": "step"}, "lr-schedule"),
        ({"clip-scope": "layer"}, "clip-scope"),
        ({"clip-scope": "client", "aggregation": "median"}, "clip-scope"),
        ({"lr-schedule": "cosine", "warmup-rounds": 5000}, "warmup-rounds"),
        (
            {"lr-schedule": "cosine", "warmup-rounds": 20, "lr-schedule-rounds": 20},
            "lr-schedule-rounds",
        ),
        ({"lr-schedule-rounds": -1}, "lr-schedule-rounds"),
        # Rounds past the cosine's end would train at lr 0.
        (
            {"lr-schedule": "cosine", "num-server-rounds": 451, "lr-schedule-rounds": 450},
            "num-server-rounds=451 would train only 450 rounds",
        ),
    ],
)
def test_bad_recipe_keys_are_refused_by_name(keys, named):
    with pytest.raises(ConfigError, match=named):
        RunConfig.from_run_config(keys)


def test_cosine_makes_the_number_of_rounds_part_of_the_trajectory():
    constant = {"lr-schedule": "constant"}
    a = RunConfig.from_run_config({"num-server-rounds": 100, **constant})
    b = RunConfig.from_run_config({"num-server-rounds": 200, **constant})
    assert a.trajectory_differences(b) == []  # constant lr: more rounds resume fine
    c = RunConfig.from_run_config({"num-server-rounds": 100, "lr-schedule": "cosine"})
    d = RunConfig.from_run_config({"num-server-rounds": 200, "lr-schedule": "cosine"})
    assert c.trajectory_differences(d) == ["num-server-rounds"]


def test_lr_schedule_rounds_sets_the_cosine_horizon_apart_from_the_run_length():
    """20 rounds of a 450-round schedule take exactly the first 20 steps of the long run."""
    short = RunConfig.from_run_config(
        {"num-server-rounds": 20, "lr-schedule": "cosine", "lr-schedule-rounds": 450}
    )
    long = RunConfig.from_run_config({"num-server-rounds": 450, "lr-schedule": "cosine"})
    a, b = optimizer_settings(short), optimizer_settings(long)
    assert a.total_steps == b.total_steps == 450 and short.schedule_rounds == 450
    assert [a.lr_at(t) for t in range(1, 21)] == [b.lr_at(t) for t in range(1, 21)]
    assert a.lr_at(20) > 0.99 * a.lr  # 20 of 450 steps: still near the full lr
    # The same horizon, named either way, is the same trajectory; another one is not.
    assert short.trajectory_differences(long) == []
    other = RunConfig.from_run_config(
        {"num-server-rounds": 20, "lr-schedule": "cosine", "lr-schedule-rounds": 300}
    )
    assert short.trajectory_differences(other) == ["lr-schedule-rounds"]
    # Under a constant lr the horizon is irrelevant.
    constant = {"lr-schedule": "constant"}
    plain = RunConfig.from_run_config(constant)
    assert (
        RunConfig.from_run_config({"lr-schedule-rounds": 5, **constant}).trajectory_differences(
            plain
        )
        == []
    )
    # Nor does it matter to a method without the zeroth-order server optimizer.
    fedavg = {"method": "fedavg", "density": 1.0, "lr-schedule": "cosine"}
    four = RunConfig.from_run_config({**fedavg, "num-server-rounds": 4})
    # ... nor are its horizon checks: no warm-up is left and rounds run past the horizon.
    RunConfig.from_run_config({**fedavg, "warmup-rounds": 5000, "lr-schedule-rounds": 3})
    assert (
        four.trajectory_differences(RunConfig.from_run_config({**fedavg, "num-server-rounds": 6}))
        == []
    )
