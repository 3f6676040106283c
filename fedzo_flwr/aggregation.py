"""How much each client's reply counts in a round: the weighting rule and its bounds.

Every method weights its clients the same way, so the methods are compared on equal terms and
no reply can buy more influence than the rule allows:

``weighting = "examples"``
    by the number of training examples the client reports (FedAvg's rule), each claim first
    capped at the partition size the server learned at the node's first valid contact;
``weighting = "uniform"``
    every client the same (BAFFLE's rule); example counts are ignored.

On top of either rule, ``max-client-share`` caps any one client's share of a round's weight:
shares above the cap are cut to it and the excess goes to the others in proportion to their
own weights (water filling), so the shares still sum to 1. A cap below ``1 / clients`` cannot
be met and gives every client the same share. When no client is above the cap the weights are
returned unchanged (bit for bit), so a cap that never binds changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

Weighting = Literal["examples", "uniform"]
WEIGHTINGS: tuple[str, ...] = ("examples", "uniform")


def client_weights(
    examples: Sequence[int], weighting: Weighting | str, max_share: float = 1.0
) -> list[float]:
    """Weights of the clients of one round (not normalised unless the cap binds).

    Parameters
    ----------
    examples : sequence of int
        Each client's (already bounded) example count, >= 1.
    weighting : {"examples", "uniform"}
        The rule.
    max_share : float
        Largest share of the round any one client may hold, in (0, 1].

    Returns
    -------
    list of float
        One weight per client, in the order given.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}; got {weighting!r}")
    if not 0 < max_share <= 1:
        raise ValueError(f"max_share must be in (0, 1], got {max_share}")
    if any(n < 1 for n in examples):
        raise ValueError(f"example counts must be >= 1, got {list(examples)}")
    weights = [float(n) if weighting == "examples" else 1.0 for n in examples]
    return cap_shares(weights, max_share)


def cap_shares(weights: Sequence[float], max_share: float) -> list[float]:
    """Water-fill ``weights`` so that no normalised share exceeds ``max_share``.

    Returns the weights unchanged when no share exceeds the cap; otherwise normalised shares.
    """
    total = sum(weights)
    if not weights or all(w / total <= max_share for w in weights):
        return list(weights)
    if max_share * len(weights) <= 1:
        return [1.0 / len(weights)] * len(weights)
    capped: set[int] = set()
    while True:
        free = [i for i in range(len(weights)) if i not in capped]
        budget = 1.0 - max_share * len(capped)
        free_total = sum(weights[i] for i in free)
        over = {i for i in free if budget * weights[i] / free_total > max_share}
        if not over:
            break
        capped |= over
    return [
        max_share if i in capped else budget * weights[i] / free_total for i in range(len(weights))
    ]
