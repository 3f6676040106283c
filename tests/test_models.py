"""Model registry, seeded initialisation, masks and the kept-coordinate space."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fedzo_flwr.models import MODELS, build_model, parameter_count, reinitialize_
from fedzo_flwr.sparse.mask import (
    apply_mask_,
    check_density,
    dense_mask,
    global_topk_mask,
    kept_target,
    prunable_parameters,
    validate_mask,
)
from fedzo_flwr.sparse.space import KeptSpace


@pytest.mark.parametrize(
    ("name", "count"),
    [("lenet5", 62_006), ("lenet-gn", 27_530), ("resnet20", 269_722), ("resnet18", 11_173_962)],
)
def test_parameter_counts_and_forward(name, count):
    # Published counts: LeNet-5 62,006; BAFFLE LeNet 27,530; ResNet-20 0.27M; ResNet-18 11.17M.
    assert parameter_count(name) == count
    model = build_model(name)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert list(model.buffers()) == []  # no running statistics anywhere


def test_cifar100_heads():
    assert parameter_count("lenet-gn", 100) == 27_530 + 64 * 90 + 90
    assert build_model("resnet20", num_classes=100)(torch.zeros(1, 3, 32, 32)).shape == (1, 100)


def test_seeded_initialisation_is_reproducible():
    a, b, c = (
        build_model("resnet20", seed=5),
        build_model("resnet20", seed=5),
        build_model("resnet20", seed=6),
    )
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if pa.dim() > 1:
            assert not torch.equal(pa, pc), name


def test_lenet5_init_matches_pytorch_default_distribution():
    model = build_model("lenet5", seed=0)
    bound = 1 / (400**0.5)  # kaiming_uniform(a=sqrt(5)) and bias bound are both 1/sqrt(fan_in)
    assert model.fc1.weight.abs().max() <= bound and model.fc1.bias.abs().max() <= bound
    assert model.fc1.weight.abs().max() > 0.95 * bound


@pytest.mark.parametrize("name", ["resnet20", "resnet18"])
def test_resnet_init_is_kaiming_normal_fan_in_on_conv_and_linear(name):
    # NTK-SAP's CIFAR ResNets (Models/lottery_resnet.py, Models/tinyimagenet_resnet.py) call
    # nn.init.kaiming_normal_ with its defaults on conv and linear weights: std sqrt(2 / fan_in).
    # The stem (3 -> C, fan_in 27, fan_out 9C) separates fan_in from fan_out; the classifier
    # separates Kaiming-normal (std sqrt(2 / fan_in)) from PyTorch's default (std 1/sqrt(3 fan_in)).
    model = build_model(name, seed=0)
    for module in (model.conv1, model.fc):
        w = module.weight.detach().double()
        fan_in = w[0].numel()
        expected = (2 / fan_in) ** 0.5
        tolerance = 4 * expected / (2 * w.numel()) ** 0.5  # 4 standard errors of the sd estimate
        assert abs(float(w.std()) - expected) < tolerance, (name, module)
        assert abs(float(w.mean())) < 4 * expected / w.numel() ** 0.5
    bound = 1 / model.fc.in_features**0.5  # bias: PyTorch's default, as the reference leaves it
    bias, weight = model.fc.bias.detach(), model.fc.weight.detach()
    assert bias.abs().max() <= bound and bias.abs().max() > 0.5 * bound
    assert float(weight.abs().max()) > 1.5 * bound  # not uniform in +-1/sqrt(fan_in)


@pytest.mark.parametrize("name", ["lenet5", "lenet-gn", "resnet20"])
def test_weights_only_redraw_keeps_biases_and_norm_and_the_stream(name):
    model = build_model(name, seed=0)
    for module in model.modules():  # non-default norm values: they must survive a weights redraw
        if isinstance(module, nn.GroupNorm) and module.affine:
            nn.init.constant_(module.weight, 2.0)
            nn.init.constant_(module.bias, 0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    prunable = {n for n, _ in prunable_parameters(model)}
    assert len(prunable) < len(before)  # every model has biases or norm parameters
    weights_only = reinitialize_(
        copy.deepcopy(model), name, torch.Generator().manual_seed(3), "weights"
    )
    everything = reinitialize_(copy.deepcopy(model), name, torch.Generator().manual_seed(3), "all")
    fresh = dict(everything.named_parameters())
    for n, p in weights_only.named_parameters():
        if n in prunable:  # redrawn, and exactly as "all" draws them (the same random stream)
            assert not torch.equal(p, before[n]) and torch.equal(p, fresh[n]), n
        else:  # kept as they were; "all" redraws them (biases) or resets them (GroupNorm 1, 0)
            assert torch.equal(p, before[n]) and not torch.equal(fresh[n], before[n]), n
    with pytest.raises(ValueError, match="redraw"):
        reinitialize_(model, name, torch.Generator(), "biases")  # type: ignore[arg-type]


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="unknown model 'vgg'; valid models: lenet-gn, lenet5"):
        build_model("vgg")
    with pytest.raises(TypeError, match="model must be a str"):
        build_model(3)
    assert set(MODELS) == {"lenet5", "lenet-gn", "resnet20", "resnet18"}


def test_prunable_parameters_are_conv_and_linear_weights():
    names = [n for n, _ in prunable_parameters(build_model("resnet20"))]
    assert names[0] == "conv1.weight" and names[-1] == "fc.weight"
    assert all(n.endswith("weight") and "norm" not in n for n in names)
    assert len(names) == 1 + 18 + 1  # stem, 9 blocks x 2 convs, classifier (option-A shortcuts)


@pytest.mark.parametrize("bad", [0, 0.0, 1.5, -0.1, float("nan")])
def test_density_outside_unit_interval_is_rejected(bad):
    with pytest.raises(ValueError, match="density must be in \\(0, 1\\]"):
        check_density(bad)


def test_global_topk_is_exact_and_never_empties_a_tensor():
    scores = {"a": torch.arange(100.0), "b": torch.zeros(10), "c": torch.full((3,), -1.0)}
    mask = global_topk_mask(scores, 0.05)  # ceil(0.05 * 113) = 6 kept
    assert kept_target(0.05, 113) == 6
    assert sum(int(m.sum()) for m in mask.values()) == 6
    assert all(int(m.sum()) >= 1 for m in mask.values())
    assert mask["a"][-4:].all()  # the rest of the budget goes to the global top scores
    assert mask["b"][0] and mask["c"][0]  # ties: first index wins


def test_mask_shape_mismatch_names_the_parameter():
    model = build_model("lenet5")
    mask = dense_mask(model)
    mask["fc1.weight"] = torch.ones(3, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"mask shape mismatch for .fc1\.weight."):
        validate_mask(model, mask)
    with pytest.raises(ValueError, match=r"missing \[.conv1\.weight.\]"):
        validate_mask(model, {k: v for k, v in dense_mask(model).items() if k != "conv1.weight"})


def test_kept_space_round_trips_and_skips_pruned_entries():
    model = build_model("lenet5", seed=1)
    gen = torch.Generator().manual_seed(0)
    mask = global_topk_mask(
        {n: torch.rand(p.shape, generator=gen) for n, p in prunable_parameters(model)}, 0.2
    )
    apply_mask_(model, mask)
    space = KeptSpace(model, mask)
    assert space.dim == kept_target(0.2, 61_770) + 236
    theta = space.gather(model)
    other = build_model("lenet5", seed=2)
    apply_mask_(other, mask)
    space.scatter_(other, theta)
    for name, tensor in model.state_dict().items():
        assert torch.equal(other.state_dict()[name], tensor), name
    dense = space.expand(theta)
    for name, param in model.named_parameters():
        assert torch.equal(dense[name], param.detach())
    space.add_(other, torch.ones(space.dim), alpha=2.0)
    assert torch.equal(space.gather(other), theta + 2.0)
    for name, m in mask.items():
        assert torch.count_nonzero(other.get_parameter(name)[~m]) == 0
    with pytest.raises(ValueError, match="coordinates"):
        space.split(torch.zeros(space.dim + 1))
