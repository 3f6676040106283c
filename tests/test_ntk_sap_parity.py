"""Parity of the data-free NTK-SAP pruner with the reference implementation (issue #12).

The reference is ``YiteWang/NTK-SAP`` (``Pruners/pruners.py`` class ``NTKSAP``) run side by side
with ours on the same architectures with the same settings: ε = 0.01, R = 5 passes, T = 20
iterations, one batch of 100 Gaussian inputs per pass, exponential schedule, global top-k. Its
per-layer kept fractions (mean and sample standard deviation over 5 seeds) are the constants
below, as reported in issue #12. The reference redraws only the conv/linear weights for every
scoring batch and keeps the model's initial biases; ours does the same by default
(``reinit="weights"``) and, with ``reinit="all"`` (our behaviour before #12), redraws the biases
too, which moves LeNet-5's per-layer densities well outside the reference's spread.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fedzo_flwr.models import build_model
from fedzo_flwr.pruning import NTKSAPConfig, ntk_sap_mask
from fedzo_flwr.sparse.mask import layer_densities

#: Reference NTK-SAP on LeNet-5 at density 0.1: layer -> (mean, sd) of the kept fraction over
#: ``REFERENCE_RUNS`` seeds (issue #12).
REFERENCE_LENET5_D01 = {
    "conv1.weight": (0.585, 0.019),
    "conv2.weight": (0.574, 0.013),
    "fc1.weight": (0.0668, 0.001),
    "fc2.weight": (0.0986, 0.007),
    "fc3.weight": (0.397, 0.010),
}
REFERENCE_RUNS = 5
#: Our seeds: seed ``s`` draws θ0 (``build_model(seed=s)``, whose biases the scores keep) and
#: every pruning draw (``ntk_sap_mask(seed=s)``).
SEEDS = (0, 1, 2, 3, 4)
#: Allowance, in kept fraction, for what sampling error does not cover: implementation details
#: that shift a layer's count slightly (the reference thresholds with ``kthvalue`` and ``<=``,
#: so ties change its count; we keep an exact count and reserve one entry per tensor).
FLOOR = 0.005
#: NTK-SAP's CIFAR-10 setting, the one the reference figures were measured with.
SETTING = NTKSAPConfig(epsilon=0.01, repeats=5, iterations=20, prune_samples=100)


@pytest.fixture(autouse=True)
def _one_thread():
    # Many small ops: on a 2-core machine shared with other processes, 2 intra-op threads make
    # this 10-30x slower (OpenMP barriers). Restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def kept_fractions(
    model_name: str, density: float, seeds: tuple[int, ...], config: NTKSAPConfig
) -> dict[str, list[float]]:
    """Per-layer kept fraction of our data-free NTK-SAP mask, one value per seed."""
    out: dict[str, list[float]] = {}
    for seed in seeds:
        model = build_model(model_name, seed=seed)
        mask = ntk_sap_mask(model, model_name, density, config, seed=seed)
        for name, value in layer_densities(mask).items():
            out.setdefault(name, []).append(value)
    return out


def parity_tolerance(sd_ref: float, n_ref: int, ours: list[float]) -> float:
    """``3 · sqrt(sd_ref² / n_ref + sd_ours² / n_ours) + FLOOR`` (see the parity test)."""
    n = len(ours)
    mean = sum(ours) / n
    sd_ours = math.sqrt(sum((x - mean) ** 2 for x in ours) / (n - 1))
    return 3 * math.sqrt(sd_ref**2 / n_ref + sd_ours**2 / n) + FLOOR


def parity_report(config: NTKSAPConfig) -> dict[str, tuple[float, float, float, float]]:
    """layer -> (our mean, reference mean, |difference|, tolerance) for LeNet-5 at d = 0.1."""
    ours = kept_fractions("lenet5", 0.1, SEEDS, config)
    report = {}
    for name, (mean_ref, sd_ref) in REFERENCE_LENET5_D01.items():
        mean = sum(ours[name]) / len(ours[name])
        tol = parity_tolerance(sd_ref, REFERENCE_RUNS, ours[name])
        report[name] = (mean, mean_ref, abs(mean - mean_ref), tol)
    return report


@pytest.mark.slow
@pytest.mark.parametrize(("reinit", "agrees"), [("weights", True), ("all", False)])
def test_lenet5_layer_densities_match_the_reference(reinit: str, agrees: bool) -> None:
    """LeNet-5 at density 0.1: our per-layer kept fractions agree with the reference NTK-SAP.

    For every layer, with ``n = 5`` of our seeds and the reference's 5 runs::

        |mean_ours − mean_ref| ≤ 3 · sqrt(sd_ref² / 5 + sd_ours² / n) + 0.005

    i.e. the difference of the two means must lie within three standard errors of that
    difference (each side's seed-to-seed spread divided by its number of runs; our ``sd_ours``
    is the sample standard deviation of our ``n`` runs), plus a floor of half a point for
    implementation details sampling error does not cover (the reference's ``kthvalue``
    threshold vs our exact count). With 5 layers, the chance that a correct implementation fails
    on at least one layer is a few percent at most; the test is deterministic (fixed seeds), so
    it passes or fails the same way every time on a given platform.

    ``reinit="weights"`` (default, the reference's behaviour) must pass. ``reinit="all"`` (biases
    redrawn per batch, our pre-#12 behaviour) must fail; it does on every layer, fc2 by far the
    most (it keeps 0.038 vs the reference's 0.099). Measured (seeds 0-4): new default 0.606 /
    0.581 / 0.0665 / 0.0977 / 0.400, old 0.640 / 0.637 / 0.0745 / 0.0379 / 0.479.
    """
    report = parity_report(dataclasses.replace(SETTING, reinit=reinit))
    failing = {name: row for name, row in report.items() if row[2] > row[3]}
    detail = {name: tuple(round(v, 4) for v in row) for name, row in report.items()}
    if agrees:
        assert not failing, f"(ours, reference, |diff|, tolerance) per layer: {detail}"
    else:
        assert "fc2.weight" in failing, f"the old behaviour should not match: {detail}"


def test_resnet20_masks_agree_in_both_reinit_modes() -> None:
    """ResNet-20 (GroupNorm): redrawing the biases or not does not move its masks.

    Its only bias is the classifier's, which adds the same constant to both forward passes and
    cancels in ``f(θ) − f(θ + εξ)``; GroupNorm parameters are 1 and 0 in both modes; and both
    modes draw the same weights and perturbations for a seed. So the per-layer kept fractions
    must agree within the 2.2 points of issue #12 (in practice the masks are identical here).
    """
    config = NTKSAPConfig(iterations=3, repeats=1, prune_samples=8, batch_size=8)
    model = build_model("resnet20", seed=1)
    ours = ntk_sap_mask(model, "resnet20", 0.1, config, seed=1)
    old = ntk_sap_mask(model, "resnet20", 0.1, dataclasses.replace(config, reinit="all"), seed=1)
    new_d, old_d = layer_densities(ours), layer_densities(old)
    assert max(abs(new_d[n] - old_d[n]) for n in new_d) <= 0.022
    shared = sum(int((ours[n] & old[n]).sum()) for n in ours)
    assert shared >= 0.99 * sum(int(m.sum()) for m in ours.values())


def test_lenet5_unit_survival_follows_the_sign_of_its_bias() -> None:
    """With the biases fixed at θ0 (default), an fc2 unit survives iff its bias is positive.

    The reference's hallmark on LeNet-5 (issue #12: at d = 0.1, fc2 units with a positive bias
    survive 98-100 % of the time, negative-bias units 5 %): under a fresh weight draw a ReLU unit
    with a negative bias is often dead for the whole Gaussian batch, so the weights into and out
    of it score low. A unit survives when it keeps at least one incoming (fc2 row) and one
    outgoing (fc3 column) weight. Measured for seed 0: 100 % vs 3 % (with ``reinit="all"``:
    70 % vs 70 %).
    """
    model = build_model("lenet5", seed=0)
    mask = ntk_sap_mask(model, "lenet5", 0.1, SETTING, seed=0)
    alive = mask["fc2.weight"].any(1) & mask["fc3.weight"].any(0)
    positive = model.fc2.bias.detach() > 0
    assert float(alive[positive].float().mean()) >= 0.9
    assert float(alive[~positive].float().mean()) <= 0.2
