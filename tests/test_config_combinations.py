"""Run-config rules that span several keys."""

from __future__ import annotations

import pytest

from fedzo_flwr.config import RunConfig
from fedzo_flwr.errors import ConfigError


@pytest.mark.parametrize("aggregation", ["median", "trimmed-mean"])
def test_robust_aggregation_with_per_client_seeds_is_rejected(aggregation: str) -> None:
    with pytest.raises(ConfigError) as raised:
        RunConfig.from_run_config({"aggregation": aggregation, "seed-mode": "per-client"})
    message = str(raised.value)
    assert "'aggregation'" in message and "'seed-mode'" in message
    assert repr(aggregation) in message and "'per-client'" in message
    assert "got {" not in message  # no dump of the whole config


@pytest.mark.parametrize(
    ("aggregation", "seed_mode"),
    [("median", "shared"), ("trimmed-mean", "shared"), ("mean", "per-client"), ("mean", "shared")],
)
def test_other_combinations_are_accepted(aggregation: str, seed_mode: str) -> None:
    cfg = RunConfig.from_run_config({"aggregation": aggregation, "seed-mode": seed_mode})
    assert (cfg.aggregation, cfg.seed_mode) == (aggregation, seed_mode)


def test_single_key_errors_still_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"key 'aggregation': .*\(got 'mode'\)"):
        RunConfig.from_run_config({"aggregation": "mode"})


@pytest.mark.parametrize("engine", ["fused", "lean", "batched"])
def test_micro_batch_without_the_stream_engine_is_rejected(engine: str) -> None:
    with pytest.raises(ConfigError) as raised:
        RunConfig.from_run_config({"micro-batch": 8, "engine": engine})
    message = str(raised.value)
    assert "'micro-batch'" in message and "'engine'" in message and repr(engine) in message


def test_micro_batch_with_the_stream_engine_is_accepted() -> None:
    cfg = RunConfig.from_run_config({"micro-batch": 8, "engine": "stream"})
    assert (cfg.micro_batch, cfg.engine) == (8, "stream")
    with pytest.raises(ConfigError, match=r"key 'micro-batch': .*\(got -1\)"):
        RunConfig.from_run_config({"micro-batch": -1, "engine": "stream"})
