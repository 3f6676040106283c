"""Client weighting: the rule, the cap on any one client's share, and their effect on a round."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_replay import fake_updates, make_server

from fedzo_flwr.aggregation import cap_shares, client_weights
from fedzo_flwr.config import ConfigError, RunConfig
from fedzo_flwr.zo.reconstruct import accumulate_steps
from fedzo_flwr.zo.server import ClientUpdate
from fedzo_flwr.zo.settings import zo_settings


def shares(weights):
    total = sum(weights)
    return [w / total for w in weights]


def test_uncapped_weights_are_returned_unchanged():
    assert client_weights([3, 5, 2], "examples", 0.6) == [3.0, 5.0, 2.0]
    assert client_weights([3, 5, 2], "uniform", 1.0) == [1.0, 1.0, 1.0]


def test_cap_water_fills_and_keeps_the_order_of_the_rest():
    got = cap_shares([10**15, 10, 30, 60], 0.5)
    assert got[0] == 0.5 and sum(got) == pytest.approx(1.0)
    # The rest keep their proportions: 10 : 30 : 60 of the remaining half.
    assert got[1:] == pytest.approx([0.05, 0.15, 0.30])
    # Two clients above the cap: both at the cap, the third gets what is left.
    assert cap_shares([100, 100, 1], 0.4) == pytest.approx([0.4, 0.4, 0.2])
    # A cascade: after capping the first, the second rises above the cap too.
    got = cap_shares([50, 30, 10, 10], 0.35)
    assert max(got) <= 0.35 + 1e-12 and sum(got) == pytest.approx(1.0)
    assert got[2] == got[3]


def test_an_unreachable_cap_gives_equal_shares():
    assert cap_shares([1, 2, 3], 0.3) == pytest.approx([1 / 3] * 3)
    assert cap_shares([7], 0.5) == [1.0]


@pytest.mark.parametrize(
    "bad", [({"weighting": "votes"}, "weighting"), ({"max-client-share": 0}, "max-client-share")]
)
def test_bad_weighting_settings_name_the_key(bad):
    overrides, key = bad
    with pytest.raises(ConfigError, match=key):
        RunConfig.from_run_config(overrides)


def test_a_client_claiming_huge_example_counts_cannot_set_the_update():
    """The takeover of issue 13: one reply claims 10**15 examples."""
    server = make_server(**{"optimizer": "sgd", "lr": 1.0, "seed-mode": "per-client"})
    honest = fake_updates(server, 1, clients=4)
    liar = honest[0]
    updates = [ClientUpdate(liar.partition_id, 10**15, liar.steps, liar.base_loss), *honest[1:]]
    before = server.kept_values().clone()
    server.apply_round(updates, 1)
    assert server.last_update is not None
    got = [g.share for g in server.last_update.groups]
    assert max(got) == 0.5  # per-client seeds: one group per client; the liar is capped
    settings = zo_settings(server.cfg)
    liar_direction = accumulate_steps(server.space.sizes, liar.steps, settings)
    step = before - server.kept_values()
    cosine = float(torch.nn.functional.cosine_similarity(step, liar_direction, dim=0))
    assert cosine < 0.9  # without the cap the step would be the liar's estimate (cosine 1)


def test_uniform_weighting_ignores_example_counts():
    server = make_server(**{"weighting": "uniform", "seed-mode": "per-client"})
    updates = fake_updates(server, 1, clients=3)
    server.apply_round(updates, 1)
    assert server.last_update is not None
    assert [g.share for g in server.last_update.groups] == pytest.approx([1 / 3] * 3)
    assert not np.allclose([u.num_examples for u in updates], updates[0].num_examples)
