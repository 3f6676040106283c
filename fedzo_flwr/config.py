"""The run configuration: every knob of a run, validated once.

Flower hands the ServerApp and ClientApps ``context.run_config``: the ``[tool.flwr.app.config]``
table of ``pyproject.toml`` plus ``--run-config`` overrides, with kebab-case keys.
:meth:`RunConfig.from_run_config` turns it into a typed, validated object; any problem raises
:class:`ConfigError` whose message names the offending key and what it accepts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from fedzo_flwr.errors import ConfigError
from fedzo_flwr.models import MODELS

DATA_DIR_ENV = "FEDZO_DATA_DIR"
OUTPUT_DIR_ENV = "FEDZO_OUTPUT_DIR"


# Keys that do not influence what the model learns (see RunConfig.trajectory_differences).
BOOKKEEPING_KEYS = frozenset(
    {
        "data-dir",
        "num-server-rounds",
        "round-timeout",
        "client-threads",
        "eval-every",
        "fraction-evaluate",
        "output-dir",
        "run-name",
        "checkpoint-every",
        "resume-from",
    }
)


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class RunConfig(BaseModel):
    """All settings of a fedzo-flwr run (keys are the kebab-case names of the fields)."""

    model_config = ConfigDict(
        alias_generator=_kebab, populate_by_name=True, extra="forbid", frozen=True
    )

    # What to train, on what.
    method: Literal["zo-pruned", "zo-dense", "fedavg"] = "zo-pruned"
    model: str = "lenet5"
    dataset: Literal["cifar10", "cifar100"] = "cifar10"
    data_dir: str = ""
    partitioner: Literal["iid", "dirichlet", "shards"] = "dirichlet"
    alpha: float = Field(0.5, gt=0)
    shards_per_client: int = Field(2, ge=1)
    min_partition_size: int = Field(10, ge=1)
    # Federation.
    num_server_rounds: int = Field(300, ge=1)
    clients_per_round: int = Field(0, ge=0)
    min_clients: int = Field(1, ge=1)
    round_timeout: float = Field(600.0, gt=0)
    # Robustness.
    aggregation: Literal["mean", "trimmed-mean", "median"] = "mean"
    trim_fraction: float = Field(0.1, ge=0, lt=0.5)
    max_abs_delta: float = Field(10.0, gt=0)
    weighting: Literal["examples", "uniform"] = "examples"
    max_client_share: float = Field(0.5, gt=0, le=1)
    # Zeroth-order estimator.
    k: int = Field(200, ge=1)
    sigma: float = Field(1e-3, gt=0)
    fd: Literal["forward", "central"] = "forward"
    directions: Literal["gaussian", "rademacher"] = "gaussian"
    seed_mode: Literal["per-client", "shared"] = "shared"
    engine: Literal["fused", "lean", "batched", "stream"] = "fused"
    chunk_size: int = Field(0, ge=0)
    engine_memory_mb: float = Field(32.0, gt=0)
    micro_batch: int = Field(0, ge=0)
    batch_size: int = Field(32, ge=1)
    local_steps: int = Field(1, ge=1)
    local_lr: float = Field(0.01, gt=0)
    # FedAvg baseline (method fedavg): local backprop SGD; local-lr is its step size.
    local_epochs: int = Field(1, ge=1)
    local_batches: int = Field(0, ge=0)
    client_optimizer: Literal["sgd", "momentum", "adam"] = "sgd"
    # Server optimizer.
    optimizer: Literal["sgd", "momentum", "adam"] = "adam"
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    clip: float = Field(0.0, ge=0)
    ema: float = Field(0.0, ge=0, lt=1)
    # Pruning before round 1: on the server (data-free) or federated (ntk-local, snip).
    prune_method: Literal["ntk", "ntk-local", "snip", "synflow", "magnitude", "random"] = "ntk"
    density: float = Field(0.1, gt=0, le=1)
    prune_iterations: int = Field(20, ge=1)
    prune_repeats: int = Field(5, ge=1)
    prune_samples: int = Field(100, ge=1)
    prune_reinit: Literal["weights", "all"] = "weights"
    # Bookkeeping.
    client_threads: int = Field(1, ge=0)
    seed: int = Field(3407, ge=0)
    eval_every: int = Field(10, ge=1)
    fraction_evaluate: float = Field(0.0, ge=0, le=1)
    output_dir: str = ""
    run_name: str = ""
    checkpoint_every: int = Field(50, ge=0)
    resume_from: str = ""

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        if value not in MODELS:
            raise ValueError(f"unknown model {value!r}; valid models: {', '.join(sorted(MODELS))}")
        return value

    @model_validator(mode="after")
    def _robust_aggregation_needs_shared_seeds(self) -> RunConfig:
        # Robust aggregation combines, per coordinate, the deltas of clients that share step
        # seeds; with per-client seeds no two clients share any, so it would silently be "mean".
        if self.aggregation != "mean" and self.seed_mode == "per-client":
            raise ValueError(
                f"keys 'aggregation' and 'seed-mode': aggregation={self.aggregation!r} combines "
                "the deltas of clients that share step seeds, and seed-mode='per-client' gives "
                "every client its own, so it would have no effect; use seed-mode='shared' or "
                "aggregation='mean'"
            )
        return self

    @model_validator(mode="after")
    def _micro_batch_needs_the_stream_engine(self) -> RunConfig:
        # Only the stream engine evaluates a batch in parts; any other would ignore the key.
        if self.micro_batch and self.engine != "stream":
            raise ValueError(
                f"keys 'micro-batch' and 'engine': micro-batch={self.micro_batch} splits the "
                f"batch of the stream engine only, and engine={self.engine!r} would ignore it; "
                "use engine='stream' or micro-batch=0"
            )
        return self

    @property
    def pruned(self) -> bool:
        """Whether the run prunes before training (``zo-dense`` trains the dense model)."""
        return self.method != "zo-dense" and self.density < 1.0

    @property
    def effective_density(self) -> float:
        """Target density actually used: 1.0 for the dense baseline."""
        return self.density if self.pruned else 1.0

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> RunConfig:
        """Validate a Flower run config (kebab-case keys) into a :class:`RunConfig`.

        Raises
        ------
        ConfigError
            Naming every invalid key, what was given and what is allowed.
        """
        try:
            return cls.model_validate(dict(run_config))
        except ValidationError as err:
            raise ConfigError(_describe(err)) from None

    def trajectory_differences(self, other: RunConfig) -> list[str]:
        """Keys (kebab-case) whose values differ and that change the training trajectory.

        Bookkeeping keys (rounds, evaluation, paths, threads, timeouts) may differ between a
        checkpointed run and its resumption; every other key must match for a bit-exact resume.
        """
        mine, theirs = self.to_run_config(), other.to_run_config()
        return sorted(k for k in mine if k not in BOOKKEEPING_KEYS and mine[k] != theirs.get(k))

    def to_run_config(self) -> dict[str, Any]:
        """The kebab-case dict form (what ``results.json`` records)."""
        return self.model_dump(by_alias=True)

    def resolve_data_dir(self) -> Path:
        """``data-dir``, else ``$FEDZO_DATA_DIR``; an error naming both if neither is set."""
        raw = self.data_dir or os.environ.get(DATA_DIR_ENV, "")
        if not raw:
            raise ConfigError(
                f"key 'data-dir': no data folder given; set data-dir in the run config "
                f"(--run-config 'data-dir=\"/abs/path\"') "
                f"or the {DATA_DIR_ENV} environment variable"
            )
        return Path(raw).expanduser().resolve()

    def resolve_output_dir(self) -> Path:
        """``output-dir``, else ``$FEDZO_OUTPUT_DIR``, else ``./outputs`` (absolute)."""
        raw = self.output_dir or os.environ.get(OUTPUT_DIR_ENV, "") or "outputs"
        return Path(raw).expanduser().resolve()


def _describe(err: ValidationError) -> str:
    lines = []
    for problem in err.errors():
        key = ".".join(str(part) for part in problem["loc"])
        if problem["type"] == "extra_forbidden":
            lines.append(f"key '{key}': unknown key")
            continue
        message = problem["msg"].removeprefix("Value error, ")
        if not key:  # a rule over several keys: its message names them
            lines.append(message)
            continue
        lines.append(f"key '{key}': {message} (got {problem.get('input')!r})")
    return "invalid run config: " + "; ".join(lines)
