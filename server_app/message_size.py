"""Measured size of a Flower message: the bytes of every object it is serialized into."""

from __future__ import annotations

from flwr.app import Message
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects


def message_nbytes(message: Message) -> int:
    """Total serialized size of ``message`` as Flower transfers it.

    Flower 1.41 ships a message as a tree of content-addressed objects (message, record dict,
    records, arrays, array chunks); this sums the deflated bytes of each, headers included.
    """
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())
