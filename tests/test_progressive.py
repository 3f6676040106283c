"""Progressive block training, Flower-free core: staged models, local stage training, memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fedzo_flwr.config import RunConfig
from fedzo_flwr.data import to_tensor
from fedzo_flwr.errors import ConfigError
from fedzo_flwr.fedavg.client import local_batch_indices
from fedzo_flwr.models import build_model
from fedzo_flwr.progressive.client import StageTrainSettings, stage_batches, train_stage
from fedzo_flwr.progressive.memory import full_backprop_memory, memory_plan, stage_memory
from fedzo_flwr.progressive.staged import StagedModel, build_staged
from fedzo_flwr.seeding import fedavg_batches_seed

MODELS = [("lenet5", 3), ("lenet-gn", 2), ("resnet20", 3), ("resnet18", 4)]


def _images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    return x, rng.integers(0, 10, size=n).astype(np.int64)


# --- staged models ---------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "stages"), MODELS)
def test_last_stage_is_the_ordinary_model(name, stages):
    staged = build_staged(name, seed=3)
    model = staged.model
    assert staged.num_stages == stages
    reference = build_model(name, seed=3)  # the staged model's weights are build_model's
    for (k, a), (k2, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x = torch.randn(1 if name == "resnet18" else 3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(staged.forward_stage(x, stages - 1), model(x))
    # Blocks + head partition the model's parameters, by identity and under state_dict keys.
    own = dict(model.named_parameters())
    names = [n for t in range(stages) for n in staged.block_names(t)]
    last = staged.stage_parameters(stages - 1)
    head = [n for n in last if n not in staged.block_names(stages - 1)]
    assert sorted(names + head) == sorted(own) and len(set(names + head)) == len(own)
    assert set(own) <= set(model.state_dict())
    for t in range(stages):
        for n, p in staged.stage_parameters(t).items():
            if not n.startswith("output."):
                assert p is own[n]
    assert all(p is own[n] for n, p in last.items())


@pytest.mark.parametrize(("name", "stages"), MODELS)
def test_trainable_parameters_are_block_and_output_module(name, stages):
    staged = build_staged(name)
    x = torch.randn(1, 3, 32, 32)
    for t in range(stages):
        trainable = staged.prepare_stage(t)
        expected = {id(p) for p in staged.blocks[t].parameters()}
        tail = staged.head if t == stages - 1 else staged.output_modules[t]
        expected |= {id(p) for p in tail.parameters()}
        assert {id(p) for p in trainable.values()} == expected
        assert {id(p) for p in staged.parameters() if p.requires_grad} == expected
        F.cross_entropy(staged.forward_stage(x, t), torch.tensor([1])).backward()
        with_grad = {id(p) for p in staged.parameters() if p.grad is not None}
        assert with_grad == expected
        for p in staged.parameters():
            p.grad = None


def test_output_modules_follow_profl():
    # One 3x3 stride-2 conv per missing stage, channels doubling, no norm/activation, GAP, fc.
    staged = build_staged("resnet20")
    kinds = [type(m) for m in staged.output_modules[0]]
    assert kinds == [nn.Conv2d, nn.Conv2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear]
    convs = [m for m in staged.output_modules[0] if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride, c.kernel_size) for c in convs] == [
        (16, 32, (2, 2), (3, 3)),
        (32, 64, (2, 2), (3, 3)),
    ]
    assert type(staged.output_modules[1][0]) is nn.Conv2d
    assert staged.output_modules[1][-1].in_features == 64
    r18 = build_staged("resnet18")
    convs = [m for m in r18.output_modules[1] if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(128, 256), (256, 512)]
    # LeNet-5 behind its first hidden linear layer: one linear classifier.
    fine = build_staged("lenet5", split="layers", layers_per_block=1)
    assert fine.num_stages == 4
    assert [type(m) for m in fine.output_modules[2]] == [nn.Linear]
    assert fine.output_modules[2][0].in_features == 120


def test_finer_split_and_names():
    fine = build_staged("resnet20", split="layers", layers_per_block=1)
    assert fine.num_stages == 9
    assert fine.block_names(0)[:2] == ("conv1.weight", "norm1.weight")
    assert fine.block_names(4) == tuple(
        f"layers.4.{n}" for n, _ in fine.model.layers[4].named_parameters()
    )
    by_three = build_staged("resnet20", split="layers", layers_per_block=3)
    stage = build_staged("resnet20")
    assert [by_three.block_names(t) for t in range(3)] == [stage.block_names(t) for t in range(3)]
    with pytest.raises(ConfigError, match="layers-per-block"):
        build_staged("resnet20", split="layers", layers_per_block=0)
    with pytest.raises(ConfigError, match="stage-split"):
        build_staged("resnet20", split="blocks")


def test_output_module_seeding_and_stage_tensor_transport():
    a, b = build_staged("resnet20", seed=1), build_staged("resnet20", seed=1)
    c = build_staged("resnet20", seed=2)
    pa, pb, pc = (s.output_modules[0][0].weight for s in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    tensors = c.stage_tensors(1)
    a.load_stage_tensors(1, tensors)
    for n, p in a.stage_parameters(1).items():
        assert torch.equal(p, tensors[n])
    bad = dict(tensors)
    bad.pop(next(iter(bad)))
    with pytest.raises(ValueError, match="missing"):
        a.load_stage_tensors(1, bad)
    name = next(iter(tensors))
    with pytest.raises(ValueError, match="shape"):
        a.load_stage_tensors(1, {**tensors, name: torch.zeros(1)})
    nan = tensors[name].clone()
    nan.view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        a.load_stage_tensors(1, {**tensors, name: nan})


# --- local stage training ---------------------------------------------------------------------


def test_train_stage_freezes_prefix_and_returns_only_active_tensors():
    staged = build_staged("resnet20", seed=0)
    before = {n: p.detach().clone() for n, p in staged.model.named_parameters()}
    outputs = [m[0].weight.detach().clone() for m in staged.output_modules]
    x, y = _images(12)
    settings = StageTrainSettings(local_batches=2, batch_size=4)
    result = train_stage(staged, 1, x, y, settings, seed_of_round=5, partition_id=2)
    active = staged.stage_parameters(1)
    assert set(result.tensors) == set(active)
    assert result.num_examples == 12 and result.train_examples == 8 and result.steps == 2
    for n, p in staged.model.named_parameters():
        if n in active:
            assert not torch.equal(p, before[n]), n
            assert torch.equal(result.tensors[n], p)
        else:
            assert torch.equal(p, before[n]), n  # frozen prefix and untrained tail: bit-identical
    assert torch.equal(staged.output_modules[0][0].weight, outputs[0])
    vector = staged.block_vector(1)
    assert vector.numel() == sum(p.numel() for p in staged.blocks[1].parameters()) == 51_072
    assert torch.equal(vector[:4608], result.tensors["layers.3.conv1.weight"].reshape(-1))
    assert not torch.equal(staged.output_modules[1][0].weight, outputs[1])
    assert result.peak_mem_bytes > 0 and result.seconds > 0


@pytest.mark.parametrize(("name", "stage"), [("resnet20", 1), ("lenet5", 1), ("resnet20", 2)])
def test_no_grad_prefix_changes_nothing_but_cost(name, stage):
    staged = build_staged(name, seed=4)
    x = torch.randn(4, 3, 32, 32)
    target = torch.tensor([0, 3, 5, 9])
    params = list(staged.prepare_stage(stage).values())
    loss = F.cross_entropy(staged.forward_stage(x, stage), target)
    grads = torch.autograd.grad(loss, params)
    # Ground truth: the same staged loss with every parameter trainable and no no_grad anywhere.
    for p in staged.parameters():
        p.requires_grad_(True)
    h = x
    for block in staged.blocks[: stage + 1]:
        h = block(h)
    tail = staged.head if stage == staged.num_stages - 1 else staged.output_modules[stage]
    full_loss = F.cross_entropy(tail(h), target)
    assert torch.equal(full_loss, loss)
    expected = torch.autograd.grad(full_loss, params)
    for g, e in zip(grads, expected):
        assert torch.equal(g, e)  # bit-identical


def test_one_step_is_sgd_with_momentum_and_weight_decay():
    staged = build_staged("lenet5", seed=0)
    x, y = _images(6, seed=1)
    settings = StageTrainSettings(local_batches=1, batch_size=6, lr=0.1, weight_decay=0.01)
    start = {n: p.detach().clone() for n, p in staged.stage_parameters(0).items()}
    params = staged.prepare_stage(0)
    idx = stage_batches(settings, 6, 11, 0)[0]
    loss = F.cross_entropy(
        staged.forward_stage(to_tensor(x[idx], "cifar10"), 0), torch.tensor(y[idx])
    )
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    result = train_stage(staged, 0, x, y, settings, seed_of_round=11, partition_id=0)
    for n, p0 in start.items():  # first momentum step: buf = g + wd p; p -= lr buf
        expected = p0 - 0.1 * (grads[n] + 0.01 * p0)
        torch.testing.assert_close(result.tensors[n], expected, rtol=0, atol=1e-7)
    assert result.train_loss == pytest.approx(float(loss.detach()), abs=1e-6)


def test_batches_are_the_fedavg_clients():
    settings = StageTrainSettings(local_epochs=2, batch_size=7)
    cfg = RunConfig(batch_size=7, local_epochs=2)
    ours = stage_batches(settings, 30, 123, 4)
    theirs = local_batch_indices(cfg, 30, fedavg_batches_seed(123, 4))
    assert len(ours) == 10 and all(np.array_equal(a, b) for a, b in zip(ours, theirs))


@pytest.mark.parametrize(
    ("field", "value", "key"),
    [
        ("batch_size", 0, "batch-size"),
        ("local_epochs", 0, "local-epochs"),
        ("lr", 0.0, "local-lr"),
        ("momentum", 1.0, "momentum"),
        ("weight_decay", float("nan"), "weight-decay"),
        ("dataset", "mnist", "dataset"),
    ],
)
def test_settings_name_the_key(field, value, key):
    with pytest.raises(ConfigError, match=key):
        StageTrainSettings(**{field: value})


# --- memory per stage ------------------------------------------------------------------------


def test_lenet5_saved_bytes_match_a_hand_count():
    # Per image, float32 unless noted: relu1 out 6x28x28, pool1 indices 6x14x14 (int64), conv2 in
    # 6x14x14, relu2 out 16x10x10, pool2 indices 16x5x5 (int64), fc1 in 400, relu out 120 and 84.
    per_image = 4 * 6 * 784 + 8 * 6 * 196 + 4 * 6 * 196 + 4 * 1600 + 8 * 400 + 4 * 400 + 4 * 204
    memory = full_backprop_memory(build_model("lenet5"), 8)
    assert memory.saved == 8 * per_image == 359_552
    assert memory.transient == 8 * 4 * 6 * 28 * 28  # conv1's output is the largest
    assert memory.gradients == memory.optimizer_state == 4 * 62_006
    assert memory.weights == 4 * 62_006 and memory.batch == 8 * 3 * 32 * 32 * 4


def test_full_backprop_saved_bytes_are_linear_in_batch():
    model = build_model("resnet20")
    saved = [full_backprop_memory(model, b).saved for b in (1, 2, 4)]
    print("resnet20 saved bytes at batch 1, 2, 4:", saved)
    assert saved[2] - saved[1] == pytest.approx(2 * (saved[1] - saved[0]), rel=0.01)
    assert saved[0] > 0


def test_stage_memory_against_full_backprop():
    staged = build_staged("resnet20")
    plan = memory_plan(staged, 4, rounds=(10, 20, 30))
    full = plan.full
    print({s.label: s.total_bytes for s in (*plan.stages, full)})
    assert plan.stages[0].saved < full.saved
    assert plan.stages[-1].total_bytes < full.total_bytes
    assert all(s.weights >= full.weights for s in plan.stages)  # the whole model is loaded
    for t, s in enumerate(plan.stages):
        trainable = sum(p.numel() for p in staged.stage_parameters(t).values())
        assert s.gradients == s.optimizer_state == 4 * trainable
    assert plan.peak_bytes == max(plan.needs)
    needs = plan.needs
    assert plan.average_bytes == (10 * needs[0] + 20 * needs[1] + 30 * needs[2]) / 60
    assert all(p.requires_grad for p in staged.parameters())  # flags restored


def test_stage_memory_restores_requires_grad():
    staged = build_staged("lenet5")
    staged.prepare_stage(1)
    flags = [p.requires_grad for p in staged.parameters()]
    stage_memory(staged, 0, 2)
    assert [p.requires_grad for p in staged.parameters()] == flags


def test_staged_model_rejects_unknown_model():
    with pytest.raises(ConfigError):
        StagedModel(nn.Linear(3, 3), 10)
