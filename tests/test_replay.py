"""Seed replay: a client that holds the previous weights takes the server's step bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedzo_flwr.config import RunConfig
from fedzo_flwr.models import build_model
from fedzo_flwr.protocol.replay import (
    ReplayFormatError,
    decode_updates,
    encode_updates,
    encoded_nbytes,
)
from fedzo_flwr.pruning import prune
from fedzo_flwr.seeding import client_step_seeds
from fedzo_flwr.sparse.mask import apply_mask_
from fedzo_flwr.zo.reconstruct import ScalarStep, accumulate_steps, estimate_gradient
from fedzo_flwr.zo.replay import ReplayState, SeedGroup, kept_hash, round_gradient
from fedzo_flwr.zo.server import ClientUpdate, ZOServer
from fedzo_flwr.zo.settings import optimizer_settings, zo_settings


def make_server(**overrides: object) -> ZOServer:
    cfg = RunConfig(**{"k": 16, "density": 0.2, **overrides})  # type: ignore[arg-type]
    model = build_model("lenet5", 10, seed=3)
    mask = prune("random", model, "lenet5", cfg.density, seed=5)
    apply_mask_(model, mask)
    return ZOServer(cfg, model, mask)


def fake_updates(server: ZOServer, server_round: int, clients: int) -> list[ClientUpdate]:
    """Replies as clients would send them: the assigned seeds and some loss differences."""
    rng = np.random.default_rng(server_round)
    cfg = server.cfg
    updates = []
    for pid in range(clients):
        seeds = client_step_seeds(
            server.round_seed(server_round), cfg.seed_mode, pid, cfg.local_steps
        )
        steps = [ScalarStep(s, rng.normal(0, 1e-3, cfg.k).astype(np.float32)) for s in seeds]
        updates.append(ClientUpdate(pid, int(rng.integers(20, 200)), steps, 2.3))
    return updates


@pytest.mark.parametrize(
    "overrides",
    [
        {"optimizer": "sgd", "lr": 0.05},
        {"optimizer": "momentum", "lr": 0.05, "weight-decay": 5e-4},
        {"optimizer": "adam", "clip": 0.3, "ema": 0.99},
        {"optimizer": "adam", "seed-mode": "per-client", "local-steps": 2},
        {
            "optimizer": "adam",
            "adam-beta1": 0.8,
            "adam-beta2": 0.95,
            "weight-decay": 5e-4,
            "warmup-rounds": 8,
            "lr-schedule": "cosine",
            "num-server-rounds": 30,
        },
        {"optimizer": "adam", "clip": 0.05, "clip-scope": "client", "ema": 0.99},
        {
            "optimizer": "momentum",
            "clip": 0.05,
            "clip-scope": "client",
            "seed-mode": "per-client",
            "local-steps": 2,
            "warmup-rounds": 5,
        },
    ],
    ids=[
        "sgd",
        "momentum-wd",
        "adam-clip-ema",
        "adam-per-client-2-steps",
        "adam-betas-warmup-cosine",
        "adam-client-clip-ema",
        "momentum-client-clip-per-client-warmup",
    ],
)
def test_replaying_client_stays_bit_identical_over_30_rounds(overrides):
    server = make_server(**overrides)
    settings = zo_settings(server.cfg)
    client = ReplayState(
        server.kept_values().clone(), server.space.sizes, settings, optimizer_settings(server.cfg)
    )
    for server_round in range(1, 31):
        server.apply_round(fake_updates(server, server_round, clients=4), server_round)
        update = server.last_update
        assert update is not None and update.server_round == server_round
        if server.cfg.clip_scope == "client":  # every client's estimate clipped on its own
            assert len(update.groups) == 4
        assert client.apply(update), f"hash mismatch in round {server_round}"
        assert torch.equal(client.weights, server.kept_values()), server_round
    assert update.kept_hash == kept_hash(server.kept_values())


def test_server_gradient_is_the_replayed_gradient():
    """round_gradient on the recorded groups equals the estimate the server stepped with."""
    server = make_server(**{"optimizer": "sgd", "lr": 1.0, "max-client-share": 1.0})
    before = server.kept_values().clone()
    updates = fake_updates(server, 1, clients=3)
    server.apply_round(updates, 1)
    update = server.last_update
    assert update is not None and len(update.groups) == 1  # shared seeds: one group
    grad = round_gradient(server.space.sizes, update.groups, zo_settings(server.cfg))
    assert torch.equal(before - grad, server.kept_values())
    # ... and it is the example-weighted mean of the clients' own estimates (up to rounding).
    total = sum(u.num_examples for u in updates)
    expected = sum(
        u.num_examples
        / total
        * accumulate_steps(server.space.sizes, u.steps, zo_settings(server.cfg))
        for u in updates
    )
    scale = float(expected.abs().max())  # float32 sums in another order: relative to the scale
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-5 * scale)


def test_coefficients_reproduce_estimate_gradient_exactly():
    server = make_server()
    settings = zo_settings(server.cfg)
    step = fake_updates(server, 3, clients=1)[0].steps[0]
    group = SeedGroup(
        1.0,
        (step.seed,),
        (np.asarray(step.deltas, np.float64) / (settings.difference_scale * settings.k))
        .astype(np.float32)
        .reshape(1, -1),
    )
    direct = estimate_gradient(server.space.sizes, step, settings)
    assert torch.equal(round_gradient(server.space.sizes, [group], settings), direct)


def test_corrupted_client_state_is_detected_by_the_hash():
    server = make_server(**{"optimizer": "adam"})
    client = ReplayState(
        server.kept_values().clone(),
        server.space.sizes,
        zo_settings(server.cfg),
        optimizer_settings(server.cfg),
    )
    server.apply_round(fake_updates(server, 1, clients=2), 1)
    assert server.last_update is not None and client.apply(server.last_update)
    with torch.no_grad():
        client.optimizer.theta[7] += 1e-6  # one weight off by one part in a million
    server.apply_round(fake_updates(server, 2, clients=2), 2)
    assert not client.apply(server.last_update)


def test_lost_optimizer_state_is_detected():
    """A client that restarted with the right weights but a fresh Adam state diverges."""
    server = make_server(**{"optimizer": "adam"})
    for r in (1, 2):
        server.apply_round(fake_updates(server, r, clients=2), r)
    fresh = ReplayState(
        server.kept_values().clone(),
        server.space.sizes,
        zo_settings(server.cfg),
        optimizer_settings(server.cfg),
    )
    server.apply_round(fake_updates(server, 3, clients=2), 3)
    assert server.last_update is not None and not fresh.apply(server.last_update)
    # Handed the server's optimizer state with the weights, a client agrees again.
    healed = ReplayState(
        server.kept_values().clone(),
        server.space.sizes,
        zo_settings(server.cfg),
        optimizer_settings(server.cfg),
        optimizer_state=server.state_dict(),
    )
    server.apply_round(fake_updates(server, 4, clients=2), 4)
    assert server.last_update is not None and healed.apply(server.last_update)
    assert torch.equal(healed.weights, server.kept_values())


def test_replay_bytes_round_trip_and_size():
    server = make_server(**{"k": 200, "seed-mode": "per-client", "local-steps": 2})
    updates = []
    for r in (1, 2):
        server.apply_round(fake_updates(server, r, clients=2), r)
        assert server.last_update is not None
        updates.append(server.last_update)
    data = encode_updates(updates)
    assert len(data) == encoded_nbytes(updates)
    # 2 rounds x 2 groups (per-client seeds) x 2 steps of K = 200 float32 coefficients.
    assert len(data) == 3 + 2 * (14 + 2 * (10 + 2 * (8 + 4 * 200)))
    decoded = decode_updates(data, k=200, max_updates=8)
    assert [u.server_round for u in decoded] == [1, 2]
    for mine, theirs in zip(decoded, updates):
        assert mine.kept_hash == theirs.kept_hash
        for a, b in zip(mine.groups, theirs.groups):
            assert a.share == b.share and a.seeds == b.seeds
            assert np.array_equal(a.coefficients, b.coefficients)
    shared = make_server(**{"k": 200})
    shared.apply_round(fake_updates(shared, 1, clients=3), 1)
    assert shared.last_update is not None
    assert encoded_nbytes([shared.last_update]) == 4 * 200 + 35


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d[:-1],  # truncated
        lambda d: d + b"\0",  # trailing byte
        lambda d: b"\x02" + d[1:],  # unknown version
        lambda d: d[:1] + (9).to_bytes(2, "little") + d[3:],  # claims more updates than present
        lambda d: d[:-4] + np.float32("nan").tobytes(),  # non-finite coefficient
        lambda d: d[:17] + np.float64(1.5).tobytes() + d[25:],  # share > 1
    ],
    ids=["truncated", "trailing", "version", "count", "nan", "share"],
)
def test_malformed_replay_bytes_are_refused(mutate):
    server = make_server(**{"k": 8})
    server.apply_round(fake_updates(server, 1, clients=2), 1)
    assert server.last_update is not None
    data = encode_updates([server.last_update])
    decode_updates(data, k=8, max_updates=4)  # the original is fine
    with pytest.raises(ReplayFormatError):
        decode_updates(mutate(data), k=8, max_updates=4)
    with pytest.raises(ReplayFormatError):
        decode_updates("not bytes", k=8, max_updates=4)


def test_history_is_bounded_and_serves_the_missed_rounds():
    server = make_server(**{"downlink": "replay", "replay-history": 5})
    for r in range(1, 9):
        server.apply_round(fake_updates(server, r, clients=2), r)
    assert [u.server_round for u in server.history] == [4, 5, 6, 7, 8]
    # A node that trained in round 6 (it held the weights after round 5) and now, in round 9,
    # needs rounds 6..8; a node last seen in round 2 is beyond the history.
    assert [u.server_round for u in server.updates_since(5, 9) or []] == [6, 7, 8]
    assert server.updates_since(8, 9) == []
    assert server.updates_since(2, 9) is None
    # Replaying the served rounds from the weights after round 5 gives the server's weights.
    replica = make_server(**{"downlink": "replay", "replay-history": 5})
    for r in range(1, 6):
        replica.apply_round(fake_updates(replica, r, clients=2), r)
    client = ReplayState(
        replica.kept_values().clone(),
        replica.space.sizes,
        zo_settings(replica.cfg),
        optimizer_settings(replica.cfg),
        optimizer_state=replica.state_dict(),
    )
    for update in server.updates_since(5, 9) or []:
        assert client.apply(update)
    assert torch.equal(client.weights, server.kept_values())


def test_history_survives_a_checkpoint(tmp_path):
    from fedzo_flwr.run.checkpoint import load_checkpoint, save_checkpoint

    server = make_server(**{"downlink": "replay", "optimizer": "adam"})
    for r in range(1, 4):
        server.apply_round(fake_updates(server, r, clients=2), r)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, server.cfg, 3, server.mask, server.state_dict(), {"rounds": []})
    resumed = make_server(**{"downlink": "replay", "optimizer": "adam"})
    resumed.load_state_dict(load_checkpoint(path)["server"])
    assert torch.equal(resumed.kept_values(), server.kept_values())
    assert [u.server_round for u in resumed.history] == [1, 2, 3]
    for mine, theirs in zip(resumed.history, server.history):
        assert mine.kept_hash == theirs.kept_hash
        assert all(
            np.array_equal(a.coefficients, b.coefficients) and a.seeds == b.seeds
            for a, b in zip(mine.groups, theirs.groups)
        )
    # Both continue identically.
    for s in (server, resumed):
        s.apply_round(fake_updates(s, 4, clients=2), 4)
    assert torch.equal(resumed.kept_values(), server.kept_values())


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam"])
def test_state_survives_as_arrays_and_costs_1x_2x_3x_the_kept_values(name):
    server = make_server(**{"optimizer": name})
    opt = optimizer_settings(server.cfg)
    client = ReplayState(
        server.kept_values().clone(), server.space.sizes, zo_settings(server.cfg), opt
    )
    for r in (1, 2):
        server.apply_round(fake_updates(server, r, clients=2), r)
        assert server.last_update is not None and client.apply(server.last_update)
    arrays = client.arrays()
    floats = sum(a.size for a in arrays.values() if a.ndim == 1)
    assert floats == {"sgd": 1, "momentum": 2, "adam": 3}[name] * server.space.dim
    restored = ReplayState.from_arrays(
        arrays, server.space.sizes, zo_settings(server.cfg), opt, steps=2
    )
    server.apply_round(fake_updates(server, 3, clients=2), 3)
    assert server.last_update is not None and restored.apply(server.last_update)
    assert torch.equal(restored.weights, server.kept_values())
