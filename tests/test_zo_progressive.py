"""Zeroth-order progressive training (issue 17): the active stage, client step, server, FLOPs.

Checked on LeNet-5 with its data-free NTK-SAP mask (density 0.1) and real CIFAR-10 batches:
the estimate's cosine with the autograd gradient of the stage loss follows √(K/(K+n_stage+1))
and beats the full model's at equal K; the scalars are those of the plain staged forward pass
under the same perturbations; frozen blocks never move.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn.functional import cosine_similarity

from fedzo_flwr.config import RunConfig
from fedzo_flwr.measure.flops import forward_flops, zo_step_flops
from fedzo_flwr.progressive import build_staged
from fedzo_flwr.progressive.memory import forward_stage_memory
from fedzo_flwr.progressive.zo import (
    ActiveStage,
    apply_staged_mask_,
    output_masks,
    stage_loss_differences,
    stage_step_flops,
    staged_mask,
    staged_mask_template,
    train_stage_round,
)
from fedzo_flwr.progressive.zo.server import StageZOServer
from fedzo_flwr.protocol.wire import decode_mask, encode_mask
from fedzo_flwr.pruning import NTKSAPConfig, ntk_sap_mask
from fedzo_flwr.sparse.mask import kept_target, prunable_parameters
from fedzo_flwr.sparse.space import KeptSpace
from fedzo_flwr.zo.directions import DirectionGenerator
from fedzo_flwr.zo.estimator import batch_loss, loss_differences
from fedzo_flwr.zo.reconstruct import ScalarStep, estimate_gradient
from fedzo_flwr.zo.replay import ReplayState
from fedzo_flwr.zo.server import ClientUpdate
from fedzo_flwr.zo.settings import ZOSettings, optimizer_settings, zo_settings

DENSITY = 0.1
NTK = NTKSAPConfig(iterations=2, repeats=1)  # the data-free NTK-SAP step, fewer iterations


@pytest.fixture(scope="module")
def data(data_dir):
    from fedzo_flwr.data import load_dataset

    return load_dataset("cifar10", data_dir)


@pytest.fixture(scope="module")
def cifar(data):
    from fedzo_flwr.data import to_tensor

    def batch(start: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = to_tensor(data.x_train[start : start + size], "cifar10")
        return x, torch.tensor(data.y_train[start : start + size], dtype=torch.long)

    return batch


def masked_staged(name: str = "lenet5", seed: int = 1):
    """A staged model with the model's data-free NTK-SAP mask and the output modules' masks."""
    staged = build_staged(name, seed=seed)
    model_mask = ntk_sap_mask(staged.model, name, DENSITY, NTK, seed=seed)
    mask = staged_mask(staged, model_mask, name, DENSITY, NTK, seed=seed)
    apply_staged_mask_(staged, mask)
    return staged, model_mask, mask


def space_gradient(module, space, x, y) -> torch.Tensor:
    """Autograd gradient of ``batch_loss(module(x), y)`` restricted to ``space``."""
    params = dict(module.named_parameters())
    with torch.enable_grad():
        loss = batch_loss(module(x), y)
        grads = torch.autograd.grad(loss, [params[n] for n in space.names])
    parts = [
        g.reshape(-1) if idx is None else g.reshape(-1)[idx]
        for g, idx in zip(grads, space.indices, strict=True)
    ]
    return torch.cat(parts).detach()


def estimate_cosine(module, space, x, y, k, seed) -> float:
    settings = ZOSettings(k=k, sigma=1e-4)
    # fused: the same scalars as lean within float tolerance (test below), a third of the time.
    deltas = loss_differences(module, space, x, y, seed, settings, "fused").deltas
    g_hat = estimate_gradient(space.sizes, ScalarStep(seed, deltas), settings)
    return float(cosine_similarity(g_hat, space_gradient(module, space, x, y), dim=0))


# ------------------------------------------------------------------------- masks and space


def test_output_masks_are_data_free_ntk_at_the_run_density():
    staged = build_staged("lenet5", seed=1)
    masks = output_masks(staged, "lenet5", DENSITY, NTK, seed=1)
    for t, module in enumerate(staged.output_modules):
        own = {f"output.{t}.{n}": m for n, m in prunable_parameters(module)}
        assert set(own) <= set(masks)
        kept = sum(int(masks[n].sum()) for n in own)
        assert kept == kept_target(DENSITY, sum(p.numel() for p in own.values()))
        assert all(bool(masks[n].any()) for n in own)  # no output-module layer collapses
    assert {n for n in masks} == {
        f"output.{t}.{n}"
        for t, m in enumerate(staged.output_modules)
        for n, _ in prunable_parameters(m)
    }
    again = output_masks(build_staged("lenet5", seed=1), "lenet5", DENSITY, NTK, seed=1)
    assert all(torch.equal(masks[n], again[n]) for n in masks)  # a pure function of the seeds
    dense = output_masks(staged, "lenet5", 1.0, NTK, seed=1)
    assert all(bool(m.all()) for m in dense.values())


def test_active_space_is_the_stage_tensors_kept_coordinates():
    staged, model_mask, mask = masked_staged()
    sizes = []
    for t in range(staged.num_stages):
        active = ActiveStage(staged, t, mask)
        stage_params = staged.stage_parameters(t)
        assert list(active.names.values()) == list(stage_params)  # same order
        expected = sum(
            int(mask[n].sum()) if n in mask else p.numel() for n, p in stage_params.items()
        )
        assert active.space.dim == expected
        # Pruned weights are exactly zero, in the model and in the output modules.
        for name, m in active.mask.items():
            assert torch.count_nonzero(active.module.get_parameter(name)[~m]) == 0
        sizes.append(active.space.dim)
    for p in staged.model.parameters():
        p.requires_grad_(True)
    full = KeptSpace(staged.model, model_mask).dim
    assert sizes == [321, 1335, 4896] and full == 6413  # lenet5 at density 0.1, seed 1


def test_staged_mask_is_validated():
    staged, _, mask = masked_staged()
    broken = dict(mask)
    del broken["output.0.0.weight"]
    with pytest.raises(ValueError, match=r"missing \['output.0.0.weight'\]"):
        ActiveStage(staged, 0, broken)
    wrong = {**mask, "output.1.2.weight": torch.ones(3, 3, dtype=torch.bool)}
    with pytest.raises(ValueError, match=r"output\.1\.2\.weight"):
        ActiveStage(staged, 1, wrong)


# ------------------------------------------------------------------ the estimator per stage


def test_stage_cosine_follows_sqrt_k_over_k_plus_n_stage_and_beats_the_full_model(cifar):
    """The method's claim, on a real CIFAR-10 batch, at equal K (the method of test_zo.py).

    For Gaussian directions cos(ĝ, ∇L) ≈ √(K / (K + n + 1)), n the perturbed coordinates: the
    stage's estimate is taken against the autograd gradient of the **stage** loss over the
    stage's kept coordinates, the full model's against the full-model gradient.
    """
    x, y = cifar(64, 16)
    k = 400
    staged, model_mask, mask = masked_staged()
    measured, predicted = {}, {}
    for t in range(staged.num_stages):
        active = ActiveStage(staged, t, mask)
        h = active.features(x)
        cosines = [estimate_cosine(active.module, active.space, h, y, k, s) for s in (1, 2, 3)]
        measured[t] = float(np.mean(cosines))
        predicted[t] = math.sqrt(k / (k + active.space.dim + 1))
    for p in staged.model.parameters():  # the full model: every parameter trainable
        p.requires_grad_(True)
    full_space = KeptSpace(staged.model, model_mask)
    full = [estimate_cosine(staged.model, full_space, x, y, k, s) for s in (1, 2, 3)]
    measured["full"] = float(np.mean(full))
    predicted["full"] = math.sqrt(k / (k + full_space.dim + 1))
    print({key: (round(measured[key], 4), round(predicted[key], 4)) for key in measured})
    assert predicted == pytest.approx({0: 0.7443, 1: 0.48, 2: 0.2748, "full": 0.2423}, abs=1e-4)
    for key in measured:
        assert measured[key] == pytest.approx(predicted[key], rel=0.2), key
    assert measured[0] > 2.5 * measured["full"]
    assert measured[1] > 1.6 * measured["full"]
    assert measured[2] > measured["full"]


def test_scalars_equal_the_plain_staged_forward_under_the_same_perturbation(cifar):
    """Caching the prefix changes nothing but cost.

    Reference: perturb the stage's kept coordinates in place (the staged model's own tensors),
    run the plain ``staged.forward_stage(x, t)`` (the ordinary model at the last stage) and
    take the loss difference. The ``lean`` engine on the cached prefix gives bit-identical
    scalars (the same operations on the same values); ``batched`` and ``fused`` evaluate the
    copies in other kernels and agree within rtol 1e-4, atol 2e-6 (as in test_zo.py).
    """
    x, y = cifar(128, 32)
    staged, _, mask = masked_staged()
    sigma, seed, k = 1e-3, 11, 12
    settings = ZOSettings(k=k, sigma=sigma)
    for t in range(staged.num_stages):
        active = ActiveStage(staged, t, mask)
        last = t == staged.num_stages - 1

        def plain_loss(t: int = t, last: bool = last) -> float:
            with torch.no_grad():
                logits = staged.model(x) if last else staged.forward_stage(x, t)
            return float(batch_loss(logits, y))

        saved = active.space.gather(active.module)
        base = plain_loss()
        generator = DirectionGenerator(active.space.sizes, seed)
        expected = np.empty(k, dtype=np.float64)
        for j in range(k):
            active.space.add_(active.module, generator.direction(j), alpha=sigma)
            expected[j] = plain_loss() - base
            active.space.scatter_(active.module, saved)
        expected32 = expected.astype(np.float32)
        lean = stage_loss_differences(active, x, y, seed, settings, "lean")
        np.testing.assert_array_equal(lean.deltas, expected32)
        assert lean.base_loss == base
        assert np.abs(expected32).max() > 1e-4  # real signal
        for engine in ("batched", "fused"):
            got = stage_loss_differences(active, x, y, seed, settings, engine, chunk_size=5)
            np.testing.assert_allclose(got.deltas, expected32, rtol=1e-4, atol=2e-6)


# ----------------------------------------------------------------- client round and server


def frozen_state(staged, stage):
    """Every tensor stage ``stage`` must not touch, by name."""
    active = set(staged.stage_parameters(stage))
    out = {n: p.detach().clone() for n, p in staged.model.named_parameters() if n not in active}
    for t, module in enumerate(staged.output_modules):
        for n, p in module.named_parameters():
            if f"output.{t}.{n}" not in active:
                out[f"output.{t}.{n}"] = p.detach().clone()
    return out


def all_tensors(staged):
    out = {n: p.detach() for n, p in staged.model.named_parameters()}
    for t, module in enumerate(staged.output_modules):
        out.update((f"output.{t}.{n}", p.detach()) for n, p in module.named_parameters())
    return out


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_round_moves_only_the_active_stage_and_replays(data, stage):
    """Client (2 local steps) and server step: frozen tensors bit-identical, pruned stay 0."""
    cfg = RunConfig(k=16, sigma=1e-3, local_steps=2, local_lr=0.05, optimizer="sgd", lr=0.1)
    staged, _, mask = masked_staged()
    server = StageZOServer(cfg, staged, mask, stage)
    before = frozen_state(staged, stage)
    theta0 = server.server.kept_values().clone()
    replica = ReplayState(
        theta0, server.active.space.sizes, zo_settings(cfg), optimizer_settings(cfg)
    )
    x, y = data.x_train[:200], data.y_train[:200]
    result = train_stage_round(cfg, server.active, x, y, server.round_seed(1), partition_id=3)
    # The client's local step between its two steps is undone by the server's downlink: here
    # the client and server share tensors, so restore the received weights first.
    server.active.space.scatter_(server.active.module, theta0)
    assert [s.seed for s in result.steps] == server.expected_seeds(1, 3)
    server.apply_round([ClientUpdate(3, len(y), result.steps, result.base_loss)], server_round=1)
    after = all_tensors(staged)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    moved = server.active.space.gather(server.active.module)
    assert not torch.equal(moved, theta0)
    for name, m in mask.items():
        assert torch.count_nonzero(after[name][~m]) == 0, name
    # A node holding θ0 of the stage takes the same step from the round's (seed, coefficients).
    assert replica.apply(server.server.last_update)
    assert torch.equal(replica.weights, moved)


def test_server_step_is_the_reconstruction_over_the_stage_space(cifar):
    cfg = RunConfig(k=24, sigma=1e-3, optimizer="sgd", lr=0.5)
    staged, _, mask = masked_staged()
    server = StageZOServer(cfg, staged, mask, stage=1)
    x, y = cifar(0, 32)
    settings = zo_settings(cfg)
    seed = server.expected_seeds(4, 0)[0]
    step = ScalarStep(seed, stage_loss_differences(server.active, x, y, seed, settings).deltas)
    theta0 = server.server.kept_values().clone()
    server.apply_round([ClientUpdate(0, 32, [step], 2.3)], server_round=4)
    g = estimate_gradient(server.active.space.sizes, step, settings)
    expected = torch.add(theta0, g, alpha=-0.5)  # plain SGD, the only client
    torch.testing.assert_close(server.server.kept_values(), expected, rtol=0, atol=1e-7)
    # A stage change rebuilds the space, the optimizer and the replay history.
    server.set_stage(2)
    assert server.stage == 2 and server.active.space.dim == 4896
    assert torch.equal(
        server.server.kept_values(), server.active.space.gather(server.active.module)
    )
    assert server.server.updates_since(4, 6) is None  # nodes get the new stage in full


# --------------------------------------------------------------------------------- FLOPs


def test_stage_step_flops():
    staged, model_mask, mask = masked_staged()
    k, batch = 200, 32
    full_step = zo_step_flops(staged.model, model_mask, batch, k, "forward")
    totals = []
    for t in range(staged.num_stages):
        active = ActiveStage(staged, t, mask)
        flops = stage_step_flops(active, batch, k, "forward")
        assert flops.passes == k + 1
        assert flops.total == flops.prefix + (k + 1) * flops.active_pass
        if t == 0:
            assert flops.prefix == 0
        else:  # the prefix is the first t blocks of the masked model, counted once
            assert flops.prefix > 0
        totals.append(flops.total)
    # At the last stage, prefix + active pass is exactly one forward of the masked model.
    last = stage_step_flops(ActiveStage(staged, 2, mask), batch, k, "central")
    assert last.passes == 2 * k + 1
    assert (
        last.prefix + last.active_pass
        == forward_flops(staged.model, model_mask, batch_size=batch).sparse
    )
    assert all(total < full_step for total in totals)
    print({"full": full_step, "stages": totals})


# ------------------------------------------------------------------ forward-only memory


def test_forward_stage_memory_is_the_hand_count_for_lenet5():
    """LeNet-5 at batch 32, every item counted by hand from the architecture.

    The largest input + output of one leaf layer: stage 0 the ReLU after conv1 (6x28x28 in and
    out); stage 1 the ReLU after conv2 (16x10x10); stage 2 fc1 (400 in, 120 out). The prefix's
    peak is conv1's ReLU again; the features are pool1's output (6x14x14) and pool2's (400).
    """
    staged, _, mask = masked_staged()
    batch = 32
    floats = 4 * batch
    relu1, relu2, fc1 = 2 * 6 * 28 * 28 * floats, 2 * 16 * 10 * 10 * floats, (400 + 120) * floats
    expected = {
        0: {"prefix": 0, "features": 0, "activations": relu1},
        1: {"prefix": relu1, "features": 6 * 14 * 14 * floats, "activations": relu2},
        2: {"prefix": relu1, "features": 400 * floats, "activations": fc1},
    }
    model_floats = sum(p.numel() for p in staged.model.parameters())
    for t in range(staged.num_stages):
        got = forward_stage_memory(staged, t, batch, mask)
        output = staged.output_modules[t] if t < 2 else None
        out_floats = 0 if output is None else sum(p.numel() for p in output.parameters())
        assert got.weights == 4 * (model_floats + out_floats)
        held = [n for n, _ in prunable_parameters(staged.model)]
        if output is not None:
            held += [f"output.{t}.{n}" for n, _ in prunable_parameters(output)]
        assert got.mask == sum(mask[n].numel() for n in held)  # 1 B per torch.bool entry
        assert got.batch == batch * 3 * 32 * 32 * 4
        for item, value in expected[t].items():
            assert getattr(got, item) == value, (t, item)
        space = ActiveStage(staged, t, mask).space
        index = sum(8 * int(i.numel()) for i in space.indices if i is not None)
        assert got.perturbation == 2 * 4 * space.dim + index
        assert got.overlap == min(4 * space.dim, got.activations)
        step = max(got.prefix, got.features + got.activations + got.perturbation - got.overlap)
        assert got.total_bytes == got.weights + got.mask + got.batch + step
    # Dense: no mask bytes, every coordinate of the stage perturbed.
    dense = forward_stage_memory(staged, 1, batch)
    assert dense.mask == 0
    assert dense.perturbation == 2 * 4 * sum(p.numel() for p in staged.stage_parameters(1).values())
    # The flags of the staged model are restored.
    active = ActiveStage(staged, 2, mask)
    before = [p.requires_grad for p in staged.parameters()]
    forward_stage_memory(staged, 0, batch, mask)
    assert [p.requires_grad for p in staged.parameters()] == before and active.stage == 2


def test_staged_mask_travels_in_the_template_order():
    staged, _, mask = masked_staged()
    template = staged_mask_template(staged)
    assert list(mask) == list(template)
    assert all(bool(m.all()) for m in template.values())
    decoded = decode_mask(encode_mask(mask), staged_mask_template(build_staged("lenet5", seed=7)))
    assert list(decoded) == list(mask)
    assert all(torch.equal(decoded[n], mask[n]) for n in mask)
