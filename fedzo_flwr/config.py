"""The run configuration: every knob of a run, validated once.

Flower hands the ServerApp and ClientApps ``context.run_config``: the ``[tool.flwr.app.config]``
table of ``pyproject.toml`` plus ``--run-config`` overrides, with kebab-case keys.
:meth:`RunConfig.from_run_config` turns it into a typed, validated object; any problem raises
:class:`ConfigError` whose message names the offending key and what it accepts.
"""

from __future__ import annotations

import math
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
        "max-node-failures",
    }
)


#: Methods that train one block at a time with backprop (docs/progressive.md).
PROGRESSIVE_METHODS = frozenset({"smartfreeze", "profl"})
#: Zeroth-order progressive training: one block at a time, forward passes only (ours).
ZO_PROGRESSIVE = "zo-progressive"
#: Every method that trains a staged model one block at a time.
STAGED_METHODS = PROGRESSIVE_METHODS | {ZO_PROGRESSIVE}


def _float_list(value: str, expected: str) -> list[float]:
    try:
        numbers = [float(part) for part in value.split(",")]
    except ValueError:
        raise ValueError(f"expected {expected}") from None
    if not numbers or not all(math.isfinite(n) for n in numbers):
        raise ValueError(f"expected {expected}")
    return numbers


def _int_list(value: str, expected: str) -> list[int]:
    try:
        numbers = [int(part) for part in value.split(",")]
    except ValueError:
        raise ValueError(f"expected {expected}") from None
    if not numbers or any(n < 1 for n in numbers):
        raise ValueError(f"expected {expected}")
    return numbers


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class RunConfig(BaseModel):
    """All settings of a fedzo-flwr run (keys are the kebab-case names of the fields)."""

    model_config = ConfigDict(
        alias_generator=_kebab, populate_by_name=True, extra="forbid", frozen=True
    )

    # What to train, on what.
    method: Literal["zo-pruned", "zo-dense", "fedavg", "smartfreeze", "profl", "zo-progressive"] = (
        "zo-pruned"
    )
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
    max_node_failures: int = Field(3, ge=0)
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
    # Downlink: full kept weights every round, or the missed rounds' (seed, coefficients).
    downlink: Literal["weights", "replay"] = "weights"
    replay_history: int = Field(32, ge=1)
    # FedAvg baseline (method fedavg): local backprop SGD; local-lr is its step size.
    local_epochs: int = Field(1, ge=1)
    local_batches: int = Field(0, ge=0)
    client_optimizer: Literal["sgd", "momentum", "adam"] = "sgd"
    # Server optimizer.
    optimizer: Literal["sgd", "momentum", "adam"] = "adam"
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.99, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    clip: float = Field(0.0, ge=0)
    clip_scope: Literal["round", "client"] = "round"
    ema: float = Field(0.0, ge=0, lt=1)
    warmup_rounds: int = Field(0, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    lr_schedule_rounds: int = Field(0, ge=0)
    # Pruning before round 1: on the server (data-free) or federated (ntk-local, snip).
    prune_method: Literal["ntk", "ntk-local", "snip", "synflow", "magnitude", "random"] = "ntk"
    density: float = Field(0.1, gt=0, le=1)
    prune_iterations: int = Field(20, ge=1)
    prune_repeats: int = Field(5, ge=1)
    prune_samples: int = Field(100, ge=1)
    prune_reinit: Literal["weights", "all"] = "weights"
    # Progressive block training (method smartfreeze / profl; docs/progressive.md).
    stage_split: Literal["stage", "layers"] = "stage"
    layers_per_block: int = Field(1, ge=1)
    stage_weight_decay: float = Field(5e-4, ge=0)
    pace: Literal["effective-movement", "apf", "fixed"] = "effective-movement"
    pace_tau: float = Field(0.2, ge=0, le=1)
    pace_window: int = Field(6, ge=1)
    pace_patience: int = Field(3, ge=1)
    stage_min_rounds: int = Field(10, ge=1)
    stage_max_rounds: int = Field(200, ge=1)
    stage_rounds: str = "50"
    pace_sample: int = Field(10_000, ge=1)
    pace_apf_ema: float = Field(0.99, ge=0, le=1)
    pace_apf_threshold: float = Field(0.05, ge=0, le=1)
    pace_apf_level: float = Field(0.8, ge=0, le=1)
    pace_seed: int = Field(0, ge=0)
    profl_shrink_rounds: int = Field(5, ge=1)
    profl_shrink_lr: float = Field(1e-5, gt=0)
    # Memory-heterogeneous devices (progressive methods, fedavg, zo-dense, zo-pruned).
    memory_profile: Literal["none", "profl-uniform", "device-tier"] = "none"
    memory_seed: int = Field(0, ge=0)
    device_proportions: str = "0.25,0.25,0.25,0.25"
    device_usable_share: float = Field(0.5, gt=0, le=1)
    memory_margin: float = Field(0.0, ge=0)
    selector: Literal["random-eligible", "heterogeneity-aware"] = "random-eligible"
    selector_similarity: float = Field(0.8, ge=0, le=1)
    selector_speed_ema: float = Field(0.5, ge=0, lt=1)
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

    @field_validator("stage_rounds")
    @classmethod
    def _stage_rounds(cls, value: str) -> str:
        _int_list(value, "one int >= 1 or a comma-separated list of them, e.g. '30,20,10'")
        return value

    @field_validator("device_proportions")
    @classmethod
    def _device_proportions(cls, value: str) -> str:
        shares = _float_list(value, "4 comma-separated numbers >= 0, not all 0")
        if len(shares) != 4 or any(s < 0 for s in shares) or not sum(shares) > 0:
            raise ValueError(
                "expected 4 comma-separated numbers >= 0, not all 0 (shares of Pi Zero 2 W, "
                "Pi 4 1 GB, Pi 4 4 GB, Jetson Orin Nano 8 GB)"
            )
        return value

    @model_validator(mode="after")
    def _stage_round_bounds(self) -> RunConfig:
        if self.stage_max_rounds < self.stage_min_rounds:
            raise ValueError(
                f"keys 'stage-min-rounds' and 'stage-max-rounds': the maximum "
                f"({self.stage_max_rounds}) must be >= the minimum ({self.stage_min_rounds})"
            )
        return self

    @model_validator(mode="after")
    def _progressive_evaluates_centrally(self) -> RunConfig:
        if self.method in STAGED_METHODS and self.fraction_evaluate > 0:
            raise ValueError(
                f"keys 'method' and 'fraction-evaluate': method {self.method!r} evaluates "
                "centrally only (its model before the last stage is blocks plus an output "
                "module); set fraction-evaluate = 0"
            )
        return self

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
    def _replay_needs_zeroth_order(self) -> RunConfig:
        # Replay rebuilds a round's step from its seeds and scalars: only the ZO methods have one.
        if self.downlink == "replay" and not self.method.startswith("zo-"):
            raise ValueError(
                f"keys 'downlink' and 'method': downlink='replay' rebuilds a round's update from "
                f"its seeds and scalars, which method={self.method!r} does not have; use "
                "downlink='weights'"
            )
        return self

    @model_validator(mode="after")
    def _zo_progressive_limits(self) -> RunConfig:
        # zo-progressive: the stage's coordinate space changes at every stage change, and its
        # output modules are pruned with their own data-free NTK-SAP (docs/progressive.md).
        if self.method != ZO_PROGRESSIVE:
            return self
        if self.downlink == "replay":
            raise ValueError(
                "keys 'downlink' and 'method': method='zo-progressive' does not support "
                "downlink='replay' (a node's replay state would have to follow the active "
                "stage's coordinate space, which changes at every stage change); use "
                "downlink='weights'"
            )
        if self.prune_method != "ntk":
            raise ValueError(
                f"keys 'prune-method' and 'method': method='zo-progressive' prunes the blocks "
                f"and the output modules with data-free NTK-SAP, not {self.prune_method!r}; use "
                "prune-method='ntk'"
            )
        if self.resume_from:
            raise ValueError(
                "keys 'resume-from' and 'method': method='zo-progressive' writes no resumable "
                "checkpoint yet; start the run afresh (resume-from = '')"
            )
        return self

    @model_validator(mode="after")
    def _client_clip_needs_mean_aggregation(self) -> RunConfig:
        # Robust aggregation combines the clients' scalars direction by direction before any
        # estimate exists, so there is no per-client estimate left to clip.
        if self.clip_scope == "client" and self.aggregation != "mean":
            raise ValueError(
                f"keys 'clip-scope' and 'aggregation': clip-scope='client' clips each client's "
                f"estimate, and aggregation={self.aggregation!r} merges the clients' scalars "
                "before any estimate exists; use aggregation='mean' or clip-scope='round'"
            )
        return self

    @property
    def follows_lr_schedule(self) -> bool:
        """Whether the method's server step follows ``lr-schedule``.

        The zeroth-order methods' server optimizer does; FedAvg and the backprop progressive
        methods ignore the key.
        """
        return self.method.startswith("zo-")

    @model_validator(mode="after")
    def _cosine_needs_rounds_after_warmup(self) -> RunConfig:
        if not (self.follows_lr_schedule and self.lr_schedule == "cosine"):
            return self
        if self.warmup_rounds >= self.schedule_rounds:
            horizon = "lr-schedule-rounds" if self.lr_schedule_rounds else "num-server-rounds"
            raise ValueError(
                f"keys 'lr-schedule', 'warmup-rounds' and '{horizon}': the cosine decay "
                f"runs after the warm-up, and warmup-rounds={self.warmup_rounds} leaves none of "
                f"the schedule's {self.schedule_rounds} rounds; lower warmup-rounds or use "
                "lr-schedule='constant'"
            )
        return self

    @model_validator(mode="after")
    def _rounds_within_the_cosine_horizon(self) -> RunConfig:
        cosine = self.follows_lr_schedule and self.lr_schedule == "cosine"
        if cosine and self.num_server_rounds > self.schedule_rounds:
            raise ValueError(
                f"keys 'num-server-rounds' and 'lr-schedule-rounds': the cosine schedule ends "
                f"at step {self.schedule_rounds} and the lr is 0 after it, so "
                f"num-server-rounds={self.num_server_rounds} would train only "
                f"{self.schedule_rounds} rounds; set lr-schedule-rounds >= num-server-rounds "
                "(0: the run's own rounds) or lr-schedule='constant'"
            )
        return self

    @property
    def schedule_rounds(self) -> int:
        """The cosine schedule's horizon: ``lr-schedule-rounds``, else ``num-server-rounds``."""
        return self.lr_schedule_rounds or self.num_server_rounds

    @property
    def progressive(self) -> bool:
        """Whether the method is backprop progressive training (``smartfreeze`` or ``profl``)."""
        return self.method in PROGRESSIVE_METHODS

    @property
    def staged(self) -> bool:
        """Whether the method trains a staged model one block at a time (incl. zo-progressive)."""
        return self.method in STAGED_METHODS

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
        """Whether the run prunes before training (``zo-dense``, smartfreeze, profl: dense)."""
        return self.method != "zo-dense" and not self.progressive and self.density < 1.0

    @property
    def stage_rounds_list(self) -> tuple[int, ...]:
        """``stage-rounds`` parsed: rounds of each stage under ``pace = fixed``."""
        return tuple(int(v) for v in _int_list(self.stage_rounds, ""))

    @property
    def device_proportions_list(self) -> tuple[float, ...]:
        """``device-proportions`` parsed: the share of each device tier."""
        return tuple(_float_list(self.device_proportions, ""))

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
        Under ``lr-schedule = cosine`` the schedule's horizon (:attr:`schedule_rounds`:
        ``lr-schedule-rounds``, else ``num-server-rounds``) must match too.
        """
        mine, theirs = self.to_run_config(), other.to_run_config()
        free = BOOKKEEPING_KEYS | {"lr-schedule-rounds"}
        keys = {k for k in mine if k not in free and mine[k] != theirs.get(k)}
        # Only the zeroth-order server optimizer follows the schedule.
        cosine = self.follows_lr_schedule and self.lr_schedule == other.lr_schedule == "cosine"
        if cosine and self.schedule_rounds != other.schedule_rounds:
            both_default = not (self.lr_schedule_rounds or other.lr_schedule_rounds)
            keys.add("num-server-rounds" if both_default else "lr-schedule-rounds")
        return sorted(keys)

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
