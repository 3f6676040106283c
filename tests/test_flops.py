from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fedzo_flwr.measure.flops import (
    FlopReport,
    backprop_step_flops,
    forward_backward_flops,
    forward_flops,
    zo_step_flops,
)
from fedzo_flwr.models import build_model
from fedzo_flwr.sparse.mask import dense_mask, kept_target, prunable_parameters
from fedzo_flwr.sparse.space import KeptSpace
from fedzo_flwr.zo.engines import fused
from fedzo_flwr.zo.estimator import loss_differences
from fedzo_flwr.zo.settings import ZOSettings

# LeNet-5 on 3x32x32, FlopCounterMode convention (2 FLOPs per MAC, biases not counted):
#   conv1: 28*28 outputs x 6 channels x (3*5*5 = 75) MACs  -> 2 * 352,800 = 705,600
#   conv2: 10*10 outputs x 16 channels x (6*5*5 = 150) MACs -> 2 * 240,000 = 480,000
#   fc1 400x120 -> 96,000; fc2 120x84 -> 20,160; fc3 84x10 -> 1,680
LENET_LAYER_FLOPS = {
    "conv1.weight": 2 * 28 * 28 * 6 * 75,
    "conv2.weight": 2 * 10 * 10 * 16 * 150,
    "fc1.weight": 2 * 400 * 120,
    "fc2.weight": 2 * 120 * 84,
    "fc3.weight": 2 * 84 * 10,
}
LENET_FORWARD = 1_303_440


@pytest.fixture(scope="module")
def lenet() -> nn.Module:
    return build_model("lenet5", seed=0)


def one_layer_mask(model: nn.Module, layer: str, density: float, seed: int = 0):
    """Dense everywhere except ``layer``, which keeps exactly kept_target(density, n) entries."""
    mask = dense_mask(model)
    n = mask[layer].numel()
    kept = kept_target(density, n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    flat = torch.zeros(n, dtype=torch.bool)
    flat[perm[:kept]] = True
    mask[layer] = flat.reshape(mask[layer].shape)
    return mask, kept, n


def test_lenet_dense_forward_is_analytic(lenet: nn.Module) -> None:
    report = forward_flops(lenet)
    assert isinstance(report, FlopReport)
    assert sum(LENET_LAYER_FLOPS.values()) == LENET_FORWARD
    assert report.dense == LENET_FORWARD == 1303440
    assert report.sparse == report.dense
    assert report.ratio == 1.0
    assert report.per_layer == {n: (f, f) for n, f in LENET_LAYER_FLOPS.items()}


def test_lenet_batch_scaling(lenet: nn.Module) -> None:
    report = forward_flops(lenet, batch_size=32)
    assert report.dense == 32 * LENET_FORWARD == 41_710_080  # the "41.7 MFLOP" calibration
    assert report.per_layer["conv1.weight"] == (32 * 705_600, 32 * 705_600)


def test_dense_mask_equals_no_mask(lenet: nn.Module) -> None:
    assert forward_flops(lenet, dense_mask(lenet)) == forward_flops(lenet, None)


def test_bias_add_is_not_counted() -> None:
    # FlopCounterMode counts addmm as the mm alone and convolution without its bias.
    for bias in (True, False):
        assert forward_flops(nn.Linear(84, 10, bias=bias), input_shape=(84,)).dense == 1680
        conv = nn.Conv2d(3, 6, 5, bias=bias)
        assert forward_flops(conv, input_shape=(3, 32, 32)).dense == 705_600


@pytest.mark.parametrize("layer", list(LENET_LAYER_FLOPS))
@pytest.mark.parametrize("density", [0.05, 0.3, 0.77])
def test_one_layer_mask_scales_only_that_layer(lenet: nn.Module, layer: str, density: float):
    mask, kept, n = one_layer_mask(lenet, layer, density)
    report = forward_flops(lenet, mask)
    assert report.dense == LENET_FORWARD
    layer_dense = LENET_LAYER_FLOPS[layer]
    assert layer_dense * kept % n == 0  # the kept fraction of a layer's FLOPs is an integer
    expected_layer = layer_dense * kept // n
    assert report.per_layer[layer] == (layer_dense, expected_layer)
    for other, flops in LENET_LAYER_FLOPS.items():
        if other != layer:
            assert report.per_layer[other] == (flops, flops)
    assert report.sparse == LENET_FORWARD - layer_dense + expected_layer
    # Equivalently, per kept weight: 2 * (output positions) FLOPs.
    positions = {"conv1.weight": 28 * 28, "conv2.weight": 10 * 10}.get(layer, 1)
    assert expected_layer == 2 * positions * kept


def test_global_mask_per_layer_sum(lenet: nn.Module) -> None:
    g = torch.Generator().manual_seed(7)
    mask = {n: torch.rand(p.shape, generator=g) < 0.2 for n, p in prunable_parameters(lenet)}
    report = forward_flops(lenet, mask, batch_size=3)
    positions = {"conv1.weight": 28 * 28, "conv2.weight": 10 * 10}
    expected = {n: 3 * 2 * positions.get(n, 1) * int(m.sum()) for n, m in mask.items()}
    assert {n: s for n, (_, s) in report.per_layer.items()} == expected
    assert report.sparse == sum(expected.values())


def _brute_force_conv_macs(conv: nn.Conv2d, mask: torch.Tensor, shape: tuple[int, ...]):
    """Per-weight MAC counts by enumeration: (all output positions, in-bounds positions only)."""
    b, _, h, w = shape
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    ph, pw = conv.padding
    h_out = (h + 2 * ph - kh) // sh + 1
    w_out = (w + 2 * pw - kw) // sw + 1
    every = torch.zeros(mask.shape, dtype=torch.long)
    real = torch.zeros(mask.shape, dtype=torch.long)
    for o, c, i, j in itertools.product(*(range(s) for s in mask.shape)):
        if not mask[o, c, i, j]:
            continue
        for _, y, x in itertools.product(range(b), range(h_out), range(w_out)):
            every[o, c, i, j] += 1
            yy, xx = y * sh - ph + i, x * sw - pw + j
            real[o, c, i, j] += int(0 <= yy < h and 0 <= xx < w)
    return every, real, h_out * w_out


@pytest.mark.parametrize("stride", [1, 2])
def test_brute_force_conv_per_weight_macs_unpadded(stride: int) -> None:
    conv = nn.Conv2d(2, 3, 3, stride=stride, bias=True)
    shape = (2, 2, 7, 7)
    mask = torch.rand(conv.weight.shape, generator=torch.Generator().manual_seed(1)) < 0.4
    every, real, positions = _brute_force_conv_macs(conv, mask, shape)
    # Without padding every kept weight meets exactly B * H_out * W_out real inputs.
    assert torch.equal(every, real)
    assert set(every[mask].tolist()) == {shape[0] * positions}
    report = forward_flops(conv, {"weight": mask}, input_shape=shape[1:], batch_size=shape[0])
    assert report.sparse == 2 * int(real.sum())
    assert report.dense == 2 * shape[0] * positions * conv.weight.numel()
    # Cross-check the enumeration with a conv of ones: sum of outputs = real MACs.
    ones = F.conv2d(torch.ones(shape), mask.float(), stride=stride)
    assert int(ones.sum()) == int(real.sum())


def test_brute_force_conv_per_weight_macs_padded() -> None:
    conv = nn.Conv2d(2, 3, 3, stride=1, padding=1, bias=False)
    shape = (1, 2, 5, 5)
    mask = torch.rand(conv.weight.shape, generator=torch.Generator().manual_seed(2)) < 0.5
    every, real, positions = _brute_force_conv_macs(conv, mask, shape)
    report = forward_flops(conv, {"weight": mask}, input_shape=shape[1:])
    # FlopCounterMode counts multiplications by padding zeros: exact in that convention...
    assert set(every[mask].tolist()) == {positions}
    assert report.sparse == 2 * int(every.sum())
    # ...and an upper bound on the MACs with real inputs (edge taps see padding).
    assert int(real.sum()) < int(every.sum())
    assert int(F.conv2d(torch.ones(shape), mask.float(), padding=1).sum()) == int(real.sum())


def test_brute_force_linear_per_weight_macs() -> None:
    lin = nn.Linear(7, 5)
    batch = 4
    mask = torch.rand(lin.weight.shape, generator=torch.Generator().manual_seed(3)) < 0.3
    # y[b, o] = sum_i w[o, i] x[b, i]: weight (o, i) takes part in one MAC per sample.
    macs = torch.zeros(lin.weight.shape, dtype=torch.long)
    for _, o, i in itertools.product(range(batch), range(5), range(7)):
        macs[o, i] += int(mask[o, i])
    assert set(macs[mask].tolist()) == {batch}
    report = forward_flops(lin, {"weight": mask}, input_shape=(7,), batch_size=batch)
    assert report.sparse == 2 * int(macs.sum()) == 2 * batch * int(mask.sum())


def test_resnet_dense_forward() -> None:
    # ResNet-20 (16/32/64, option A): 40,551,040 MACs at batch 1.
    #   stem 32*32*16*27 + 6 * 32*32*16*144 + 16*16*32*144 + 5 * 16*16*32*288
    #   + 8*8*64*288 + 5 * 8*8*64*576 + 64*10
    resnet20_macs = (
        32 * 32 * 16 * 27
        + 6 * 32 * 32 * 16 * 144
        + 16 * 16 * 32 * 144
        + 5 * 16 * 16 * 32 * 288
        + 8 * 8 * 64 * 288
        + 5 * 8 * 8 * 64 * 576
        + 64 * 10
    )
    assert forward_flops(build_model("resnet20")).dense == 2 * resnet20_macs == 81_102_080
    # ResNet-18 (CIFAR stem, 1x1 conv shortcuts): 555,422,720 MACs.
    report = forward_flops(build_model("resnet18"))
    assert report.dense == 1_110_845_440
    assert sum(d for d, _ in report.per_layer.values()) == report.dense


def test_forward_backward_lenet_measured(lenet: nn.Module) -> None:
    report = forward_backward_flops(lenet)
    # Backward: conv1 only computes its weight gradient (its input is the data), every other
    # layer computes input and weight gradients (2x its forward).
    backward = 705_600 + 2 * (480_000 + 96_000 + 20_160 + 1_680)
    assert report.dense == LENET_FORWARD + backward == 3_204_720
    assert report.per_layer["conv1.weight"] == (2 * 705_600, 2 * 705_600)
    assert report.per_layer["fc1.weight"] == (3 * 96_000, 3 * 96_000)
    assert backprop_step_flops(lenet, None, 1) == 3_204_720
    assert backprop_step_flops(lenet, None, 8) == 8 * 3_204_720


def test_backprop_under_mask_scales_per_layer(lenet: nn.Module) -> None:
    mask, kept, n = one_layer_mask(lenet, "fc1.weight", 0.1)
    sparse = backprop_step_flops(lenet, mask, 2)
    assert sparse == 2 * (3_204_720 - 3 * 96_000 + 3 * 96_000 * kept // n)
    mask, kept, n = one_layer_mask(lenet, "conv1.weight", 0.5)
    assert backprop_step_flops(lenet, mask, 1) == 3_204_720 - 2 * 705_600 + 2 * 705_600 * kept // n


def test_resnet18_backward_attribution_is_not_double_counted() -> None:
    # FlopCounterMode's own module tracker double-counts backward FLOPs where a tensor feeds
    # two modules (conv1 and the downsample conv of a block); the per-layer split must not.
    report = forward_backward_flops(build_model("resnet18"))
    assert sum(d for d, _ in report.per_layer.values()) == report.dense == 3_328_997_376
    fwd = forward_flops(build_model("resnet18")).dense
    # Every layer costs 3x its forward except the stem conv (1,769,472 MACs), which has 2x.
    assert report.dense == 3 * fwd - 2 * 1_769_472


def test_counting_leaves_model_untouched(lenet: nn.Module) -> None:
    before = {n: p.detach().clone() for n, p in lenet.named_parameters()}
    forward_backward_flops(lenet, batch_size=2)
    forward_flops(lenet)
    for n, p in lenet.named_parameters():
        assert p.grad is None
        assert torch.equal(p, before[n])


@pytest.mark.parametrize("scheme", ["forward", "central"])
@pytest.mark.parametrize("engine", ["lean", "fused"])
def test_zo_step_flops_count_the_passes_the_engines_run(
    scheme: str, engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ground truth: the forward passes one step really runs, counted. Passes through the
    # model's own modules are counted by a forward hook on its head (rows of logits / batch);
    # the fused engine's copies, which run in its translated forward, by the rows of every
    # FusedPlan.forward call of the step.
    model = build_model("lenet5", seed=1).eval()
    mask, _, _ = one_layer_mask(model, "fc1.weight", 0.3)
    with torch.no_grad():
        model.fc1.weight.mul_(mask["fc1.weight"])
    space = KeptSpace(model, mask)
    k, batch = 5, 4
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.arange(batch) % 10
    fused.get_plan(model, space).verify(model, space, x)  # verification runs once, before
    rows: list[int] = []
    translated = fused.FusedPlan.forward

    def spy(self, x, weights, track=None):  # type: ignore[no-untyped-def]
        rows.append(weights.rows * x.shape[0])
        return translated(self, x, weights, track)

    monkeypatch.setattr(fused.FusedPlan, "forward", spy)
    handle = model.fc3.register_forward_hook(lambda _m, _a, out: rows.append(out.shape[0]))
    settings = ZOSettings(k=k, sigma=1e-3, scheme=scheme)  # type: ignore[arg-type]
    try:
        result = loss_differences(model, space, x, y, 3, settings, engine=engine, chunk_size=2)
    finally:
        handle.remove()
    passes = sum(rows) // batch
    assert passes == (k + 1 if scheme == "forward" else 2 * k + 1)
    if engine == "lean":
        assert len(rows) == passes  # one model call per pass
    assert result.forward_passes == passes
    per_pass = forward_flops(model, mask, batch_size=batch).sparse
    assert zo_step_flops(model, mask, batch, k, scheme) == passes * per_pass  # type: ignore[arg-type]


@pytest.mark.parametrize("k", [1, 4, 20])
def test_zo_step_flops(lenet: nn.Module, k: int) -> None:
    mask, kept, n = one_layer_mask(lenet, "fc1.weight", 0.2)
    fwd = forward_flops(lenet, mask, batch_size=16).sparse
    assert fwd == 16 * (LENET_FORWARD - 96_000 + 96_000 * kept // n)
    assert zo_step_flops(lenet, mask, 16, k, "forward") == (k + 1) * fwd
    assert zo_step_flops(lenet, mask, 16, k, "central") == (2 * k + 1) * fwd
    assert zo_step_flops(lenet, None, 1, k, "forward") == (k + 1) * LENET_FORWARD


class DataDependent(nn.Module):
    """Cannot run on the meta device (reads a value), so counting falls back to a real run."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 4)
        self.fc2 = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if h.abs().sum().item() >= 0.0:
            h = torch.relu(h)
        return self.fc2(h)


def test_fallback_for_models_that_cannot_run_on_meta() -> None:
    model = DataDependent()
    mask = dense_mask(model)
    mask["fc1.weight"][0] = False  # keeps 18 of 24
    report = forward_flops(model, mask, input_shape=(6,), batch_size=5)
    assert report.dense == 5 * 2 * (24 + 12)
    assert report.sparse == 5 * 2 * (18 + 12)
    assert forward_backward_flops(model, input_shape=(6,)).dense == 2 * 24 * 2 + 2 * 12 * 3
    assert all(p.grad is None for p in model.parameters())


def test_argument_errors(lenet: nn.Module) -> None:
    with pytest.raises(ValueError, match="scheme must be 'forward' or 'central'"):
        zo_step_flops(lenet, None, 1, 2, "backward")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k must be a positive int"):
        zo_step_flops(lenet, None, 1, 0, "forward")
    with pytest.raises(TypeError, match="k must be a positive int"):
        zo_step_flops(lenet, None, 1, 2.0, "forward")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        forward_flops(lenet, batch_size=0)
    with pytest.raises(TypeError, match="input_shape must be a sequence"):
        forward_flops(lenet, input_shape=32)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"model must be an nn\.Module"):
        forward_flops("lenet5")  # type: ignore[arg-type]
    bad = dense_mask(lenet)
    bad["fc1.weight"] = bad["fc1.weight"][:, :10]
    with pytest.raises(ValueError, match="mask shape mismatch"):
        forward_flops(lenet, bad)
