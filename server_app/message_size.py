"""Measured size of a Flower message: the bytes of every object it is serialized into."""

from __future__ import annotations

from flwr.app import Message
from flwr.supercore.inflatable.inflatable_object import (
    InflatableObject,
    get_all_nested_objects,
    no_object_id_recompute,
)


class SizeCache:
    """Deflated sizes of objects shared by several messages (e.g. one round's ArrayRecord).

    Keyed by object identity, so it is only valid while the objects are neither modified nor
    freed: use one cache for the messages of one round, then drop it. It keeps a reference to
    every object it measured, so an identity cannot be reused while the cache lives.
    """

    def __init__(self) -> None:
        self._sizes: dict[int, tuple[InflatableObject, int]] = {}

    def nbytes(self, obj: InflatableObject) -> int:
        """``len(obj.deflate())``, computed once per object."""
        hit = self._sizes.get(id(obj))
        if hit is None:
            hit = (obj, len(obj.deflate()))
            self._sizes[id(obj)] = hit
        return hit[1]


def message_nbytes(message: Message, cache: SizeCache | None = None) -> int:
    """Total serialized size of ``message`` as Flower transfers it.

    Flower 1.41 ships a message as a tree of content-addressed objects (message, record dict,
    records, arrays, array chunks); this sums the deflated bytes of each, headers included.
    Object ids (content hashes, which every parent's header lists) are computed once per
    object (Flower's own ``no_object_id_recompute``), and a ``cache`` shared by the messages of
    a round serializes their common objects (the global model's arrays) only once. Either way
    the result is the same number of bytes.
    """
    with no_object_id_recompute():
        objects = get_all_nested_objects(message).values()
        if cache is None:
            return sum(len(obj.deflate()) for obj in objects)
        return sum(cache.nbytes(obj) for obj in objects)
