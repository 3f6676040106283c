"""Model registry, seeded initialisation, masks and the kept-coordinate space."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedzo_flwr.models import MODELS, build_model, parameter_count
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
