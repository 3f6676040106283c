from __future__ import annotations

import copy
import dataclasses
import inspect
import itertools
import logging
import math

import pytest
import torch
from torch import nn

import fedzo_flwr.pruning.client as federated
import fedzo_flwr.pruning.common as common
from fedzo_flwr.config import ConfigError, RunConfig
from fedzo_flwr.models import build_model
from fedzo_flwr.pruning import (
    PRUNERS,
    NTKSAPConfig,
    derive_seed,
    gaussian_inputs,
    local_ntk_mask,
    ntk_mask_gradients,
    ntk_sap_mask,
    prune,
    scoring_seed,
    snip_mask,
    synflow_mask,
)
from fedzo_flwr.pruning.ntk_sap import scores_from_gradients
from fedzo_flwr.sparse.mask import (
    global_topk_mask,
    kept_count,
    kept_target,
    layer_densities,
    prunable_parameters,
    total_count,
    validate_mask,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Many tiny ops: with 2 intra-op threads on a 2-core machine shared with other processes,
    # OpenMP barriers make these tests 10-30x slower. Restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Small settings where the property under test does not depend on T, R or the batch count.
FAST = NTKSAPConfig(iterations=3, repeats=1, prune_samples=16, batch_size=16)


def _data_batches(
    n: int = 2, size: int = 8, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.rand((size, 3, 32, 32), generator=g), torch.randint(0, 10, (size,), generator=g))
        for _ in range(n)
    ]


def _client_batches(clients: int = 2, seed: int = 0) -> list[list[torch.Tensor]]:
    return [[x for x, _ in _data_batches(1, 8, seed + c)] for c in range(clients)]


def _run(method: str, model: nn.Module, name: str, density: float, seed: int = 0):
    return prune(
        method,
        model,
        name,
        density,
        seed=seed,
        data_batches=_data_batches(),
        client_batches=_client_batches(),
        ntk_config=FAST,
    )


def _masks_equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------
# exact density, validity, no collapse, weights untouched


@pytest.mark.parametrize("density", [0.5, 0.1, 0.01])
@pytest.mark.parametrize("method", PRUNERS)
def test_exact_density_valid_and_weights_untouched(method: str, density: float) -> None:
    model = build_model("lenet5", seed=3)
    model.train()  # the pruner must not change the mode either
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mask = _run(method, model, "lenet5", density)
    validate_mask(model, mask)
    n = total_count(mask)
    assert n == sum(p.numel() for _, p in prunable_parameters(model))
    assert kept_count(mask) == math.ceil(density * n) == kept_target(density, n)
    assert all(bool(m.any()) for m in mask.values())
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("method", PRUNERS)
def test_density_one_is_dense(method: str) -> None:
    model = build_model("lenet-gn")
    mask = _run(method, model, "lenet-gn", 1.0)
    assert kept_count(mask) == total_count(mask)


@pytest.mark.parametrize("density", [0, 0.0, 1.5, -1, float("nan")])
@pytest.mark.parametrize("method", PRUNERS)
def test_bad_density_raises_naming_density(method: str, density: float) -> None:
    with pytest.raises(ValueError, match="density"):
        _run(method, build_model("lenet-gn"), "lenet-gn", density)


def test_resnet20_ntk_very_sparse_has_no_empty_tensor() -> None:
    model = build_model("resnet20")
    cfg = NTKSAPConfig(iterations=2, repeats=1, prune_samples=8, batch_size=8)
    mask = prune("ntk", model, "resnet20", 0.01, ntk_config=cfg)
    assert kept_count(mask) == kept_target(0.01, total_count(mask))
    assert len(mask) == 20
    assert all(int(m.sum()) >= 1 for m in mask.values())


# --------------------------------------------------------------------------------------------
# data-free property


def test_ntk_sap_is_data_free(monkeypatch: pytest.MonkeyPatch) -> None:
    # 1. The API cannot receive data.
    assert list(inspect.signature(ntk_sap_mask).parameters) == [
        "model",
        "model_name",
        "density",
        "config",
        "seed",
    ]

    # 2. Any dataset / loader access fails loudly.
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("a dataset was accessed")

    monkeypatch.setattr(torch.utils.data.DataLoader, "__iter__", boom)
    monkeypatch.setattr(torch.utils.data.Dataset, "__getitem__", boom)

    # 3. Every input the network ever sees is the seeded N(0, I) stream: record them with a
    # forward pre-hook (the hook travels with the pruner's private deep copy).
    seen: list[torch.Tensor] = []
    model = build_model("lenet-gn")
    model.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    cfg = NTKSAPConfig(iterations=3, repeats=2, prune_samples=40, batch_size=16)
    ntk_sap_mask(model, "lenet-gn", 0.1, cfg, seed=5)

    stream = gaussian_inputs(cfg, seed=5)
    expected = [x for _ in range(cfg.iterations * cfg.repeats) for x in stream]
    assert [x.shape[0] for x in expected[:3]] == [16, 16, 8]
    assert len(seen) == 2 * len(expected)  # clean and perturbed pass per batch
    for i, x in enumerate(expected):
        assert torch.equal(seen[2 * i], x) and torch.equal(seen[2 * i + 1], x)
    flat = torch.cat([x.reshape(-1) for x in seen])
    assert abs(float(flat.mean())) < 0.01 and abs(float(flat.std()) - 1) < 0.01
    assert abs(float((flat**3).mean())) < 0.02  # symmetric, unlike pixel data in [0, 1]


def test_data_free_probe_detects_data_use() -> None:
    # Negative control for the probe above: the same hook does see client data in ntk-local.
    seen: list[torch.Tensor] = []
    model = build_model("lenet-gn")
    model.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    data = torch.full((4, 3, 32, 32), 0.5)
    prune("ntk-local", model, "lenet-gn", 0.5, client_batches=[[data]], ntk_config=FAST)
    assert seen and all(torch.equal(x, data) for x in seen)


# --------------------------------------------------------------------------------------------
# seeds


@pytest.mark.parametrize("method", ["ntk", "ntk-local", "random"])
def test_same_seed_same_mask_different_seed_different_mask(method: str) -> None:
    model = build_model("lenet-gn")
    a = _run(method, model, "lenet-gn", 0.1, seed=1)
    b = _run(method, model, "lenet-gn", 0.1, seed=1)
    c = _run(method, model, "lenet-gn", 0.1, seed=2)
    assert _masks_equal(a, b)
    assert not _masks_equal(a, c)


def _with_params_of(model: nn.Module, donor: nn.Module, prunable: bool) -> nn.Module:
    """``model`` with its prunable weights (or all its other parameters) copied from ``donor``."""
    names = {n for n, _ in prunable_parameters(model)}
    out = copy.deepcopy(model)
    with torch.no_grad():
        for (n, p), q in zip(out.named_parameters(), donor.parameters()):
            if (n in names) == prunable:
                p.copy_(q)
    return out


def test_ntk_mask_ignores_initial_prunable_weights_and_uses_biases() -> None:
    # theta_b redraws the prunable weights for every batch, so the model's own weights do not
    # matter; by default (reinit="weights", the reference's behaviour) its biases do; with
    # reinit="all" nothing but the architecture matters.
    base, other = build_model("lenet5", seed=0), build_model("lenet5", seed=9)
    a = ntk_sap_mask(base, "lenet5", 0.1, FAST, seed=4)
    assert _masks_equal(a, ntk_sap_mask(_with_params_of(base, other, True), "lenet5", 0.1, FAST, 4))
    assert not _masks_equal(
        a, ntk_sap_mask(_with_params_of(base, other, False), "lenet5", 0.1, FAST, seed=4)
    )
    legacy = dataclasses.replace(FAST, reinit="all")
    assert _masks_equal(
        ntk_sap_mask(base, "lenet5", 0.1, legacy, seed=4),
        ntk_sap_mask(other, "lenet5", 0.1, legacy, seed=4),
    )


# --------------------------------------------------------------------------------------------
# ground truth for the NTK-SAP mask gradient


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 3)
        self.fc2 = nn.Linear(3, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


@torch.no_grad()
def _tiny_reinit(module: nn.Module, generator: torch.Generator) -> None:
    for p in module.parameters():
        p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype))


def test_ntk_mask_gradient_matches_finite_differences() -> None:
    torch.manual_seed(0)  # irrelevant to the pruner; only fixes the test model's construction
    model = _Tiny().double()
    eps = 0.1
    mask = {
        "fc1.weight": torch.tensor([[1, 0, 1, 1], [1, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.bool),
        "fc2.weight": torch.tensor([[1, 1, 0], [0, 1, 1]], dtype=torch.bool),
    }
    g = torch.Generator().manual_seed(11)
    batches = [torch.randn((5, 4), generator=g, dtype=torch.float64) for _ in range(2)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = ntk_mask_gradients(
        model,
        mask,
        batches,
        reinit=_tiny_reinit,
        generator=torch.Generator().manual_seed(7),
        epsilon=eps,
        passes=2,
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    # Independent reconstruction: replay the documented draw order (per batch: all parameters
    # via reinit, then xi per prunable weight) and write the objective out explicitly.
    replay = torch.Generator().manual_seed(7)
    draws = []
    for _ in range(2):  # passes
        for x in batches:
            w1, b1, w2 = (
                torch.randn(s, generator=replay, dtype=torch.float64)
                for s in [(3, 4), (3,), (2, 3)]
            )
            xi1 = torch.randn((3, 4), generator=replay, dtype=torch.float64)
            xi2 = torch.randn((2, 3), generator=replay, dtype=torch.float64)
            draws.append((x, w1, b1, w2, xi1, xi2))

    def objective(m1: torch.Tensor, m2: torch.Tensor) -> float:
        total = 0.0
        for x, w1, b1, w2, xi1, xi2 in draws:
            clean = torch.tanh(x @ (w1 * m1).T + b1) @ (w2 * m2).T
            pert = torch.tanh(x @ ((w1 + eps * xi1) * m1).T + b1) @ ((w2 + eps * xi2) * m2).T
            total += float(((clean - pert) ** 2).sum())
        return total

    m1 = mask["fc1.weight"].double()
    m2 = mask["fc2.weight"].double()
    h = 1e-6
    for name, base in (("fc1.weight", m1), ("fc2.weight", m2)):
        fd = torch.zeros_like(base)
        for idx in range(base.numel()):
            plus, minus = base.clone(), base.clone()
            plus.view(-1)[idx] += h
            minus.view(-1)[idx] -= h
            args_p = (plus, m2) if name == "fc1.weight" else (m1, plus)
            args_m = (minus, m2) if name == "fc1.weight" else (m1, minus)
            fd.view(-1)[idx] = (objective(*args_p) - objective(*args_m)) / (2 * h)
        assert fd.abs().max() > 1e-3  # non-trivial
        torch.testing.assert_close(got[name], fd, rtol=1e-6, atol=1e-9)
        # pruned entries have a gradient but score exactly 0
        assert bool((got[name][~mask[name]] != 0).any())

    scores = scores_from_gradients(got, mask)
    for name in mask:
        assert bool((scores[name][~mask[name]] == 0).all())
        torch.testing.assert_close(scores[name][mask[name]], got[name][mask[name]].abs())


def test_snip_matches_plain_autograd() -> None:
    model = build_model("lenet5", seed=1)
    batches = _data_batches(2)
    ref = build_model("lenet5", seed=1)
    loss = sum(nn.functional.cross_entropy(ref(x), y) for x, y in batches)
    loss.backward()
    scores = {n: (p.grad * p).abs() for n, p in prunable_parameters(ref)}
    assert _masks_equal(snip_mask(model, 0.1, batches), global_topk_mask(scores, 0.1))
    with pytest.raises(ValueError, match="needs data"):
        snip_mask(model, 0.1, [])


def test_synflow_matches_closed_form_on_linear_chain() -> None:
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 2, bias=False))
    w1 = model[0].weight.detach().double().abs()
    w2 = model[2].weight.detach().double().abs()
    # R = 1^T |W2| |W1| 1, so score(W1_ji) = |W1_ji| * sum_k |W2_kj|
    # and score(W2_kj) = |W2_kj| * sum_i |W1_ji|
    scores = {
        "0.weight": w1 * w2.sum(0)[:, None],
        "2.weight": w2 * w1.sum(1)[None, :],
    }
    got = synflow_mask(model, 0.4, iterations=1, input_shape=(3,))
    assert _masks_equal(got, global_topk_mask(scores, 0.4))


# --------------------------------------------------------------------------------------------
# schedule, structure of the masks


def test_iterative_schedule_is_nested_and_exponential(monkeypatch: pytest.MonkeyPatch) -> None:
    masks = []

    def spy(scores, density):
        out = global_topk_mask(scores, density)
        masks.append(out)
        return out

    monkeypatch.setattr(common, "global_topk_mask", spy)
    model = build_model("lenet-gn")
    cfg = NTKSAPConfig(iterations=4, repeats=1, prune_samples=8, batch_size=8)
    final = ntk_sap_mask(model, "lenet-gn", 0.05, cfg)
    n = total_count(final)
    assert [kept_count(m) for m in masks] == [kept_target(0.05 ** (t / 4), n) for t in (1, 2, 3, 4)]
    for prev, nxt in itertools.pairwise(masks):
        assert all(bool((nxt[k] <= prev[k]).all()) for k in prev)  # pruned stay pruned
    assert _masks_equal(masks[-1], final)


def test_ntk_and_magnitude_differ_from_random_and_ntk_is_layer_nonuniform() -> None:
    model = build_model("lenet-gn")
    cfg = NTKSAPConfig(iterations=5, repeats=1, prune_samples=32, batch_size=32)
    ntk = prune("ntk", model, "lenet-gn", 0.1, ntk_config=cfg)
    mag = prune("magnitude", model, "lenet-gn", 0.1)
    rnd = prune("random", model, "lenet-gn", 0.1)
    assert not _masks_equal(ntk, rnd) and not _masks_equal(mag, rnd)
    overlap = sum(int((ntk[k] & rnd[k]).sum()) for k in ntk) / kept_count(ntk)
    assert overlap < 0.5  # chance level is ~0.1
    dens = list(layer_densities(ntk).values())
    assert max(dens) - min(dens) > 0.05
    rdens = list(layer_densities(rnd).values())
    assert max(rdens) - min(rdens) < 0.03


def test_progress_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="fedzo_flwr.pruning"):
        ntk_sap_mask(build_model("lenet-gn"), "lenet-gn", 0.5, FAST)
    text = caplog.text
    assert "iteration 1/3" in text and "iteration 3/3" in text and "density 0.5" in text


# --------------------------------------------------------------------------------------------
# federated form


def test_one_gaussian_client_equals_data_free_server() -> None:
    model = build_model("lenet-gn")
    cfg = NTKSAPConfig(iterations=3, repeats=2, prune_samples=24, batch_size=16)
    server = ntk_sap_mask(model, "lenet-gn", 0.1, cfg, seed=8)
    client = local_ntk_mask(model, "lenet-gn", 0.1, [gaussian_inputs(cfg, seed=8)], None, cfg, 8)
    assert _masks_equal(server, client)
    weighted = local_ntk_mask(model, "lenet-gn", 0.1, [gaussian_inputs(cfg, seed=8)], [3.0], cfg, 8)
    assert _masks_equal(server, weighted)  # one client's weight normalises to 1
    # ... and a different input stream changes it (the equality is not vacuous)
    other = local_ntk_mask(model, "lenet-gn", 0.1, [gaussian_inputs(cfg, seed=9)], None, cfg, 8)
    assert not _masks_equal(server, other)


def test_server_sums_signed_client_gradients_weighted(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_model("lenet-gn")
    names = [n for n, _ in prunable_parameters(model)]
    g = torch.Generator().manual_seed(0)
    fake = [
        {n: torch.randn(p.shape, generator=g) for n, p in prunable_parameters(model)}
        for _ in range(2)
    ]
    calls: list[int] = []

    def fake_client(model, model_name, mask, batches, config, seed):
        c = batches[0]  # the "batches" carry the client index
        calls.append(c)
        return fake[c]

    seen = []

    def spy(scores, density):
        seen.append(scores)
        return global_topk_mask(scores, density)

    monkeypatch.setattr(federated, "client_ntk_gradients", fake_client)
    monkeypatch.setattr(common, "global_topk_mask", spy)
    cfg = NTKSAPConfig(iterations=1)
    local_ntk_mask(model, "lenet-gn", 0.3, [[0], [1]], [3.0, 1.0], cfg, seed=0)
    assert calls == [0, 1]
    for n in names:
        expected = (0.75 * fake[0][n] + 0.25 * fake[1][n]).abs().double()
        torch.testing.assert_close(seen[0][n], expected)


def test_zero_weight_client_is_ignored() -> None:
    model = build_model("lenet-gn")
    a, b = _client_batches(2)
    one = local_ntk_mask(model, "lenet-gn", 0.1, [a], None, FAST, seed=3)
    two = local_ntk_mask(model, "lenet-gn", 0.1, [a, b], [1.0, 0.0], FAST, seed=3)
    both = local_ntk_mask(model, "lenet-gn", 0.1, [a, b], None, FAST, seed=3)
    assert _masks_equal(one, two)
    assert not _masks_equal(one, both)


def test_federated_rejects_bad_inputs() -> None:
    model = build_model("lenet-gn")
    with pytest.raises(ValueError, match="at least one client"):
        local_ntk_mask(model, "lenet-gn", 0.1, [], None, FAST)
    with pytest.raises(ValueError, match="2 clients"):
        local_ntk_mask(model, "lenet-gn", 0.1, _client_batches(2), [1.0], FAST)
    with pytest.raises(ValueError, match="weights"):
        local_ntk_mask(model, "lenet-gn", 0.1, _client_batches(2), [1.0, -1.0], FAST)
    with pytest.raises(ValueError, match="not all 0"):
        local_ntk_mask(model, "lenet-gn", 0.1, _client_batches(2), [0.0, 0.0], FAST)
    with pytest.raises(ValueError, match="one-shot iterator"):
        one_shot = iter(_client_batches(1)[0])
        local_ntk_mask(model, "lenet-gn", 0.1, [one_shot], None, FAST)


# --------------------------------------------------------------------------------------------
# argument errors


def test_unknown_method_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="prune_method") as err:
        prune("grasp", build_model("lenet-gn"), "lenet-gn", 0.1)
    assert all(name in str(err.value) for name in PRUNERS)


@pytest.mark.parametrize("method", ["snip", "ntk-local"])
def test_data_methods_without_data_raise(method: str) -> None:
    with pytest.raises(ValueError, match="needs data"):
        prune(method, build_model("lenet-gn"), "lenet-gn", 0.1, ntk_config=FAST)


def test_data_free_methods_do_not_receive_data(monkeypatch: pytest.MonkeyPatch) -> None:
    import fedzo_flwr.pruning as pruning

    got = {}

    def fake_ntk(*args, **kwargs):
        got["args"], got["kwargs"] = args, kwargs
        return ntk_sap_mask(*args, **kwargs)

    monkeypatch.setattr(pruning, "ntk_sap_mask", fake_ntk)
    data = _data_batches(1)
    prune("ntk", build_model("lenet-gn"), "lenet-gn", 0.5, data_batches=data, ntk_config=FAST)
    assert all(a is not data for a in got["args"]) and data not in got["kwargs"].values()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epsilon", 0.0),
        ("epsilon", float("inf")),
        ("repeats", 0),
        ("iterations", 0),
        ("batch_size", -1),
        ("prune_samples", 0),
        ("input_shape", (3, 0, 32)),
        ("input_shape", [3, 32, 32]),
        ("reinit", "biases"),
    ],
)
def test_config_validation_names_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        NTKSAPConfig(**{field: value})


def test_config_defaults_are_the_run_config_defaults() -> None:
    # NTK-SAP's CIFAR-10 setting (R = 5, T = 20, weights-only redraw) in both places
    assert NTKSAPConfig.for_run(RunConfig()) == NTKSAPConfig()
    assert (NTKSAPConfig().repeats, NTKSAPConfig().iterations) == (5, 20)
    assert NTKSAPConfig().reinit == "weights"
    legacy = RunConfig.from_run_config({"prune-reinit": "all", "prune-repeats": 2})
    assert NTKSAPConfig.for_run(legacy) == NTKSAPConfig(repeats=2, reinit="all")
    with pytest.raises(ConfigError, match="prune-reinit"):
        RunConfig.from_run_config({"prune-reinit": "biases"})


def test_config_batch_layout() -> None:
    assert NTKSAPConfig().batch_sizes == (100,)  # NTK-SAP CIFAR-10: one batch of 100 per pass
    cfg = NTKSAPConfig.for_num_classes(100)
    assert cfg.batch_sizes == (256, 256, 256, 232) and cfg.num_batches == 4


def test_batchnorm_model_is_rejected() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 32, 32))
    with pytest.raises(NotImplementedError, match="BatchNorm"):
        ntk_sap_mask(model, "lenet5", 0.5, FAST)


def test_zero_scores_are_reported(caplog: pytest.LogCaptureFixture) -> None:
    # LeNet-5 (ReLU, no normalisation, PyTorch default init) has units that are dead for the
    # whole Gaussian batch in a given weight draw; with one batch per iteration (R = 1) many
    # scores are exactly 0 and selection among them falls back to index order. This must not
    # pass silently. The default R = 5 (NTK-SAP's CIFAR setting) does not trigger it.
    with caplog.at_level(logging.WARNING, logger="fedzo_flwr.pruning"):
        ntk_sap_mask(build_model("lenet5"), "lenet5", 0.1, NTKSAPConfig(repeats=1))
    assert "scored exactly 0" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedzo_flwr.pruning"):
        ntk_sap_mask(build_model("lenet5"), "lenet5", 0.1)
    assert "scored exactly 0" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedzo_flwr.pruning"):
        ntk_sap_mask(build_model("lenet-gn"), "lenet-gn", 0.1, FAST)
    assert "scored exactly 0" not in caplog.text


def test_seed_derivation_is_pinned() -> None:
    # The federated form relies on server and clients deriving the same seeds on any platform.
    assert derive_seed(0, "x", 1) == 4427420899067873309
    assert scoring_seed(3407, 0, 1) == 5278285954528206050
    assert len({scoring_seed(0, c, t) for c in range(5) for t in range(1, 21)}) == 100
    with pytest.raises(TypeError, match="seed"):
        derive_seed(1.5)  # type: ignore[arg-type]
