"""Zeroth-order core: directions, estimator, reconstruction, replay and server optimizer.

The estimator is checked against autograd on real CIFAR-10 batches.
"""

from __future__ import annotations

import math
import platform

import numpy as np
import pytest
import torch
from torch.nn.functional import cosine_similarity

from fedzo_flwr.models import build_model
from fedzo_flwr.protocol.keys import PROTOCOL_VERSION
from fedzo_flwr.seeding import derive_seed, direction_block_seed
from fedzo_flwr.sparse.mask import apply_mask_, global_topk_mask, prunable_parameters
from fedzo_flwr.sparse.space import KeptSpace
from fedzo_flwr.zo.directions import DirectionGenerator, fingerprint
from fedzo_flwr.zo.estimator import batch_loss, loss_differences
from fedzo_flwr.zo.local import run_local_steps
from fedzo_flwr.zo.reconstruct import (
    ScalarStep,
    accumulate_steps,
    aggregate_deltas,
    estimate_gradient,
    replay,
)
from fedzo_flwr.zo.server_optimizer import OptimizerSettings, ServerOptimizer, clip_
from fedzo_flwr.zo.settings import ZOSettings


@pytest.fixture(scope="module")
def cifar(data_dir):
    from fedzo_flwr.data import load_dataset, to_tensor

    data = load_dataset("cifar10", data_dir)

    def batch(start: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = to_tensor(data.x_train[start : start + size], "cifar10")
        return x, torch.tensor(data.y_train[start : start + size], dtype=torch.long)

    return batch


def random_mask(model, density, seed=0):
    gen = torch.Generator().manual_seed(seed)
    scores = {n: torch.rand(p.shape, generator=gen) for n, p in prunable_parameters(model)}
    return global_topk_mask(scores, density)


def masked_model(name, density, seed=1):
    model = build_model(name, seed=seed)
    mask = random_mask(model, density) if density < 1 else None
    if mask is not None:
        apply_mask_(model, mask)
    return model, KeptSpace(model, mask), mask


def autograd_gradient(model, space, x, y) -> torch.Tensor:
    """True gradient of the batch loss restricted to the space's coordinates."""
    model.zero_grad()
    batch_loss(model(x), y).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    parts = []
    for name, idx in zip(space.names, space.indices):
        flat = grads[name].reshape(-1)
        parts.append(flat if idx is None else flat[idx])
    model.zero_grad()
    return torch.cat(parts).detach()


# ----------------------------------------------------------------------------- directions

GOLDEN_SEED = 2703010214697296228  # BLAKE2b-64 of b"3407/int:1", shifted right by one bit


def test_derive_seed_is_stable_and_distinct():
    # Golden value: BLAKE2b of the text "3407/int:1" is the same on every platform.
    assert derive_seed(3407, 1) == derive_seed(3407, 1) == GOLDEN_SEED
    assert len({derive_seed(3407, r) for r in range(1000)}) == 1000
    assert derive_seed(1, 2) != derive_seed(2, 1)
    assert 0 <= derive_seed(-5, 2**70) < 2**63


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_directions_regenerate_identically(kind):
    layout = [3000, 7, 0, 1993]
    a = DirectionGenerator(layout, 11, kind)
    b = DirectionGenerator(layout, 11, kind)
    # Any order, any subset: direction k depends on (seed, k) only.
    assert torch.equal(a.direction(7), b.block(0, 10)[7])
    assert not torch.equal(a.direction(0), a.direction(1))
    assert not torch.equal(a.direction(0), DirectionGenerator(layout, 12, kind).direction(0))
    block = a.block(3, 9)
    assert block.shape == (6, 5000)
    assert torch.equal(block[2], b.direction(5))
    # Direction k is the concatenation of per-tensor blocks, each drawable alone.
    for t, (start, size) in enumerate(zip(a.offsets, a.sizes)):
        assert torch.equal(b.tensor_block(7, t), a.direction(7)[start : start + size])
    # ... from its own generator, seeded (seed, k, tensor): not a slice of one long stream.
    whole = DirectionGenerator([5000], 11, kind).direction(7)
    assert not torch.equal(a.direction(7)[3007:], whole[3007:])


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_direction_block_is_its_own_seeded_stream(kind):
    # Block t of direction k = the block a one-tensor layout draws from seed (seed, k, t).
    gen = DirectionGenerator([40, 70], 21, kind)
    block_seed = direction_block_seed(21, 5, 1)
    if kind == "gaussian":
        expected = torch.randn(70, generator=torch.Generator().manual_seed(block_seed))
    else:
        words = np.random.Philox(key=block_seed).random_raw(2)
        bits = np.unpackbits(words.astype("<u8").view(np.uint8), bitorder="little")[:70]
        expected = torch.from_numpy(1.0 - 2.0 * bits.astype(np.float32))
    assert torch.equal(gen.tensor_block(5, 1), expected)
    assert block_seed == derive_seed(21, 5, 1)


def test_direction_layout_is_checked():
    with pytest.raises(TypeError, match="sizes must be a sequence"):
        DirectionGenerator(100, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-negative ints"):
        DirectionGenerator([10, -1], 1)
    with pytest.raises(ValueError, match="at least one coordinate"):
        DirectionGenerator([0, 0], 1)


def test_direction_statistics():
    g = DirectionGenerator([150_000, 50_000], 5, "gaussian").direction(0)
    assert abs(float(g.mean())) < 0.01 and abs(float(g.std()) - 1) < 0.01
    r = DirectionGenerator([200_001], 5, "rademacher").direction(0)
    assert set(r.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(r.mean())) < 0.01


def test_rademacher_fingerprint_is_golden_everywhere():
    # Integer-exact generator: this hash must hold on every platform (x86, ARM, any numpy>=1.17).
    # Protocol version 2 (per-tensor blocks); a three-tensor layout with an empty tensor.
    assert (
        fingerprint([600, 0, 400], 42, "rademacher")
        == "a63ad0ca2b5f7e84ea9f5da70775e8a52a3309f189a9de1de29e1b93a78aebd4"
    )
    assert (
        fingerprint(1000, 42, "rademacher")
        == "d65f323cc260359b9ddef38077d1b037d41b6ee72d88fbb5a78ec0a9ae1b72a4"
    )


@pytest.mark.skipif(platform.machine() != "x86_64", reason="Gaussian golden hash is x86-64's")
def test_gaussian_fingerprint_is_golden_on_x86_64():
    assert (
        fingerprint(1000, 42, "gaussian")
        == "772d62d0a8d5aebdc7ae65bc7afae1aa8fdbadcdc54310b5dfe116ab7e474ef2"
    )


def test_fingerprint_depends_on_every_argument():
    base = fingerprint(100, 1, "gaussian")
    assert base == fingerprint(100, 1, "gaussian")
    assert base != fingerprint(101, 1, "gaussian")
    assert base != fingerprint(100, 2, "gaussian")
    assert base != fingerprint(100, 1, "rademacher")
    assert base == fingerprint([100], 1, "gaussian")  # an int is the one-tensor layout
    assert base != fingerprint([60, 40], 1, "gaussian")  # the layout is covered


def test_fingerprint_covers_the_protocol_version(monkeypatch):
    from fedzo_flwr.zo import directions

    base = fingerprint([60, 40], 1, "rademacher")
    monkeypatch.setattr(directions, "PROTOCOL_VERSION", PROTOCOL_VERSION + 1)
    assert fingerprint([60, 40], 1, "rademacher") != base


# ------------------------------------------------------------------------------ estimator


@pytest.mark.parametrize("engine", ["lean", "fused", "stream"])
def test_loss_difference_is_autograd_directional_derivative(cifar, engine):
    # lenet-gn is smooth apart from max-pool; forward differences at σ=1e-4 match ∇L·u closely.
    x, y = cifar(0, 32)
    model, space, _ = masked_model("lenet-gn", 1.0)
    settings = ZOSettings(k=64, sigma=1e-4)
    result = loss_differences(model, space, x, y, seed=3, settings=settings, engine=engine)
    grad = autograd_gradient(model, space, x, y)
    gen = DirectionGenerator(space.sizes, 3)
    exact = np.array([float(grad @ gen.direction(k)) for k in range(64)])
    estimate = result.deltas / settings.sigma
    assert np.linalg.norm(estimate - exact) / np.linalg.norm(exact) < 1e-2
    with torch.no_grad():
        reference = float(batch_loss(model(x), y))
    assert result.base_loss == pytest.approx(reference, abs=1e-6)
    assert result.forward_passes == 65


@pytest.mark.parametrize("engine", ["lean", "stream"])
def test_central_difference_is_more_accurate_than_forward(cifar, engine):
    x, y = cifar(32, 32)
    model, space, _ = masked_model("lenet5", 1.0)
    grad = autograd_gradient(model, space, x, y)
    gen = DirectionGenerator(space.sizes, 4)
    exact = np.array([float(grad @ gen.direction(k)) for k in range(48)])
    errors = {}
    for scheme in ("forward", "central"):
        settings = ZOSettings(k=48, sigma=1e-3, scheme=scheme)
        result = loss_differences(model, space, x, y, 4, settings, engine=engine)
        estimate = result.deltas / settings.difference_scale
        errors[scheme] = np.linalg.norm(estimate - exact) / np.linalg.norm(exact)
    assert errors["central"] < errors["forward"] < 0.5


def single_estimate_cosine(model, space, x, y, k, seed, engine="lean"):
    settings = ZOSettings(k=k, sigma=1e-4)
    deltas = loss_differences(model, space, x, y, seed, settings, engine=engine).deltas
    g_hat = estimate_gradient(space.sizes, ScalarStep(seed, deltas), settings)
    return float(cosine_similarity(g_hat, autograd_gradient(model, space, x, y), dim=0))


@pytest.mark.parametrize("engine", ["lean", "stream"])
def test_cosine_follows_sqrt_k_over_k_plus_n_and_pruning_helps(cifar, engine):
    """The paper's core claim, on lenet5 with a real CIFAR-10 batch.

    For Gaussian directions cos(ĝ, ∇L) ≈ sqrt(K / (K + n + 1)) with n the perturbed (kept)
    coordinates, so at equal K the pruned model's estimate is much closer to its true gradient.
    """
    x, y = cifar(64, 16)
    k = 400
    measured, predicted = {}, {}
    for density in (1.0, 0.05):
        model, space, _ = masked_model("lenet5", density)
        cosines = [
            single_estimate_cosine(model, space, x, y, k, seed, engine) for seed in (1, 2, 3)
        ]
        measured[density] = float(np.mean(cosines))
        predicted[density] = math.sqrt(k / (k + space.dim + 1))
    assert predicted[1.0] == pytest.approx(0.0801, abs=1e-3)  # n = 62,006
    assert predicted[0.05] == pytest.approx(0.3276, abs=1e-3)  # n = 3,089 kept + 236 biases
    for density in measured:
        assert measured[density] == pytest.approx(predicted[density], rel=0.2)
    assert measured[0.05] > 3 * measured[1.0]


def test_estimate_converges_to_autograd_gradient(cifar):
    x, y = cifar(128, 8)
    model, space, _ = masked_model("lenet5", 0.01)  # n = 618 kept + 236 biases = 854
    assert space.dim == 854
    settings = ZOSettings(k=4000, sigma=1e-4)
    deltas = loss_differences(model, space, x, y, 9, settings).deltas
    grad = autograd_gradient(model, space, x, y)
    cosines = []
    for k in (250, 1000, 4000):
        sub = ZOSettings(k=k, sigma=1e-4)
        g_hat = estimate_gradient(space.sizes, ScalarStep(9, deltas[:k]), sub)
        cosines.append(float(cosine_similarity(g_hat, grad, dim=0)))
        assert cosines[-1] == pytest.approx(math.sqrt(k / (k + 855)), rel=0.1)
    assert cosines[0] < cosines[1] < cosines[2]
    assert cosines[2] > 0.85


@pytest.mark.parametrize("engine", ["lean", "batched", "stream"])
@pytest.mark.parametrize("scheme", ["forward", "central"])
def test_weights_bit_identical_after_perturbations(cifar, engine, scheme):
    x, y = cifar(0, 16)
    model, space, mask = masked_model("lenet-gn", 0.2)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    settings = ZOSettings(k=37, sigma=1e-2, scheme=scheme)
    loss_differences(model, space, x, y, 5, settings, engine=engine, chunk_size=8)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    for name, m in mask.items():
        assert torch.count_nonzero(model.get_parameter(name)[~m]) == 0


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
@pytest.mark.parametrize("scheme", ["forward", "central"])
def test_batched_engine_matches_lean(cifar, kind, scheme):
    x, y = cifar(16, 16)
    model, space, _ = masked_model("lenet5", 0.3)
    settings = ZOSettings(k=20, sigma=1e-3, scheme=scheme, directions=kind)
    lean = loss_differences(model, space, x, y, 8, settings, engine="lean")
    batched = loss_differences(model, space, x, y, 8, settings, engine="batched", chunk_size=6)
    np.testing.assert_allclose(batched.deltas, lean.deltas, rtol=1e-4, atol=2e-6)
    assert np.abs(lean.deltas).max() > 1e-4  # real signal, not all zeros


# ------------------------------------------------------------------------ reconstruction


def test_server_reconstruction_equals_client_estimate_exactly(cifar):
    x, y = cifar(200, 32)
    client_model, client_space, mask = masked_model("lenet5", 0.1, seed=4)
    settings = ZOSettings(k=50, sigma=1e-4)
    deltas = loss_differences(client_model, client_space, x, y, 77, settings).deltas
    client_estimate = estimate_gradient(client_space.sizes, ScalarStep(77, deltas), settings)
    # The server owns its own model instance; only the seed and the float32 scalars travel.
    server_model = build_model("lenet5", seed=4)
    server_space = KeptSpace(server_model, mask)
    wire = np.frombuffer(deltas.astype("<f4").tobytes(), dtype="<f4")
    server_estimate = estimate_gradient(server_space.sizes, ScalarStep(77, wire), settings)
    assert torch.equal(client_estimate, server_estimate)
    # Restricted to the mask: it expands to exact zeros at pruned entries.
    for name, dense in server_space.expand(server_estimate).items():
        if name in mask:
            assert torch.count_nonzero(dense[~mask[name]]) == 0


def test_shared_seed_scalars_aggregate_before_one_reconstruction(cifar):
    model, space, _ = masked_model("lenet5", 0.1)
    settings = ZOSettings(k=30, sigma=1e-4)
    deltas, sizes = [], [32, 16, 8]
    for c, size in enumerate(sizes):
        x, y = cifar(300 + 40 * c, size)
        deltas.append(loss_differences(model, space, x, y, 13, settings).deltas)
    combined = aggregate_deltas(deltas, sizes, k=30)
    once = estimate_gradient(space.sizes, ScalarStep(13, combined), settings)
    weights = np.array(sizes) / sum(sizes)
    separately = sum(
        w * estimate_gradient(space.sizes, ScalarStep(13, d), settings)
        for w, d in zip(weights, deltas)
    )
    torch.testing.assert_close(once, separately, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(combined, weights @ np.stack(deltas), rtol=1e-12)


def test_local_steps_replay_exactly_on_the_server(cifar):
    model, space, mask = masked_model("lenet5", 0.1, seed=2)
    theta0 = space.gather(model)
    settings = ZOSettings(k=20, sigma=1e-4)
    seeds = [derive_seed(5, j) for j in range(4)]
    steps, results = run_local_steps(
        model, space, lambda j: cifar(400 + 16 * j, 16), seeds, settings, local_lr=0.05
    )
    assert [s.seed for s in steps] == seeds and len(results) == 4
    # The client's weights when it took its last step = the server's replay of the first three.
    server_theta = replay(theta0.clone(), space.sizes, steps[:-1], settings, lr=0.05)
    assert torch.equal(server_theta, space.gather(model))
    assert not torch.equal(server_theta, theta0)
    # And the server can recompute that last step's scalars from the replayed weights.
    check_model = build_model("lenet5", seed=2)
    apply_mask_(check_model, mask)
    space.scatter_(check_model, server_theta)
    again = loss_differences(check_model, space, *cifar(400 + 48, 16), seeds[3], settings)
    np.testing.assert_array_equal(again.deltas, steps[3].deltas)
    total = accumulate_steps(space.sizes, steps, settings)
    assert total.shape == (space.dim,) and torch.isfinite(total).all()


def test_aggregate_deltas_validates_input():
    with pytest.raises(ValueError, match="deltas\\[1\\]"):
        aggregate_deltas([np.zeros(3), np.zeros(4)], [1, 1], k=3)
    with pytest.raises(ValueError, match="finite"):
        aggregate_deltas([np.array([0.0, np.nan, 1.0])], [1], k=3)
    with pytest.raises(ValueError, match="weights"):
        aggregate_deltas([np.zeros(3)], [-1], k=3)
    with pytest.raises(ValueError, match="weights"):
        aggregate_deltas([np.zeros(3)], [1, 2], k=3)


def test_estimate_gradient_rejects_wrong_scalar_count():
    with pytest.raises(ValueError, match="shape \\(5,\\)"):
        estimate_gradient([10], ScalarStep(1, np.zeros(4)), ZOSettings(k=5, sigma=1e-3))


# ---------------------------------------------------------------------- server optimizer


def test_sgd_step_is_exact_and_pruned_weights_stay_zero():
    model, space, mask = masked_model("lenet5", 0.1)
    theta = space.gather(model)
    grad = torch.randn(space.dim, generator=torch.Generator().manual_seed(0))
    opt = ServerOptimizer(theta, OptimizerSettings(name="sgd", lr=0.5))
    opt.step(grad)
    assert torch.equal(opt.weights, theta - 0.5 * grad)
    for _ in range(3):
        opt.step(grad)
    space.scatter_(model, opt.weights)
    for name, m in mask.items():
        weight = model.get_parameter(name)
        assert torch.count_nonzero(weight[~m]) == 0
        assert torch.count_nonzero(weight[m]) == int(m.sum())


def test_adam_matches_torch_adam_on_dense_masked_tensor():
    gen = torch.Generator().manual_seed(1)
    dense = torch.randn(50, generator=gen)
    keep = torch.rand(50, generator=gen) < 0.3
    dense[~keep] = 0
    reference = torch.nn.Parameter(dense.clone())
    ref_opt = torch.optim.Adam([reference], lr=0.01, betas=(0.9, 0.99))
    ours = ServerOptimizer(dense[keep], OptimizerSettings(name="adam", lr=0.01))
    for _ in range(5):
        g = torch.randn(50, generator=gen)
        reference.grad = g * keep
        ref_opt.step()
        ours.step(g[keep])
    torch.testing.assert_close(ours.weights, reference.detach()[keep])
    assert torch.count_nonzero(reference.detach()[~keep]) == 0


def test_clipping_and_ema():
    g = torch.tensor([3.0, -4.0])
    assert torch.equal(clip_(g.clone(), 2.0, "inf"), torch.tensor([1.5, -2.0]))
    assert torch.allclose(clip_(g.clone(), 1.0, "l2"), torch.tensor([0.6, -0.8]))
    assert torch.equal(clip_(g.clone(), 10.0, "inf"), g)
    opt = ServerOptimizer(torch.zeros(2), OptimizerSettings(name="sgd", lr=1.0, ema_decay=0.9))
    opt.step(torch.tensor([-1.0, -2.0]))
    assert torch.allclose(opt.eval_weights, torch.tensor([0.1, 0.2]))
    clipped = ServerOptimizer(torch.zeros(2), OptimizerSettings(name="sgd", lr=1.0, clip=1.0))
    clipped.step(torch.tensor([-4.0, 2.0]))
    assert torch.equal(clipped.weights, torch.tensor([1.0, -0.5]))


def test_optimizer_state_round_trip():
    settings = OptimizerSettings(name="adam", lr=0.1, ema_decay=0.5)
    a = ServerOptimizer(torch.ones(4), settings)
    a.step(torch.tensor([1.0, -1.0, 2.0, 0.5]))
    b = ServerOptimizer(torch.zeros(4), settings)
    b.load_state_dict(a.state_dict())
    g = torch.tensor([0.3, 0.1, -0.2, 1.0])
    a.step(g)
    b.step(g)
    assert torch.equal(a.weights, b.weights) and torch.equal(a.eval_weights, b.eval_weights)
    with pytest.raises(ValueError, match="kept coordinates"):
        ServerOptimizer(torch.zeros(3), settings).load_state_dict(a.state_dict())


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"k": 0, "sigma": 1e-3}, ValueError, "k must be >= 1"),
        ({"k": 2.5, "sigma": 1e-3}, TypeError, "k must be an int"),
        ({"k": 4, "sigma": 0.0}, ValueError, "sigma"),
        ({"k": 4, "sigma": -1e-3}, ValueError, "sigma"),
        ({"k": 4, "sigma": "1e-3"}, TypeError, "sigma"),
        ({"k": 4, "sigma": 1e-3, "scheme": "backward"}, ValueError, "scheme"),
        ({"k": 4, "sigma": 1e-3, "directions": "uniform"}, ValueError, "directions"),
    ],
)
def test_settings_reject_bad_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        ZOSettings(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "rmsprop"}, "optimizer"),
        ({"lr": 0.0}, "lr"),
        ({"clip": -1.0}, "clip"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"clip_norm": "l1"}, "clip_norm"),
    ],
)
def test_optimizer_settings_reject_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OptimizerSettings(**kwargs)


def test_estimator_rejects_bad_engine_and_batch():
    model, space, _ = masked_model("lenet5", 1.0)
    x, y = torch.zeros(2, 3, 32, 32), torch.zeros(2, dtype=torch.long)
    settings = ZOSettings(k=2, sigma=1e-3)
    with pytest.raises(ValueError, match="engine"):
        loss_differences(model, space, x, y, 0, settings, engine="fast")
    with pytest.raises(ValueError, match="same non-zero number"):
        loss_differences(model, space, x, y[:1], 0, settings)
    with pytest.raises(ValueError, match="mask shape mismatch"):
        bad = {n: torch.ones(3, dtype=torch.bool) for n, _ in prunable_parameters(model)}
        KeptSpace(model, bad)
