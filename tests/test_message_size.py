"""Measured message sizes: exactly the bytes Flower serializes, with or without the shared cache."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.task_identity import TaskIdentity

from server_app.message_size import SizeCache, message_nbytes


@pytest.fixture(autouse=True)
def task_identity():
    """Messages need a run (Flower 1.41 private API, as in ``inprocess_grid``)."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def plain_size(message: Message) -> int:
    """The straightforward count: every nested object deflated, ids recomputed each time."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def round_messages(nodes: int, kept: int) -> list[Message]:
    arrays = ArrayRecord({"kept": Array(np.linspace(-1, 1, kept, dtype=np.float32))})
    messages = []
    for node in range(nodes):
        config = ConfigRecord({"server-round": 3, "round-seed": 2**62 + node})
        if node == 0:
            config["mask"] = b"\xff" * 1000
        content = RecordDict({"arrays": arrays, "config": config})
        messages.append(Message(content, dst_node_id=100 + node, message_type=MessageType.TRAIN))
    return messages


def test_message_nbytes_equals_the_plain_serialized_size():
    messages = round_messages(nodes=5, kept=6413)
    cache = SizeCache()
    sizes = [message_nbytes(m, cache) for m in messages]
    assert sizes == [plain_size(m) for m in messages]
    assert sizes == [message_nbytes(m) for m in messages]
    # The arrays travel in every message: 6413 float32 values and the headers around them.
    assert all(size > 4 * 6413 for size in sizes)
    # Node 0's config also carries the 1000-byte mask (plus its key and framing).
    assert 1000 < sizes[0] - sizes[1] < 1100


def test_size_cache_serializes_shared_objects_once(monkeypatch):
    messages = round_messages(nodes=4, kept=100)
    calls = {"n": 0}
    original = ArrayRecord.deflate

    def counting(self):
        calls["n"] += 1
        return original(self)

    monkeypatch.setattr(ArrayRecord, "deflate", counting)
    cache = SizeCache()
    for message in messages:
        message_nbytes(message, cache)
    shared = calls["n"]
    calls["n"] = 0
    for message in messages:
        message_nbytes(message)
    assert shared < calls["n"]
    assert shared <= 2  # its id once (within the first message), its size once
