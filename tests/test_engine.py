"""The ``fused`` engine (direction-batched forward) against the ``lean`` reference.

Real CIFAR-10 batches, real models; small K so the whole file runs in seconds.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import fx, nn
from torch.nn import functional as F

from fedzo_flwr.models import build_model
from fedzo_flwr.sparse.mask import apply_mask_, global_topk_mask, prunable_parameters
from fedzo_flwr.sparse.space import KeptSpace
from fedzo_flwr.zo.directions import DirectionGenerator
from fedzo_flwr.zo.engines import fused as fast_engine
from fedzo_flwr.zo.engines.fused import engine as fused_step
from fedzo_flwr.zo.estimator import ENGINES, batch_loss, loss_differences
from fedzo_flwr.zo.local import run_local_steps
from fedzo_flwr.zo.settings import ZOSettings

RTOL, ATOL = 1e-4, 1e-6


@pytest.fixture(autouse=True)
def no_known_failures(monkeypatch):
    # Each test starts with an empty cache of untranslatable model kinds.
    monkeypatch.setattr(fused_step, "_FAILURES", OrderedDict())


@pytest.fixture(scope="module")
def cifar(data_dir):
    from fedzo_flwr.data import load_dataset, to_tensor

    data = load_dataset("cifar10", data_dir)

    def batch(start: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = to_tensor(data.x_train[start : start + size], "cifar10")
        return x, torch.tensor(data.y_train[start : start + size], dtype=torch.long)

    return batch


def masked(model: nn.Module, density: float, seed: int = 0):
    mask = None
    if density < 1:
        gen = torch.Generator().manual_seed(seed)
        scores = {n: torch.rand(p.shape, generator=gen) for n, p in prunable_parameters(model)}
        mask = global_topk_mask(scores, density)
        apply_mask_(model, mask)
    return model, KeptSpace(model, mask), mask


def both(model, space, x, y, settings, seed=7, **kwargs):
    # Raises UnsupportedModel if the fused path would silently fall back to lean.
    fast_engine.get_plan(model, space).verify(model, space, x)
    lean = loss_differences(model, space, x, y, seed, settings, engine="lean")
    fused = loss_differences(model, space, x, y, seed, settings, engine="fused", **kwargs)
    return lean, fused


# ------------------------------------------------------------------- same numbers as lean


@pytest.mark.parametrize(
    ("name", "density", "k", "batch"),
    [("lenet5", 1.0, 24, 16), ("lenet5", 0.1, 24, 16), ("lenet-gn", 0.3, 12, 8)],
)
@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
@pytest.mark.parametrize("scheme", ["forward", "central"])
def test_fused_matches_lean(cifar, name, density, k, batch, kind, scheme):
    model, space, _ = masked(build_model(name, seed=2), density)
    x, y = cifar(64, batch)
    settings = ZOSettings(k=k, sigma=1e-3, scheme=scheme, directions=kind)
    lean, fused = both(model, space, x, y, settings, chunk_size=5)
    np.testing.assert_allclose(fused.deltas, lean.deltas, rtol=RTOL, atol=ATOL)
    assert np.abs(lean.deltas).max() > 1e-4  # a real signal, not zeros
    assert fused.base_loss == lean.base_loss  # the same forward pass of the model
    assert fused.forward_passes == lean.forward_passes
    assert fused.deltas.dtype == np.float32 and fused.deltas.shape == (k,)


@pytest.mark.parametrize("scheme", ["forward", "central"])
def test_fused_matches_lean_on_resnet20(cifar, scheme):
    # GroupNorm with affine terms, residual adds, the strided/zero-padded shortcut.
    model, space, _ = masked(build_model("resnet20", seed=3), 0.5)
    x, y = cifar(0, 4)
    settings = ZOSettings(k=4, sigma=1e-3, scheme=scheme)
    lean, fused = both(model, space, x, y, settings, chunk_size=3)
    np.testing.assert_allclose(fused.deltas, lean.deltas, rtol=RTOL, atol=ATOL)


class Zoo(nn.Module):
    """Uses most translation rules: BatchNorm (eval), ReLU6 before max-pool, functional ops,
    a strided slice, channel padding, a residual add with a shared tensor, view/size/mean."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU6()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.norm = nn.GroupNorm(2, 12)
        self.fc = nn.Linear(12 * 4 * 4, 16)
        self.head = nn.Linear(16, 10)
        self.frozen = nn.Linear(10, 10)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.act(self.bn(self.conv1(x))))
        h = F.hardswish(self.conv2(h)) + h * 0.5
        h = F.pad(h[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2))
        h = self.norm(h)
        h = F.avg_pool2d(h, 2)
        h = h.view(h.size(0), -1)
        h = torch.tanh(self.fc(h)) - h.mean(1, keepdim=True)
        return self.frozen(self.head(h))


def test_fused_translates_a_zoo_of_layers(cifar):
    torch.manual_seed(0)
    model = Zoo().eval()
    model.bn.running_mean.uniform_(-0.1, 0.1)
    model.bn.running_var.uniform_(0.5, 2.0)
    _, space, _ = masked(model, 0.5)
    x, y = cifar(8, 8)
    plan = fast_engine.get_plan(model, space)
    assert plan.pools_moved == 1  # ReLU6 is monotone: it runs after the pool
    settings = ZOSettings(k=7, sigma=1e-3, scheme="central")
    lean, fused = both(model, space, x, y, settings, chunk_size=3)
    np.testing.assert_allclose(fused.deltas, lean.deltas, rtol=RTOL, atol=ATOL)
    assert np.abs(lean.deltas).max() > 1e-5


def test_activation_moves_after_pool_only_when_monotone():
    lenet5, lenet_gn = build_model("lenet5"), build_model("lenet-gn")
    assert fast_engine.get_plan(lenet5, KeptSpace(lenet5)).pools_moved == 2  # ReLU
    assert fast_engine.get_plan(lenet_gn, KeptSpace(lenet_gn)).pools_moved == 0  # Hardswish


# ------------------------------------------------------------- weights, masks, chunking


def test_weights_bit_identical_and_pruned_weights_zero_in_every_forward(cifar, monkeypatch):
    model, space, mask = masked(build_model("lenet5", seed=4), 0.2)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    seen: list[tuple[str, torch.Tensor]] = []
    names = {id(p): n for n, p in model.named_parameters()}
    original = fast_engine.ChunkWeights.get

    def spy(self, p):
        built = original(self, p)
        if built is not None:
            seen.append((names[id(p)], built.clone()))
        return built

    monkeypatch.setattr(fast_engine.ChunkWeights, "get", spy)
    x, y = cifar(0, 8)
    settings = ZOSettings(k=9, sigma=1e-2, scheme="central")
    loss_differences(model, space, x, y, 5, settings, engine="fused", chunk_size=4)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert {n for n, _ in seen} == set(space.names)
    for name, copies in seen:
        if name in mask:
            assert torch.count_nonzero(copies[:, ~mask[name]]) == 0, name
            kept = copies[:, mask[name]]
            assert torch.count_nonzero(kept - before[name][mask[name]]) > 0, name


def test_perturbed_weights_are_bit_identical_to_lean(cifar, monkeypatch):
    # The fused engine builds w + σu exactly as lean does (torch.add with alpha).
    model, space, _ = masked(build_model("lenet5", seed=5), 0.5)
    theta = space.gather(model)
    direction = DirectionGenerator(space.sizes, 11).direction(2)
    rows = {}
    original = fast_engine.ChunkWeights.get

    def spy(self, p):
        built = original(self, p)
        rows[id(p)] = built
        return built

    monkeypatch.setattr(fast_engine.ChunkWeights, "get", spy)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one worker, one chunk of 3: row 2 is direction 2
    try:
        settings = ZOSettings(k=3, sigma=0.01)
        loss_differences(model, space, *cifar(0, 4), 11, settings, "fused", chunk_size=3)
    finally:
        torch.set_num_threads(threads)
    expected = space.expand(torch.add(theta, direction, alpha=0.01))
    for name, p in model.named_parameters():
        assert torch.equal(rows[id(p)][2], expected[name]), name


def test_chunk_from_memory_budget(cifar):
    model, space, _ = masked(build_model("lenet5", seed=6), 0.1)
    x, y = cifar(100, 16)
    settings = ZOSettings(k=40, sigma=1e-3)
    chunks = [
        fast_engine.planned_chunk(model, space, x, settings, budget) for budget in (0.01, 2, 8, 1e6)
    ]
    assert chunks[0] == 1 and chunks[-1] == 40
    assert chunks == sorted(chunks) and len(set(chunks)) == 4
    central = fast_engine.planned_chunk(model, space, x, ZOSettings(40, 1e-3, "central"), 8)
    assert central == pytest.approx(chunks[2] / 2, abs=1)
    two_workers = fast_engine.planned_chunk(model, space, x, settings, 8, workers=2)
    assert two_workers == pytest.approx(chunks[2] / 2, abs=1)
    default = fast_engine.planned_chunk(model, space, x, settings)
    assert default == fast_engine.planned_chunk(
        model, space, x, settings, fast_engine.DEFAULT_MEMORY_BUDGET_MB
    )
    results = [
        loss_differences(model, space, x, y, 3, settings, "fused", memory_budget_mb=b).deltas
        for b in (0.01, 2, 8, 1e6)
    ]
    explicit = loss_differences(model, space, x, y, 3, settings, "fused", chunk_size=7).deltas
    for deltas in [*results[1:], explicit]:
        np.testing.assert_allclose(deltas, results[0], rtol=1e-5, atol=1e-7)


def test_parallel_workers_give_the_same_deltas_and_restore_threads(cifar):
    model, space, _ = masked(build_model("lenet-gn", seed=8), 0.5)
    x, y = cifar(200, 8)
    settings = ZOSettings(k=11, sigma=1e-3, scheme="central")
    threads = torch.get_num_threads()
    results = []
    for workers in (1, 2, 3):
        gen = DirectionGenerator(space.sizes, 4)
        deltas, _, chunk = fast_engine.fused_loss_differences(
            model, space, x, y, gen, settings, batch_loss, 2, None, workers
        )
        assert chunk == 2 and torch.get_num_threads() == threads
        results.append(deltas)
    lean = loss_differences(model, space, x, y, 4, settings, engine="lean").deltas
    for deltas in results:
        np.testing.assert_allclose(deltas, lean, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(results[1], results[0], rtol=1e-6, atol=1e-8)


def test_fused_step_never_changes_torch_threads(cifar):
    # The caller owns torch's thread count. A thread started while the step runs (here: from
    # the loss function, which runs on the workers) must see the caller's setting, and so
    # must the caller afterwards.
    model, space, _ = masked(build_model("lenet5", seed=9), 0.5)
    x, y = cifar(300, 4)
    settings = ZOSettings(k=6, sigma=1e-3)
    before = torch.get_num_threads()
    seen: list[int] = []

    def loss_fn(logits, targets):
        probe = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        probe.start()
        probe.join()
        return batch_loss(logits, targets)

    torch.set_num_threads(2)
    try:
        for workers in (None, 1, 2):
            seen.clear()
            gen = DirectionGenerator(space.sizes, 4)
            fast_engine.fused_loss_differences(
                model, space, x, y, gen, settings, loss_fn, 2, None, workers
            )
            assert torch.get_num_threads() == 2
            chunks = fast_engine.balanced_chunks(6, 2, workers or 1)
            assert seen == [2] * (1 + len(chunks)), workers  # the base loss, then every chunk
    finally:
        torch.set_num_threads(before)


def test_untranslatable_model_is_traced_and_warned_once(cifar, caplog, monkeypatch):
    # A simulation builds a new model object every round and takes several local steps: the
    # failure is cached per model kind, so the model is traced once and the warning logged once.
    traces = []
    trace = fx.symbolic_trace
    monkeypatch.setattr(fx, "symbolic_trace", lambda m: traces.append(m) or trace(m))
    x, y = cifar(0, 4)
    settings = ZOSettings(k=3, sigma=1e-3)

    def fresh() -> nn.Module:
        torch.manual_seed(0)
        return WithLayerNorm().eval()

    models = [fresh() for _ in range(3)]
    with caplog.at_level(logging.WARNING):
        for model in models:
            space = KeptSpace(model)
            steps, _ = run_local_steps(
                model, space, lambda _: (x, y), [1, 2], settings, 0.01, engine="fused"
            )
    warnings = [r for r in caplog.records if "fused engine unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "LayerNorm" in warnings[0].getMessage()
    assert len(traces) == 1
    reference = fresh()
    lean, _ = run_local_steps(
        reference, KeptSpace(reference), lambda _: (x, y), [1, 2], settings, 0.01
    )
    for got, want in zip(steps, lean):
        np.testing.assert_array_equal(got.deltas, want.deltas)
    # Another kind (different shapes) is a new failure: traced and reported once more.
    other = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10), nn.LayerNorm(10)).eval()
    with caplog.at_level(logging.WARNING):
        loss_differences(other, KeptSpace(other), x, y, 1, settings, engine="fused")
    assert len(traces) == 2
    assert sum("fused engine unavailable" in r.getMessage() for r in caplog.records) == 2


@pytest.mark.parametrize(
    ("k", "chunk", "workers", "sizes"),
    [
        (200, 16, 2, [15] * 4 + [14] * 10),  # 14 chunks (7 per worker), not 12x16 + 8
        (200, 8, 1, [8] * 25),
        (200, 8, 2, [8] * 18 + [7] * 8),  # 26 chunks: an even split between two workers
        (10, 4, 3, [4, 3, 3]),
        (5, 100, 8, [1] * 5),  # never more chunks than directions
    ],
)
def test_balanced_chunks_cover_k_evenly(k, chunk, workers, sizes):
    bounds = fast_engine.balanced_chunks(k, chunk, workers)
    assert [stop - start for start, stop in bounds] == sizes
    assert bounds[0][0] == 0 and bounds[-1][1] == k
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    with pytest.raises(ValueError, match="chunk"):
        fast_engine.balanced_chunks(k, 0, workers)


def test_chunk_for_budget_arithmetic():
    assert fast_engine.chunk_for_budget(2**20, 1, 10.0, 100) == 10
    assert fast_engine.chunk_for_budget(2**20, 2, 10.0, 100) == 5
    assert fast_engine.chunk_for_budget(2**20, 1, 0.5, 100) == 1
    assert fast_engine.chunk_for_budget(2**20, 1, 1e9, 100) == 100


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_threaded_direction_blocks_are_bit_identical(kind):
    gen = DirectionGenerator([1000, 0, 2001], 99, kind)
    single = gen.block(5, 22, threads=1)
    for threads in (2, 3, 17, 40):
        assert torch.equal(gen.block(5, 22, threads=threads), single)
    assert torch.equal(single[4], gen.direction(9))
    assert gen.block(3, 3, threads=2).shape == (0, 3001)


# --------------------------------------------------------------------- fallback, errors


class WithLayerNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, 10)
        self.norm = nn.LayerNorm(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc(torch.flatten(x, 1)))


def test_untranslatable_model_falls_back_to_lean(cifar, caplog):
    torch.manual_seed(0)
    model = WithLayerNorm().eval()
    space = KeptSpace(model)
    x, y = cifar(0, 4)
    with pytest.raises(fast_engine.UnsupportedModel, match="LayerNorm"):
        fast_engine.FusedPlan(model, space)
    settings = ZOSettings(k=3, sigma=1e-3)
    with caplog.at_level(logging.WARNING):
        fused = loss_differences(model, space, x, y, 1, settings, engine="fused")
    assert "lean" in caplog.text
    lean = loss_differences(model, space, x, y, 1, settings, engine="lean")
    np.testing.assert_array_equal(fused.deltas, lean.deltas)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"engine": "turbo"}, "engine"),
        ({"engine": "fused", "chunk_size": 0}, "chunk_size"),
        ({"engine": "fused", "chunk_size": -3}, "chunk_size"),
        ({"engine": "fused", "chunk_size": 2.5}, "chunk_size"),
        ({"engine": "batched", "chunk_size": True}, "chunk_size"),
        ({"engine": "fused", "memory_budget_mb": 0}, "memory_budget_mb"),
        ({"engine": "fused", "memory_budget_mb": -1.0}, "memory_budget_mb"),
        ({"engine": "fused", "memory_budget_mb": float("nan")}, "memory_budget_mb"),
        ({"engine": "fused", "memory_budget_mb": float("inf")}, "memory_budget_mb"),
        ({"engine": "fused", "memory_budget_mb": "64"}, "memory_budget_mb"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, match):
    model = build_model("lenet5")
    space = KeptSpace(model)
    x, y = torch.zeros(2, 3, 32, 32), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=match):
        loss_differences(model, space, x, y, 0, ZOSettings(k=2, sigma=1e-3), **kwargs)


def test_bad_block_threads_raise():
    gen = DirectionGenerator([10], 1)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="threads"):
            gen.block(0, 4, threads=bad)


def test_engines_listed():
    assert set(ENGINES) == {"lean", "batched", "fused", "stream"}
