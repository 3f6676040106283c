"""Property-based fuzzing of zo-progressive train replies through ZOProgressiveRounds.

The generators and properties of ``tests/test_fuzz_replies.py``, on the zeroth-order
progressive strategy: arbitrary contents and single breaking mutations of a valid reply (the
``stage`` key included) never raise, are all counted as rejections and leave the stage's weights
and every other tensor bit-identical; a valid reply among bad ones is accepted.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import given
from hypothesis import strategies as st
from test_fuzz_replies import (
    CONTENT,
    FUZZ,
    NODES,
    VALID_NODE,
    assert_all_rejected,
    mutation,
    reply_to,
    setup_cfg,
    tiny_data,
    train_messages,
    valid_zo_content,
)

from fedzo_flwr.progressive.schedule import all_tensors
from fedzo_flwr.protocol import progressive as keys
from fedzo_flwr.run.results import RunRecorder
from server_app.node_info import NodeProfile
from server_app.zo_progressive_strategy import ZOProgressiveRounds

ROUNDS = itertools.count(1)


@pytest.fixture(scope="module")
def zp(tmp_path_factory):
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    cfg = setup_cfg(
        **{
            "method": "zo-progressive",
            "prune-method": "ntk",
            "prune-iterations": 1,
            "prune-repeats": 1,
            "pace": "fixed",
            "stage-rounds": "1000000",
        }
    )
    recorder = RunRecorder(tmp_path_factory.mktemp("zp") / "run", cfg.to_run_config())
    strategy = ZOProgressiveRounds.for_run(cfg, recorder, tiny_data())
    for node in (VALID_NODE, *NODES):  # probed, as configure_train would have done
        strategy.participants.node_info.profiles[node] = NodeProfile(
            node, 0, 100, None, "none", (10.0,) * 10
        )
    return strategy


def valid_content(strategy: ZOProgressiveRounds, server_round: int, node_id: int) -> dict:
    content = valid_zo_content(strategy, server_round, node_id)
    content["zo"][keys.STAGE_KEY] = strategy.stage
    return content


def everything(strategy: ZOProgressiveRounds) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in all_tensors(strategy.staged).items()}


@FUZZ
@given(contents=st.lists(st.none() | CONTENT, min_size=1, max_size=4))
def test_arbitrary_replies_never_raise_and_are_all_counted(zp, contents):
    server_round = next(ROUNDS)
    before = everything(zp)
    messages = train_messages(zp, server_round, NODES[: len(contents)])
    assert_all_rejected(zp, server_round, [reply_to(m, c) for m, c in zip(messages, contents)])
    after = everything(zp)
    assert all(torch.equal(after[n], before[n]) for n in before)


@FUZZ
@given(data=st.data())
def test_broken_valid_reply_is_rejected(zp, data):
    server_round = next(ROUNDS)
    [message] = train_messages(zp, server_round, [NODES[0]])
    content = data.draw(mutation(lambda: valid_content(zp, server_round, NODES[0])))
    assert_all_rejected(zp, server_round, [reply_to(message, content)])


@FUZZ
@given(contents=st.lists(st.none() | CONTENT, min_size=1, max_size=3))
def test_valid_reply_among_bad_ones_is_accepted(zp, contents):
    server_round = next(ROUNDS)
    messages = train_messages(zp, server_round, [VALID_NODE, *NODES[: len(contents)]])
    replies = [reply_to(messages[0], valid_content(zp, server_round, VALID_NODE))]
    replies += [reply_to(m, c) for m, c in zip(messages[1:], contents)]
    before, counted = everything(zp), zp.rejected_total
    arrays, metrics = zp.aggregate_train(server_round, replies)
    assert arrays is not None and metrics["clients"] == 1
    assert zp.rejected_total == counted + len(contents)
    after = everything(zp)
    stage = set(zp.staged.stage_parameters(zp.stage))
    assert any(not torch.equal(after[n], before[n]) for n in stage)
    assert all(torch.equal(after[n], before[n]) for n in before if n not in stage)


def test_a_reply_for_another_stage_is_rejected(zp):
    server_round = next(ROUNDS)
    [message] = train_messages(zp, server_round, [NODES[1]])
    content = valid_content(zp, server_round, NODES[1])
    content["zo"][keys.STAGE_KEY] = zp.stage + 1
    assert_all_rejected(zp, server_round, [reply_to(message, content)])
    reason = zp.recorder.round_entry(server_round)["rejected"][0]["reason"]
    assert f"reply is for stage {zp.stage + 1}, this round trains stage {zp.stage}" in reason
