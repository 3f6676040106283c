"""Property-based fuzzing of every reply kind through the real strategies' reply handling.

Hypothesis generates arbitrary record contents (wrong types, missing and extra keys, byte
strings of any length, NaN/inf, huge and negative numbers, lists of the wrong length, error and
status replies) and single guaranteed-breaking mutations of a valid reply, and drives them
through ``FedZO.aggregate_train``, ``MaskedFedAvg.aggregate_train``, ``aggregate_evaluate`` and
the pruning phase's ``screen_prune_replies``. Properties: nothing raises, every bad reply is
counted as a rejection, a round with only bad replies leaves the model bit-identical, and a
valid reply next to bad ones is still accepted.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fedzo_flwr import protocol
from fedzo_flwr.config import RunConfig
from fedzo_flwr.data import DatasetArrays
from fedzo_flwr.pruning import client as cp
from fedzo_flwr.run.results import RunRecorder
from fedzo_flwr.run.setup import initial_model
from fedzo_flwr.seeding import round_seed
from fedzo_flwr.zo.server import ZOServer
from server_app.fedavg_strategy import MaskedFedAvg
from server_app.federated_pruning import screen_prune_replies
from server_app.identity import PartitionRegistry
from server_app.strategy import FedZO

K = 4
FUZZ = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
NODES = [2001, 2002, 2003, 2004]
VALID_NODE = 1999

# ------------------------------------------------------------------------ generators

KEYS = st.sampled_from(
    [
        protocol.ROUND_KEY,
        protocol.DELTAS_KEY,
        protocol.STEP_SEEDS_KEY,
        protocol.FINGERPRINT_KEY,
        protocol.STATUS_CODE_KEY,
        protocol.STATUS_DETAIL_KEY,
        cp.ITERATION_KEY,
        cp.GRADIENTS_KEY,
        "num-examples",
        "num-partitions",
        "partition-id",
        "base-loss",
        "client-seconds",
        "peak-mem-bytes",
        "extra-mem-bytes",
        "train-loss",
        "train-examples",
        "steps",
        "loss",
        "accuracy",
        "memory-budget-mb",
    ]
) | st.text(min_size=1, max_size=12)
INT64 = st.integers(-(2**63), 2**63 - 1)
FLOATS = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [math.nan, math.inf, -math.inf, 1e308, -1e308, 0.0, -0.0]
)
NUMBERS = INT64 | FLOATS | st.sampled_from([0, -1, 10**15, 2**62, 3407])
BLOBS = st.binary(max_size=4096) | st.integers(0, 64).map(lambda n: bytes(4 * n))
CONFIG_VALUES = (
    NUMBERS
    | st.booleans()
    | st.text(max_size=64)
    | BLOBS
    | st.lists(INT64, max_size=6)
    | st.lists(FLOATS, max_size=6)
    | st.lists(st.text(max_size=8), min_size=1, max_size=6)
    | st.lists(st.booleans(), min_size=1, max_size=6)
    | st.lists(st.binary(max_size=16), min_size=1, max_size=4)
)
METRIC_VALUES = NUMBERS | st.lists(INT64, max_size=6) | st.lists(FLOATS, max_size=6)
ARRAYS = st.builds(
    lambda dtype, n: np.zeros(n, dtype=dtype) + (np.nan if dtype.kind == "f" and n % 3 else 0),
    st.sampled_from([np.dtype(t) for t in ("float32", "float64", "int64", "uint8", "bool")]),
    st.integers(0, 64),
)


def _record(kind, values):
    return st.dictionaries(KEYS, values, max_size=8).map(kind)


CONFIG_RECORDS = _record(ConfigRecord, CONFIG_VALUES)
METRIC_RECORDS = _record(MetricRecord, METRIC_VALUES)
ARRAY_RECORDS = st.dictionaries(st.sampled_from(["kept", "0", "x"]), ARRAYS, max_size=3).map(
    lambda d: ArrayRecord({k: Array(v) for k, v in d.items()})
)
RECORD_NAMES = st.sampled_from(
    [protocol.ZO_KEY, protocol.METRICS_KEY, protocol.STATUS_KEY, protocol.ARRAYS_KEY, cp.PRUNE_KEY]
) | st.text(min_size=1, max_size=8)
#: Arbitrary content: any records under any names (the reply kinds' names most often).
CONTENT = st.dictionaries(RECORD_NAMES, CONFIG_RECORDS | METRIC_RECORDS | ARRAY_RECORDS, max_size=4)
#: A value that no field of any reply accepts where a number, a list or bytes belong.
WRONG = (
    st.text(max_size=20)
    | st.booleans()
    | st.lists(st.text(max_size=4), min_size=1, max_size=3)
    | st.sampled_from([math.nan, math.inf, -math.inf, -1, -(10**12), 2**62, 1e300])
)


def reply_to(message: Message, content: dict | None) -> Message:
    """A reply to ``message``: ``content`` as records, or an error reply when ``None``."""
    if content is None:
        return Message(Error(code=0, reason="crash"), reply_to=message)
    return Message(RecordDict(content), reply_to=message)


# -------------------------------------------------------------------------- fixtures


def tiny_data() -> DatasetArrays:
    x = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    y = np.zeros(4, dtype=np.int64)
    return DatasetArrays("cifar10", x, y, x, y, tuple(str(i) for i in range(10)))


def setup_cfg(**overrides) -> RunConfig:
    return RunConfig.from_run_config(
        {"k": K, "prune-method": "random", "density": 0.2, "min-clients": 1, **overrides}
    )


@pytest.fixture(scope="module")
def zo(tmp_path_factory):
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    cfg = setup_cfg()
    init = initial_model(cfg)
    server = ZOServer(cfg, init.model, init.mask)
    recorder = RunRecorder(tmp_path_factory.mktemp("zo") / "run", cfg.to_run_config())
    return FedZO(server, recorder, tiny_data(), forward_flops=1)


@pytest.fixture(scope="module")
def fedavg(tmp_path_factory):
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    cfg = setup_cfg(method="fedavg")
    init = initial_model(cfg)
    recorder = RunRecorder(tmp_path_factory.mktemp("fedavg") / "run", cfg.to_run_config())
    return MaskedFedAvg(cfg, init.model, init.mask, recorder, tiny_data(), flops_per_example=1)


ROUNDS = itertools.count(1)


def train_messages(strategy, server_round: int, nodes) -> list[Message]:
    seed = round_seed(strategy.cfg.seed, server_round)
    return strategy.train_messages(
        server_round, seed, strategy.kept_arrays(), ConfigRecord(), nodes
    )


def valid_zo_content(strategy: FedZO, server_round: int, node_id: int) -> dict:
    """A reply that passes every check (for partition 0 of a 4-way split).

    ``test_zo_valid_reply_among_bad_ones_is_accepted`` proves it, at first contact and after.
    """
    zo = {
        protocol.DELTAS_KEY: np.full(K, 0.01, dtype="<f4").tobytes(),
        protocol.STEP_SEEDS_KEY: strategy.server.expected_seeds(server_round, 0),
        protocol.ROUND_KEY: server_round,
    }
    metrics = {
        "num-examples": 100,
        "base-loss": 2.3,
        "client-seconds": 0.1,
        "peak-mem-bytes": 1e6,
        "extra-mem-bytes": 1e5,
        "partition-id": 0,
    }
    if node_id not in strategy.nodes_with_mask:
        zo[protocol.FINGERPRINT_KEY] = strategy.expected_fingerprint
        metrics[protocol.NUM_PARTITIONS_KEY] = 4
    return {protocol.ZO_KEY: ConfigRecord(zo), protocol.METRICS_KEY: MetricRecord(metrics)}


def valid_fedavg_content(strategy: MaskedFedAvg, node_id: int) -> dict:
    metrics = {
        "num-examples": 100,
        "train-loss": 2.3,
        "train-examples": 32,
        "client-seconds": 0.1,
        "peak-mem-bytes": 1e6,
        "partition-id": 0,
        "num-partitions": 4,
    }
    kept = np.full(strategy.space.dim, 0.5, dtype=np.float32)
    return {
        protocol.ARRAYS_KEY: ArrayRecord({protocol.KEPT_KEY: Array(kept)}),
        protocol.METRICS_KEY: MetricRecord(metrics),
    }


def length_is_not(n: int):
    return lambda value: len(value) != n


@st.composite
def mutation(draw, content_of):
    """A valid reply's content with one guaranteed-breaking change (drop, retype, resize)."""
    content = content_of()
    name = draw(st.sampled_from(sorted(content)))
    record = dict(content[name])
    key = draw(st.sampled_from(sorted(record)))
    how = draw(st.sampled_from(["drop-record", "drop-key", "wrong-value", "extra-record"]))
    if how == "drop-record":
        del content[name]
    elif how == "extra-record":
        content["extra"] = ArrayRecord({"x": Array(np.zeros(3, dtype=np.float32))})
    elif how == "drop-key":
        assume(key not in ("extra-mem-bytes", "steps"))  # optional keys
        del record[key]
    else:
        value = record[key]
        if isinstance(value, bytes):
            record[key] = draw(BLOBS.filter(length_is_not(len(value))) | WRONG)
        elif isinstance(value, np.ndarray):
            record[key] = value.astype(np.float64)
        elif isinstance(value, list):
            record[key] = draw(
                st.lists(INT64, max_size=4).filter(length_is_not(len(value))) | WRONG
            )
        else:
            record[key] = draw(WRONG)
    if how in ("drop-key", "wrong-value"):
        try:
            content[name] = type(content[name])(record)
        except (TypeError, ValueError):
            assume(False)  # a value Flower cannot even carry never arrives
    if how == "extra-record" and protocol.ARRAYS_KEY not in content:
        assume(False)  # an extra record is harmless in a ZO reply (ignored)
    return content


def fedavg_numpy(content):
    """FedAvg's ArrayRecord as a dict of plain arrays, so a mutation can retype them."""
    out = dict(content)
    out[protocol.ARRAYS_KEY] = {k: a.numpy() for k, a in content[protocol.ARRAYS_KEY].items()}
    return out


def model_bits(strategy) -> torch.Tensor:
    return strategy.kept_values().clone()


def assert_all_rejected(strategy, server_round, replies):
    before, counted = model_bits(strategy), strategy.rejected_total
    arrays, metrics = strategy.aggregate_train(server_round, replies)
    assert arrays is None and metrics is None
    assert strategy.rejected_total == counted + len(replies)
    assert torch.equal(model_bits(strategy), before)
    entry = strategy.recorder.round_entry(server_round)
    assert entry["skipped"] is True and len(entry["rejected"]) == len(replies)


# ------------------------------------------------------------------------ properties


@FUZZ
@given(contents=st.lists(st.none() | CONTENT, min_size=1, max_size=4))
def test_zo_arbitrary_replies_never_raise_and_are_all_counted(zo, contents):
    server_round = next(ROUNDS)
    messages = train_messages(zo, server_round, NODES[: len(contents)])
    assert_all_rejected(zo, server_round, [reply_to(m, c) for m, c in zip(messages, contents)])


@FUZZ
@given(data=st.data())
def test_zo_broken_valid_reply_is_rejected(zo, data):
    server_round = next(ROUNDS)
    [message] = train_messages(zo, server_round, [NODES[0]])
    content = data.draw(mutation(lambda: valid_zo_content(zo, server_round, NODES[0])))
    assert_all_rejected(zo, server_round, [reply_to(message, content)])


@FUZZ
@given(contents=st.lists(st.none() | CONTENT, min_size=1, max_size=3))
def test_zo_valid_reply_among_bad_ones_is_accepted(zo, contents):
    server_round = next(ROUNDS)
    messages = train_messages(zo, server_round, [VALID_NODE, *NODES[: len(contents)]])
    replies = [reply_to(messages[0], valid_zo_content(zo, server_round, VALID_NODE))]
    replies += [reply_to(m, c) for m, c in zip(messages[1:], contents)]
    before, counted = model_bits(zo), zo.rejected_total
    arrays, metrics = zo.aggregate_train(server_round, replies)
    assert arrays is not None and metrics["clients"] == 1
    assert zo.rejected_total == counted + len(contents)
    assert not torch.equal(model_bits(zo), before)


@FUZZ
@given(contents=st.lists(st.none() | CONTENT, min_size=1, max_size=4))
def test_fedavg_arbitrary_replies_never_raise_and_are_all_counted(fedavg, contents):
    server_round = next(ROUNDS)
    messages = train_messages(fedavg, server_round, NODES[: len(contents)])
    replies = [reply_to(m, c) for m, c in zip(messages, contents)]
    assert_all_rejected(fedavg, server_round, replies)


@FUZZ
@given(data=st.data())
def test_fedavg_broken_valid_reply_is_rejected(fedavg, data):
    server_round = next(ROUNDS)
    [message] = train_messages(fedavg, server_round, [NODES[0]])
    content = data.draw(mutation(lambda: fedavg_numpy(valid_fedavg_content(fedavg, NODES[0]))))
    if isinstance(content.get(protocol.ARRAYS_KEY), dict):
        content[protocol.ARRAYS_KEY] = ArrayRecord(
            {k: Array(v) for k, v in content[protocol.ARRAYS_KEY].items()}
        )
    assert_all_rejected(fedavg, server_round, [reply_to(message, content)])


def test_the_valid_fedavg_reply_is_valid(fedavg):
    """The base of the FedAvg mutations is accepted (so each mutation is what breaks it)."""
    server_round = next(ROUNDS)
    [message] = train_messages(fedavg, server_round, [VALID_NODE])
    arrays, metrics = fedavg.aggregate_train(
        server_round, [reply_to(message, valid_fedavg_content(fedavg, VALID_NODE))]
    )
    assert metrics["clients"] == 1
    assert np.all(arrays[protocol.KEPT_KEY].numpy() == 0.5)


def evaluate_messages(strategy, nodes):
    messages = [
        Message(RecordDict(), message_type=MessageType.EVALUATE, dst_node_id=n) for n in nodes
    ]
    strategy.message_node = {m.object_id: n for m, n in zip(messages, nodes)}
    return messages


VALID_EVALUATION = {"loss": 1.5, "accuracy": 0.25, "num-examples": 10}
BAD_EVALUATION = {
    "loss": [math.nan, math.inf, -math.inf, -1, -0.5, 1e7],
    "accuracy": [math.nan, math.inf, -1, -0.5, 1.5, 2],
    "num-examples": [0, -1, 2**62, 10**10, 1.5, math.nan],
}
#: Values each pruning-reply field refuses (partition 0 of a 4-way split, iteration 1).
BAD_PRUNE = {
    cp.ITERATION_KEY: [0, 2, -1, 2**62, 1.0, math.nan],
    "num-examples": [0, -1, 10**9 + 1, 2.5, math.inf],
    "partition-id": [4, 5, -1, 10**7, 0.0],
    "num-partitions": [0, -1, 10**6 + 1, 4.0],
}


@st.composite
def evaluation_content(draw):
    if draw(st.booleans()):
        return draw(st.none() | CONTENT)
    metrics = dict(VALID_EVALUATION)
    key = draw(st.sampled_from(sorted(metrics)))
    if draw(st.booleans()):
        del metrics[key]
    else:
        metrics[key] = draw(st.sampled_from(BAD_EVALUATION[key]) | st.lists(FLOATS, max_size=3))
    try:
        return {protocol.METRICS_KEY: MetricRecord(metrics)}
    except (TypeError, ValueError):
        assume(False)


@FUZZ
@given(contents=st.lists(evaluation_content(), min_size=1, max_size=4))
def test_evaluate_replies_never_raise_and_are_all_counted(zo, contents):
    messages = evaluate_messages(zo, NODES[: len(contents)])
    counted = zo.rejected_evaluations
    assert zo.aggregate_evaluate(1, [reply_to(m, c) for m, c in zip(messages, contents)]) is None
    assert zo.rejected_evaluations == counted + len(contents)


def test_a_valid_evaluation_reply_is_accepted(zo):
    messages = evaluate_messages(zo, NODES[:1])
    metrics = zo.aggregate_evaluate(
        1, [reply_to(messages[0], {protocol.METRICS_KEY: MetricRecord(VALID_EVALUATION)})]
    )
    assert metrics["accuracy"] == 0.25 and metrics["loss"] == 1.5


def _not_an_int(value) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)


@st.composite
def prune_content(draw, mask):
    if draw(st.booleans()):
        return draw(st.none() | CONTENT)
    total = sum(m.numel() for m in mask.values())
    record = {cp.ITERATION_KEY: 1, cp.GRADIENTS_KEY: bytes(4 * total)}
    metrics = {"num-examples": 50, "partition-id": 0, "num-partitions": 4}
    target = draw(st.sampled_from(["record", "metrics"]))
    chosen = record if target == "record" else metrics
    key = draw(st.sampled_from(sorted(chosen)))
    if draw(st.booleans()):
        del chosen[key]
    elif key == cp.GRADIENTS_KEY:
        chosen[key] = draw(
            BLOBS.filter(lambda b: len(b) != 4 * total)
            | st.just(np.full(total, np.nan, dtype="<f4").tobytes())
            | WRONG
        )
    else:
        chosen[key] = draw(st.sampled_from(BAD_PRUNE[key]) | WRONG.filter(_not_an_int))
    try:
        return {cp.PRUNE_KEY: ConfigRecord(record), protocol.METRICS_KEY: MetricRecord(metrics)}
    except (TypeError, ValueError):
        assume(False)


@FUZZ
@given(data=st.data())
def test_pruning_replies_never_raise_and_are_all_counted(zo, data):
    mask = zo.mask
    contents = data.draw(st.lists(prune_content(mask), min_size=1, max_size=4))
    nodes = NODES[: len(contents)]
    messages = [Message(RecordDict(), message_type="query.prune", dst_node_id=n) for n in nodes]
    message_node = {m.object_id: n for m, n in zip(messages, nodes)}
    replies = [reply_to(m, c) for m, c in zip(messages, contents)]
    registry = PartitionRegistry()
    valid, up, failures = screen_prune_replies(
        replies, message_node, {n: i for i, n in enumerate(nodes)}, 1, mask, registry
    )
    assert valid == {} and up == 0 and len(failures) == len(contents)
    assert registry.owner == {}


def test_a_valid_pruning_reply_is_accepted(zo):
    total = sum(m.numel() for m in zo.mask.values())
    message = Message(RecordDict(), message_type="query.prune", dst_node_id=NODES[0])
    content = {
        cp.PRUNE_KEY: ConfigRecord({cp.ITERATION_KEY: 1, cp.GRADIENTS_KEY: bytes(4 * total)}),
        protocol.METRICS_KEY: MetricRecord(
            {"num-examples": 50, "partition-id": 0, "num-partitions": 4}
        ),
    }
    registry = PartitionRegistry()
    valid, _, failures = screen_prune_replies(
        [reply_to(message, content)],
        {message.object_id: NODES[0]},
        {NODES[0]: 0},
        1,
        zo.mask,
        registry,
    )
    assert failures == [] and list(valid) == [0] and valid[0][1] == 50
    assert registry.owner == {0: NODES[0]} and registry.num_partitions == 4
