"""Which nodes take part: a bounded wait for connections and seeded sampling.

Flower's own ``sample_nodes`` waits forever for ``min_available_nodes``; a lost device would
hang the run. Here the wait ends at a deadline, after which the caller goes ahead with whoever
is connected (or skips the round). Sampling is reproducible: the nodes of round ``r`` are drawn
by a ``random.Random`` seeded from the run seed and ``r``.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from logging import INFO

from flwr.serverapp import Grid

from fedzo_flwr.seeding import evaluate_sample_seed, node_sample_seed
from server_app.logs import log


def wait_for_nodes(grid: Grid, wanted: int, timeout: float, what: str = "round") -> list[int]:
    """Node ids connected now, waiting at most ``timeout`` seconds for ``wanted`` of them.

    Parameters
    ----------
    grid : Grid
        The ServerApp's grid.
    wanted : int
        How many nodes to wait for.
    timeout : float
        Seconds to wait at most; then the nodes connected at that moment are returned.
    what : str
        Named in the progress log line ("round", "pruning phase").

    Returns
    -------
    list of int
        The connected node ids, sorted (possibly fewer than ``wanted``).
    """
    deadline = time.monotonic() + timeout
    while True:
        connected = sorted(grid.get_node_ids())
        if len(connected) >= wanted or time.monotonic() >= deadline:
            return connected
        log(
            INFO,
            "Waiting for nodes to connect (%s): %d connected, %d required",
            what,
            len(connected),
            wanted,
        )
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def sample_round_nodes(
    available: list[int],
    wanted: int,
    seed: int,
    server_round: int,
    stream: Callable[[int, int], int] = node_sample_seed,
) -> list[int]:
    """``wanted`` of ``available`` for ``server_round``, reproducibly; all when ``wanted`` is 0.

    The same run seed and round always give the same nodes (for the same ``available``), so
    FedZO and the FedAvg baseline train on the same clients round by round. ``stream`` names
    the seed stream of the draw (:mod:`fedzo_flwr.seeding`): training nodes by default.
    """
    if not wanted or wanted >= len(available):
        return list(available)
    chooser = random.Random(stream(seed, server_round))
    return sorted(chooser.sample(available, wanted))


def sample_evaluate_nodes(
    available: list[int], fraction: float, seed: int, server_round: int
) -> list[int]:
    """The nodes that evaluate ``server_round``: ``ceil(fraction * len(available))``, at least 1.

    Drawn reproducibly from their own seed stream
    (:func:`~fedzo_flwr.seeding.evaluate_sample_seed`); none when ``fraction`` is 0 or no node
    is connected.
    """
    if fraction <= 0 or not available:
        return []
    wanted = max(1, math.ceil(fraction * len(available)))
    return sample_round_nodes(available, wanted, seed, server_round, evaluate_sample_seed)
