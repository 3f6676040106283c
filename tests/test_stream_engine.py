"""The ``stream`` engine (one layer's weights at a time, sparse at rest) against lean and fused.

Real CIFAR-10 batches, real models; small K so the file runs in seconds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedzo_flwr.models import build_model
from fedzo_flwr.sparse.mask import apply_mask_, global_topk_mask, prunable_parameters
from fedzo_flwr.sparse.packed import pack_bits, unpack_bits
from fedzo_flwr.sparse.space import KeptSpace
from fedzo_flwr.zo.directions import DirectionGenerator
from fedzo_flwr.zo.engines import stream
from fedzo_flwr.zo.engines.base import batch_loss
from fedzo_flwr.zo.engines.stream import micro_batch_loss, stream_workspace_bytes
from fedzo_flwr.zo.engines.stream_model import StreamModel
from fedzo_flwr.zo.estimator import loss_differences
from fedzo_flwr.zo.settings import ZOSettings

RTOL, ATOL = 1e-4, 1e-6


@pytest.fixture(scope="module")
def cifar(data_dir):
    from fedzo_flwr.data import load_dataset, to_tensor

    data = load_dataset("cifar10", data_dir)

    def batch(start: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = to_tensor(data.x_train[start : start + size], "cifar10")
        return x, torch.tensor(data.y_train[start : start + size], dtype=torch.long)

    return batch


def masked(name: str, density: float, seed: int = 0):
    model = build_model(name, seed=seed + 1)
    mask = None
    if density < 1:
        gen = torch.Generator().manual_seed(seed)
        scores = {n: torch.rand(p.shape, generator=gen) for n, p in prunable_parameters(model)}
        mask = global_topk_mask(scores, density)
        apply_mask_(model, mask)
    return model, KeptSpace(model, mask), mask


CASES = [("lenet5", 1.0), ("lenet5", 0.1), ("lenet-gn", 0.3), ("resnet20", 1.0), ("resnet20", 0.2)]


@pytest.mark.parametrize(("name", "density"), CASES)
@pytest.mark.parametrize("scheme", ["forward", "central"])
def test_stream_matches_lean_and_fused(cifar, name, density, scheme):
    model, space, _ = masked(name, density)
    x, y = cifar(32, 6)
    settings = ZOSettings(k=5, sigma=1e-3, scheme=scheme)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    lean = loss_differences(model, space, x, y, 3, settings, engine="lean")
    fused = loss_differences(model, space, x, y, 3, settings, engine="fused", chunk_size=3)
    streamed = loss_differences(model, space, x, y, 3, settings, engine="stream")
    np.testing.assert_allclose(streamed.deltas, lean.deltas, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(streamed.deltas, fused.deltas, rtol=RTOL, atol=ATOL)
    assert np.abs(lean.deltas).max() > 1e-4  # a real signal
    assert streamed.base_loss == lean.base_loss  # the same weights, the same forward pass
    assert streamed.forward_passes == lean.forward_passes
    # The model's weights were read, never written, and its parameters are back in order.
    for n, t in model.state_dict().items():
        assert torch.equal(t, before[n]), n
    assert [n for n, _ in model.named_parameters()] == space.names
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())
    # Held sparse at rest, the same numbers bit for bit.
    sparse = StreamModel(model, space)
    at_rest = sparse.loss_differences(x, y, DirectionGenerator(space.sizes, 3), settings)
    np.testing.assert_array_equal(at_rest.deltas, streamed.deltas)
    assert at_rest.base_loss == streamed.base_loss


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_every_kept_coordinate_is_perturbed_exactly_as_lean_does(cifar, monkeypatch, kind):
    # The weights each layer sees = expand(θ + σu_k): biases and GroupNorm terms included,
    # pruned entries exactly 0, bit-identical to lean's w + σu.
    model, space, mask = masked("lenet-gn", 0.3)
    theta = space.gather(model)
    settings = ZOSettings(k=2, sigma=0.01, directions=kind)
    direction = DirectionGenerator(space.sizes, 4, kind).direction(1)
    expected = space.expand(torch.add(theta, direction, alpha=0.01))
    names = {id(m): path for path, m in model.named_modules()}
    seen: dict[str, torch.Tensor] = {}
    original = stream._Streamer.hook

    def spy(self, module, args):
        original(self, module, args)
        if self.generator is not None and self.k == 1:
            for slot in self.by_module[id(module)]:
                seen[f"{names[id(module)]}.{slot.attr}"] = module.__dict__[slot.attr].clone()

    monkeypatch.setattr(stream._Streamer, "hook", spy)
    loss_differences(model, space, *cifar(0, 4), 4, settings, engine="stream")
    assert set(seen) == set(space.names)
    for name, weights in seen.items():
        assert torch.equal(weights, expected[name]), name
        if mask is not None and name in mask:
            assert torch.count_nonzero(weights[~mask[name]]) == 0


@pytest.mark.parametrize(("name", "density"), [("lenet5", 0.1), ("resnet20", 0.2)])
def test_micro_batches_give_the_whole_batch_loss(cifar, name, density):
    model, space, _ = masked(name, density)
    x, y = cifar(100, 20)
    with torch.no_grad():
        whole = float(batch_loss(model(x), y))
        assert micro_batch_loss(model, x, y, 0) == whole
        assert micro_batch_loss(model, x, y, 20) == whole
        for micro in (1, 3, 8):
            assert micro_batch_loss(model, x, y, micro) == pytest.approx(whole, rel=1e-6)
    settings = ZOSettings(k=4, sigma=1e-3)
    lean = loss_differences(model, space, x, y, 9, settings, engine="lean")
    micro = loss_differences(model, space, x, y, 9, settings, engine="stream", micro_batch=7)
    np.testing.assert_allclose(micro.deltas, lean.deltas, rtol=RTOL, atol=ATOL)
    assert micro.base_loss == pytest.approx(lean.base_loss, rel=1e-6)


def test_stream_model_holds_no_dense_weights_and_infers_like_the_model(cifar):
    model, space, mask = masked("lenet5", 0.1)
    assert mask is not None
    x, _ = cifar(0, 5)
    with torch.no_grad():
        reference = model(x)
    kept = space.gather(model)
    sparse = StreamModel(model, space)
    assert list(model.parameters()) == []  # every trainable tensor left the model
    assert torch.equal(sparse.values, kept)
    rest = sparse.at_rest_bytes()
    assert rest["values"] == 4 * space.dim
    assert rest["bitmaps"] == sum((m.numel() + 7) // 8 for m in mask.values())
    with torch.no_grad():
        assert torch.equal(sparse(x), reference)
        sparse.load_values_(torch.zeros(space.dim))
        assert torch.equal(sparse(x), sparse(x[:1]).expand(5, -1))  # all weights 0
    with pytest.raises(ValueError, match="shape"):
        sparse.load_values_(torch.zeros(3))


def test_workspace_is_the_largest_layer_not_the_model():
    model, space, _ = masked("resnet20", 0.1)
    largest = max(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))
    largest_kept = max(space.sizes)
    # resnet20's largest conv (36,864 weights) unpacks in one piece of 8 * 4,608 bytes.
    assert largest <= 8 * stream.UNPACK_BYTES
    packed = stream_workspace_bytes(model, space, packed=True)
    assert packed == 4 * largest + 4 * largest_kept + 8 * ((largest + 7) // 8)
    # A plain model: index tables instead of bitmaps, and one more buffer of kept values.
    assert stream_workspace_bytes(model, space, packed=False) == 4 * largest + 8 * largest_kept


def test_bitmaps_unpack_in_pieces(cifar, monkeypatch):
    # Pieces smaller than a layer give the same weights (resnet20: several pieces per conv).
    model, space, _ = masked("resnet20", 0.2)
    x, y = cifar(0, 3)
    settings = ZOSettings(k=2, sigma=1e-3)
    whole = StreamModel(*masked("resnet20", 0.2)[:2])
    monkeypatch.setattr(stream, "UNPACK_BYTES", 64)
    pieces = StreamModel(model, space)
    assert pieces._streamer.sizes()[3] == 8 * 64
    generator = DirectionGenerator(space.sizes, 5)
    a = whole.loss_differences(x, y, generator, settings)
    b = pieces.loss_differences(x, y, generator, settings)
    np.testing.assert_array_equal(a.deltas, b.deltas)
    with torch.no_grad():
        assert torch.equal(whole(x), pieces(x))


def test_bitmaps_round_trip():
    gen = torch.Generator().manual_seed(1)
    m = torch.rand(3, 5, 7, generator=gen) > 0.6
    packed = pack_bits(m)
    assert packed.dtype == torch.uint8 and packed.numel() == (105 + 7) // 8
    out = torch.empty(8 * packed.numel(), dtype=torch.uint8)
    assert torch.equal(unpack_bits(packed, 105, out), m.reshape(-1))


class Shared(nn.Module):
    """A parameter used outside its layer's call: the stream engine must refuse it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.scale = nn.Parameter(torch.ones(1))
        self.fc = nn.Linear(4 * 30 * 30, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc((self.conv(x) * self.scale).flatten(1))


def test_unsupported_model_falls_back_to_lean(cifar, caplog):
    model = Shared()
    space = KeptSpace(model)
    x, y = cifar(0, 4)
    settings = ZOSettings(k=3, sigma=1e-3)
    with pytest.raises(stream.UnsupportedModel, match="scale"):
        StreamModel(model, space)
    lean = loss_differences(model, space, x, y, 1, settings, engine="lean")
    with caplog.at_level("WARNING"):
        fallback = loss_differences(model, space, x, y, 1, settings, engine="stream")
    np.testing.assert_array_equal(fallback.deltas, lean.deltas)
    assert "stream engine unavailable" in caplog.text


def test_micro_batch_is_validated():
    model, space, _ = masked("lenet5", 1.0)
    x, y = torch.zeros(2, 3, 32, 32), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="micro_batch"):
        loss_differences(model, space, x, y, 0, ZOSettings(k=1, sigma=1e-3), micro_batch=-1)
